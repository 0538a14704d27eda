"""Operations that make a GPU's host wait (``.item()``, ``bool(t)``, ``nonzero``, boolean-mask
indexing, ``tolist`` ...) in one training step, counted by source line on the CPU
(TorchDispatchMode): a GPU-independent check that a step does not stall its launch queue.

    python benchmarks/host_syncs.py --preset debug --tokens 256
"""

from __future__ import annotations

import argparse
import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparseek
from sparseek.model import build_model

SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
           "aten.repeat_interleave.Tensor", "aten._unique2.default", "aten.unique_consecutive.default",
           "aten.bincount.default", "aten.unique_dim.default", "aten.histc.default"}


def _site() -> str:
    frames = [f for f in traceback.extract_stack() if "/sparseek/" in f.filename]
    return " <- ".join(f"{f.filename.split('/sparseek/')[-1]}:{f.lineno}" for f in frames[-2:][::-1]) or "?"


class Syncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        masked = name.startswith("aten.index.Tensor") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []) if i is not None)
        if name in SYNCING or masked:
            self.sites[(name, _site())] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--tokens", type=int, default=256)
    a = ap.parse_args()
    args = sparseek.preset(a.preset)
    torch.manual_seed(0)
    model = build_model(args)
    model.init_weights(seed=0)
    model.train()
    x = torch.randint(0, args.vocab_size, (2, a.tokens + 1))
    mode = Syncs()
    tolist = torch.Tensor.tolist  # a CPU tensor's tolist never reaches the dispatcher: count it here

    def counted(t):
        mode.sites[("tolist", _site())] += 1
        return tolist(t)
    torch.Tensor.tolist = counted
    try:
        with mode:
            ce = torch.nn.functional.cross_entropy
            logits, h = model(x[:, :-1], return_hidden=True)
            loss = ce(logits.flatten(0, 1).float(), x[:, 1:].flatten())
            if len(model.mtp):
                loss = loss + 0.3 * ce(model.forward_mtp(h[:, :-1], x[:, 1:-1]).flatten(0, 1).float(), x[:, 2:].flatten())
            loss.backward()
    finally:
        torch.Tensor.tolist = tolist
    print(f"# training step (forward + MTP + backward), {a.preset}, 2 x {a.tokens} tokens: "
          f"{sum(mode.sites.values())} host syncs")
    for (op, site), n in mode.sites.most_common(40):
        print(f"{n:5d}  {op:34s} {site}")


if __name__ == "__main__":
    main()

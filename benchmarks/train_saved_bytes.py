"""What a training forward keeps for backward, by the module that keeps it, per token and layer.

    python benchmarks/train_saved_bytes.py --tokens 512 --out benchmarks/results/cpu-flash-train-saved.txt

The model has V4-Flash's dimensions (4 layers: two sliding-window, one CSA, one HCA; 16 routed
experts, which changes nothing per token; a small vocabulary, the head's loss being fused anyway)
in bf16 under bf16 autocast, as a GPU trains it. Each distinct storage autograd saves is counted
once, weights excluded, under the innermost module running when it was saved. Two settings: the
default (``common.recompute_pointwise``: SwiGLU, RMSNorm and mHC's two sides keep their inputs
and recompute in backward) and plain autograd for those chains (both with the experts' sum that
keeps only its index: 1,297 KiB per token and layer before it, in the thirty-sixth session).
Memory is the measure, so a CPU gives the GPU's answer (same tensors, same dtypes).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import sparseek  # noqa: E402
from sparseek.model import build_model, common  # noqa: E402
from bench_engine import emit  # noqa: E402


def flash_layers(n: int, experts: int):
    ratios = sparseek.preset("v4-flash").compress_ratios
    return sparseek.preset("v4-flash", num_hidden_layers=n, n_routed_experts=experts, vocab_size=1024,
                           num_hash_layers=min(3, n), compress_ratios=ratios[:n] + [0])


def saved_by_module(model, T: int) -> dict[str, int]:
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack = ["model"]
    hooks = []
    for name, m in model.named_modules():
        hooks.append(m.register_forward_pre_hook(lambda m, i, n=name: stack.append(n or "model") and None))
        hooks.append(m.register_forward_hook(lambda m, i, o: stack.pop() and None))
    seen: dict[int, tuple[int, str]] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights and st.data_ptr() not in seen:
            seen[st.data_ptr()] = (st.nbytes(), re.sub(r"layers\.\d+", "layers.N", stack[-1]))
        return t

    ids = torch.randint(0, model.args.vocab_size, (1, T + 1), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids[:, :-1], targets=ids[:, 1:])
    for h in hooks:
        h.remove()
    out = collections.Counter()
    for nbytes, mod in seen.values():
        out[mod] += nbytes
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    args = flash_layers(a.layers, a.experts)
    torch.manual_seed(0)
    model = build_model(args, dtype=torch.bfloat16)
    model.init_weights(seed=0)
    model.train()
    T, L = a.tokens, args.num_hidden_layers
    lines = [f"# python benchmarks/train_saved_bytes.py --tokens {T} --layers {L} --experts {a.experts}",
             f"# V4-Flash dims, compress_ratios {args.compress_ratios[:L]}, bf16 weights under bf16 autocast, "
             f"torch {torch.__version__}",
             "# KiB kept for backward per token (per layer for the layers' modules, summed over the layers)", ""]
    res = {}
    for recompute in (True, False):
        common.recompute_pointwise = recompute
        res[recompute] = saved_by_module(model, T)
    common.recompute_pointwise = True
    mods = sorted(set(res[True]) | set(res[False]), key=lambda m: (-res[False].get(m, 0), m))
    lines.append(f"| module | recompute_pointwise | plain autograd |")
    lines.append("|---|---|---|")
    for m in mods:
        per = L if m.startswith("layers.N") else 1
        cells = [f"{res[k].get(m, 0) / T / 1024 / per:,.1f}" for k in (True, False)]
        if max(res[True].get(m, 0), res[False].get(m, 0)) / T / 1024 / per >= 0.5:
            lines.append(f"| {m}{' (per layer)' if per > 1 else ''} | {cells[0]} | {cells[1]} |")
    tot = {k: sum(v.values()) / T / 1024 for k, v in res.items()}
    lines.append(f"| **total per token** | **{tot[True]:,.0f}** | **{tot[False]:,.0f}** |")
    lines.append(f"| total per token and layer | {tot[True] / L:,.0f} | {tot[False] / L:,.0f} |")
    lines.append("")
    lines.append(f"recompute_pointwise keeps {tot[True] / tot[False]:.2f}x of plain autograd's bytes.")
    emit("\n".join(lines), a.out)


if __name__ == "__main__":
    main()

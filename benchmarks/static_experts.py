"""The routed experts of a fixed-shape step (``Experts.forward_static``) in three forms, alone and
inside the engine's compiled decode step: why the step keeps one product per slot and matrix.

    python benchmarks/static_experts.py --preset small --dtype bfloat16 --batch 1 4

Forms, all compiled with the decode step's backend (``sparseek.model.fuse``: products of a few rows
as fused reductions):

* ``one product per slot and matrix``: a loop over the k slots, three gathered GEMVs each
  (``Experts.forward_static``, what the engine runs);
* ``slots together``: one product per matrix over all k slots, each slot's output kept apart
  until a final sum (so every output still reduces along one contiguous weight row);
* ``slots together, w1 + w3 as one``: the same with gate and up as one gathered [2I, D] matrix,
  read in the graph as a view of w1 reaching into w3 (``Experts`` allocates them as the halves
  of one buffer; checked here before tracing, ``gate_up_view``).

First the weight-streaming rate of one token's routed experts in every layer (each layer's
experts run in turn, so they do not stay in cache); then the whole compiled decode step
(``CompiledStep(model.decode_step)``) traced with the engine's and the fastest standalone form,
logits compared, timed in alternating rounds of one process (this VM drifts +-25% within
minutes: compare rows of one run). Twenty-eighth session: alone, the last form streams the
experts ~1.7x faster; in the step the two run within noise (batch 1 1.03x, batch 4 0.92x), so the
engine keeps the simpler form (``benchmarks/results/cpu-small-bf16-static-experts.txt``).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import sparseek
from sparseek.engine.compile import CompiledStep, _own_copy
from sparseek.model.common import Experts, gate_up_view, swiglu
from sparseek.model.fuse import fusing_backend


def _slots(ex: Experts, x_ND, weights_NK, idx_NK, gate_up):
    """All slots in one product per matrix, each slot's output apart until the sum."""
    gate, up = gate_up
    h = swiglu(gate, up, ex.limit, weights_NK[..., None], x_ND.dtype, ex.act_fp8)
    return torch.einsum("nki,nkoi->nko", h, ex.w2[idx_NK]).float().sum(1).to(x_ND.dtype)


def slots_apart(ex: Experts, x_ND, weights_NK, idx_NK):
    """w1 and w3 gathered apart."""
    gate_up = (torch.einsum("nd,nkod->nko", x_ND, getattr(ex, w)[idx_NK]) for w in ("w1", "w3"))
    return _slots(ex, x_ND, weights_NK, idx_NK, gate_up)


def slots_w13(ex: Experts, x_ND, weights_NK, idx_NK):
    """w1 and w3 as one gathered matrix (the caller checked that they are one buffer's halves)."""
    E, I, D = ex.w1.shape
    w13 = torch.as_strided(ex.w1, (E, 2 * I, D), (2 * I * D, D, 1))  # w1's storage continues with w3
    gate_up = torch.einsum("nd,nkod->nko", x_ND, w13[idx_NK]).chunk(2, dim=-1)
    return _slots(ex, x_ND, weights_NK, idx_NK, gate_up)


FORMS = {"one product per slot and matrix": Experts.forward_static, "slots together": slots_apart,
         "slots together, w1 + w3 as one": slots_w13}


def best_rounds(fns: dict, rounds: int, n: int) -> dict[str, list[float]]:
    """Seconds per call of each function, ``rounds`` alternating rounds of ``n`` calls."""
    for f in fns.values():
        for _ in range(3):
            f()
    res = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t = time.perf_counter()
            for _ in range(n):
                f()
            res[name].append((time.perf_counter() - t) / n)
    return res


def median(v: list[float]) -> float:
    return sorted(v)[len(v) // 2]


def expert_rates(model, batch: int, rounds: int) -> None:
    layers = [b.ffn.experts for b in model.layers]
    k, D, dtype = model.args.num_experts_per_tok, model.args.hidden_size, layers[0].w1.dtype
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, D, generator=g).to(dtype)
    w = torch.rand(batch, k, generator=g)
    idx = torch.stack([torch.randperm(layers[0].n, generator=g)[:k] for _ in range(batch)])
    read = len(layers) * 3 * idx.unique().numel() * layers[0].w1[0].numel() * layers[0].w1.element_size()
    # each its own code object: dynamo keeps compiled code per code object
    fns = {name: torch.compile(_own_copy(lambda f=f: [f(ex, x, w, idx) for ex in layers]), dynamic=False,
                               backend=fusing_backend())
           for name, f in FORMS.items()}
    outs = {name: f() for name, f in fns.items()}
    ref = outs[next(iter(outs))]
    res = best_rounds(fns, rounds, 30)
    print(f"routed experts of {batch} token(s), every layer ({read / 1e6:.1f} MB of distinct expert weights):")
    for name, v in res.items():
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(ref, outs[name]))
        dt = median(v)
        print(f"  {name:32s} {dt / len(layers) * 1e6:6.0f} us/layer  {read / dt / 1e9:5.1f} GB/s   "
              f"max |difference| from the first {diff:.3g}")


def decode_ab(model, batch: int, rounds: int) -> None:
    V = model.args.vocab_size
    g = torch.Generator().manual_seed(1)
    cache = model.new_cache(batch, 512)
    model(torch.randint(10, V, (batch, 64), generator=g), cache)
    pos0, tok = cache.pos.clone(), torch.randint(10, V, (batch, 1), generator=g)
    current = Experts.forward_static
    steps = {}
    for name, form in (("one product per slot and matrix", current), ("slots together, w1 + w3 as one", slots_w13)):
        Experts.forward_static = form  # read while the step traces (its first call); no guards after
        try:
            t = time.perf_counter()
            steps[name] = step = CompiledStep(model.decode_step, "cpu")
            for _ in range(3):
                cache.pos.copy_(pos0)
                step(tok, cache)
            print(f"  compiled {name} in {time.perf_counter() - t:.0f} s", flush=True)
        finally:
            Experts.forward_static = current

    def run(step):
        cache.pos.copy_(pos0)  # every step at the same position
        return step(tok, cache)
    logits = {name: run(s).float() for name, s in steps.items()}
    a, b = logits.values()
    print(f"  logits: max |difference| {(a - b).abs().max().item():.3g} "
          f"(max |logit| {a.abs().max().item():.3g}), same argmax {(a.argmax(-1) == b.argmax(-1)).float().mean():.0%}")
    res = best_rounds({name: (lambda s=s: run(s)) for name, s in steps.items()}, rounds, 20)
    base = median(res[next(iter(res))])
    for name, v in res.items():
        dt = median(v)
        print(f"  batch {batch}, {name:32s} {dt * 1e3:6.2f} ms/step (best {min(v) * 1e3:.2f})  "
              f"{batch / dt:6.1f} tok/s  {base / dt:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-step", action="store_true", help="the experts alone, not the whole decode step")
    ap.add_argument("--no-rates", action="store_true", help="the whole decode step only")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))
    model, _ = sparseek.load(a.preset, dtype=getattr(torch, a.dtype), tokenizer=False)
    print(f"sparseek {sparseek.__version__} (torch {torch.__version__}, {torch.get_num_threads()} threads), "
          f"{a.preset} {a.dtype}")
    with torch.inference_mode():
        if not all(gate_up_view(b.ffn.experts.w1, b.ffn.experts.w3) is not None for b in model.layers):
            raise SystemExit("w1 and w3 are not one buffer's halves here: the w1 + w3 form would read past w1")
        for B in [] if a.no_rates else a.batch:
            expert_rates(model, B, a.rounds)
        if not a.no_step:
            print("compiled decode step (CompiledStep(model.decode_step)), the engine's form vs the fastest alone:")
            for B in a.batch:
                decode_ab(model, B, a.rounds)


if __name__ == "__main__":
    main()

"""How many rows a product may have and still run faster as a fused reduction than as oneDNN's GEMM.

    python benchmarks/fused_rows.py --preset small --dtype bfloat16 --rows 1 4 --cases 2x1 4x1 1x2 1x3

``sparseek.model.fuse`` rewrites ``mm``/``addmm`` of up to ``rows`` rows as multiply + sum, which
inductor fuses with the code around it; the engine's compiled steps use ``FUSED_ROWS``
(``sparseek.engine.compile``). Each case ``BxT`` compiles the model's fixed-shape step
(``verify_step``: B rows x T tokens, T = 1 is the decode step) once per ``--rows`` value and times
them in alternating rounds of one process (this VM drifts +-25% within minutes), after a prompt of
``--context`` tokens. Reports each variant's min / median step time and its logits' relative error
against the eager step (bf16 with random weights rounds differently in every graph: compare the
rows' errors with each other, not with zero).
"""

from __future__ import annotations

import argparse
import time

import torch

import sparseek
from sparseek.model import build_model
from sparseek.model.fuse import fusing_backend


def _compiled(model, rows: int):
    """``model.verify_step`` compiled with its own code object, so variants do not share a cache entry."""
    ns = {"model": model}
    exec(f"def step_rows_{rows}(ids, cache):\n    return model.verify_step(ids, cache)[0]", ns)
    return torch.compile(ns[f"step_rows_{rows}"], dynamic=False, backend=fusing_backend(rows=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--cases", nargs="+", default=["2x1", "4x1", "1x2", "1x3"], help="BxT: rows x tokens per row")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()

    torch.manual_seed(0)
    model = build_model(sparseek.preset(a.preset), dtype=getattr(torch, a.dtype)).eval()
    with torch.no_grad():  # a trained model's scale, not init's near-zero output layers
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    print(f"{a.preset} {a.dtype}, context {a.context}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{a.rounds} alternating rounds of {a.reps} calls")
    with torch.inference_mode():
        for case in a.cases:
            _case(model, case, a)


def _case(model, case: str, a) -> None:
    B, T = map(int, case.split("x"))
    torch._dynamo.reset()
    cache = model.new_cache(B, a.context + 64)
    ids = torch.randint(3, model.args.vocab_size, (B, a.context + T))
    model(ids[:, :a.context], cache)
    x = ids[:, a.context:]
    steps = {}
    for rows in a.rows:
        t = time.time()
        steps[rows] = _compiled(model, rows)
        steps[rows](x, cache)
        cache.pos -= T
        print(f"  {B}x{T} rows={rows}: compiled in {time.time() - t:.0f} s", flush=True)
    times = {rows: [] for rows in a.rows}
    for _ in range(a.rounds):
        for rows, f in steps.items():
            t = time.perf_counter()
            for _ in range(a.reps):
                f(x, cache)
                cache.pos -= T
            times[rows].append((time.perf_counter() - t) / a.reps * 1e3)
    ref = model.verify_step(x, cache)[0].float()
    cache.pos -= T
    base = None
    for rows, f in steps.items():
        err = (f(x, cache).float() - ref).norm() / ref.norm()
        cache.pos -= T
        ms = sorted(times[rows])
        base = base or ms[len(ms) // 2]
        print(f"{B}x{T} ({B * T} rows per product) rows={rows}: min {ms[0]:6.2f} ms  median {ms[len(ms) // 2]:6.2f} ms"
              f"  {base / ms[len(ms) // 2]:.2f}x  rel err vs eager {err:.4f}", flush=True)


if __name__ == "__main__":
    main()

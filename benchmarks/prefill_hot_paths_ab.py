"""A/B of the compiled prefill's recent changes, each against the form before it, in one process.

    python benchmarks/prefill_hot_paths_ab.py --preset small --dtype bfloat16 --tokens 128

With ``compile_hot_paths()`` on, each part swaps one thing back and forth in alternating rounds
(this VM drifts +-15% within minutes, so separate processes cannot resolve a few percent):

* ``mhc-ops``: a block's mHC passes as the CPU ops (``cpu_kernels.hc_pre`` / ``hc_post``,
  ``csrc/cpu_mhc.cpp``, bf16 only) vs the compiled ``Block.attn_input`` / ``ffn_input`` / ``hc_post``;
* ``softmax-op``: the sparse attention's softmax as the CPU op (``csrc/cpu_attention.cpp``, bf16)
  vs inductor's loops inside the compiled ``attend_lse``;
* ``sinkhorn``: the mHC Sinkhorn as the CPU op (``csrc/cpu_mhc.cpp``) vs inductor's loops (with
  ``mhc-ops`` in use, bf16 prefills no longer run it: time it with ``--dtype float32``);
* ``compressor``: ``Compressor.chunk`` compiled whole vs only its projections compiled;
* ``router``: ``Gate.forward`` compiled vs eager;
* ``bands``: keys shared causally while every query sees position 0 vs sliding window bands.

Prints per part the median prefill time of each side, B/A per round and the largest logit
difference; then the compiled calls per prefill and the Sinkhorn op's own time.
"""

from __future__ import annotations

import argparse
import time

import torch

import sparseek
from sparseek.model import common, cpu_kernels, v4
from sparseek.model.fuse import fusing_backend


def _compiled(fn):
    return torch.compile(fn, backend=fusing_backend(emulate_precision_casts=True), **v4._recompile_limit())


def parts() -> dict:
    """name -> (A setters, B setters): (owner, attribute, value) to apply before a round."""
    no_op = lambda *args: False  # noqa: E731
    return {
        "mhc-ops": ([(cpu_kernels, "mhc_fits", no_op)], [(cpu_kernels, "mhc_fits", cpu_kernels.mhc_fits)]),
        "softmax-op": ([(cpu_kernels, "attn_softmax_fits", no_op)],
                       [(cpu_kernels, "attn_softmax_fits", cpu_kernels.attn_softmax_fits)]),
        "sinkhorn": ([(cpu_kernels, "sinkhorn_fits", no_op)],
                     [(cpu_kernels, "sinkhorn_fits", cpu_kernels.sinkhorn_fits)]),
        "compressor": ([(v4.Compressor, "chunk", v4.Compressor.chunk._torchdynamo_orig_callable),
                        (v4.Compressor, "project", _compiled(v4.Compressor.project))],
                       [(v4.Compressor, "chunk", v4.Compressor.chunk),
                        (v4.Compressor, "project", v4.Compressor.project)]),
        "router": ([(common.Gate, "forward", common.Gate.forward._torchdynamo_orig_callable)],
                   [(common.Gate, "forward", common.Gate.forward)]),
        "bands": ([(v4.Attention, "_bands", v4.Attention._sliding_bands)],
                  [(v4.Attention, "_bands", v4.Attention._bands)]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--parts", nargs="*", default=["mhc-ops", "softmax-op"],
                    choices=["mhc-ops", "softmax-op", "sinkhorn", "compressor", "router", "bands"])
    a = ap.parse_args()
    model, _ = sparseek.load(a.preset, dtype=getattr(torch, a.dtype), tokenizer=False)
    v4.compile_hot_paths()
    ids = torch.randint(10, model.args.vocab_size, (1, a.tokens), generator=torch.Generator().manual_seed(0))

    def run():
        return model(ids, model.new_cache(1, a.tokens + 1), last_n=1)

    print(f"{a.preset} {a.dtype}, {a.tokens}-token compiled prefill, {torch.get_num_threads()} threads, "
          f"AMX kernels {'on' if cpu_kernels.available() else 'off'}")
    table = parts()
    with torch.inference_mode():
        for name in a.parts:
            sides = dict(zip("AB", table[name]))
            logits, times = {}, {"A": [], "B": []}
            for k, setters in sides.items():  # warm-up: compiles each side's graphs
                for o, n, v in setters:
                    setattr(o, n, v)
                for _ in range(3):
                    logits[k] = run()
            for _ in range(a.rounds):
                for k, setters in sides.items():
                    for o, n, v in setters:
                        setattr(o, n, v)
                    ts = []
                    for _ in range(5):
                        t0 = time.perf_counter()
                        run()
                        ts.append(time.perf_counter() - t0)
                    times[k].append(sorted(ts)[2])
            for o, n, v in sides["B"]:  # B is the committed form
                setattr(o, n, v)
            med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
            ratios = sorted(b / x for x, b in zip(times["A"], times["B"]))
            print(f"{name:<11} A {med['A']:6.2f} ms  B {med['B']:6.2f} ms  B/A median {ratios[len(ratios) // 2]:.3f} "
                  f"(rounds {ratios[0]:.3f}-{ratios[-1]:.3f}), max |logits A - B| "
                  f"{(logits['A'] - logits['B']).abs().max().item():.3g}")
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as p:
            run()
        calls = sum(e.count for e in p.key_averages() if e.key.startswith("## Call CompiledFxGraph"))
        print(f"compiled calls per prefill: {calls}")
        if cpu_kernels.available():
            logits = torch.randn(a.tokens, 4, 4)
            for _ in range(10):
                cpu_kernels.sinkhorn(logits, 20, 1e-6)
            t0 = time.perf_counter()
            for _ in range(200):
                cpu_kernels.sinkhorn(logits, 20, 1e-6)
            print(f"Sinkhorn op, {a.tokens} tokens x 4 x 4, 20 iterations: {(time.perf_counter() - t0) / 200 * 1e6:.1f} us")


if __name__ == "__main__":
    main()

"""Where one compiled decode step (or one prefill) spends its time, and how fast a lone GEMV streams.

    python benchmarks/profile_decode.py --preset small --dtype bfloat16            # the engine's decode step
    python benchmarks/profile_decode.py --preset small --dtype bfloat16 --plain    # plain inductor, guarded
    python benchmarks/profile_decode.py --preset small --dtype bfloat16 --prefill 512 --hot-paths
    python benchmarks/profile_decode.py --inductor '{"cpp_wrapper": true}'         # extra inductor options

Prints ms per token, the torch profiler's top operators grouped by input shape (inductor kernels
named), the weight-streaming rate of one token's routed experts in the decode step's form and
in the one-contraction form it replaced, and that of the LM-head GEMV alone, as a library call and
as the fused reduction the compiled step uses (``sparseek.model.fuse``) -- the practical ceiling of
batch-1 decode on a CPU, lower than the copy bandwidth bench_engine.py uses for its roofline.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import sparseek
from sparseek.engine.compile import CompiledStep
from sparseek.model.fuse import fusing_backend


def per_call(fn, n: int) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def _experts_one_contraction(ex, x_ND, weights_NK, idx_NK):
    """The decode step's experts as one contraction over all top-k slots (the form
    ``Experts.forward_static`` replaced), for comparison."""
    from sparseek.model.common import swiglu

    gate = torch.einsum("nd,nkid->nki", x_ND, ex.w1[idx_NK])
    up = torch.einsum("nd,nkid->nki", x_ND, ex.w3[idx_NK])
    h = swiglu(gate, up, ex.limit, weights_NK[..., None], x_ND.dtype)
    return torch.einsum("nki,nkdi->nd", h, ex.w2[idx_NK])


def expert_rates(model, dtype):
    """Weight-streaming rate of one token's routed experts, compiled as in the decode step: one
    top-k slot at a time (``Experts.forward_static``) vs one contraction over the slots. Every
    layer's experts are run in turn so the weights do not stay in cache."""
    layers = [b.ffn.experts for b in model.layers]
    k, D = model.args.num_experts_per_tok, model.args.hidden_size
    x = torch.randn(1, D, dtype=dtype)
    w = torch.rand(1, k)
    idx = torch.randperm(layers[0].n)[:k][None]
    read = len(layers) * 3 * k * layers[0].w1[0].numel() * layers[0].w1.element_size()
    for name, f in (("per slot (decode step)", lambda ex: ex.forward_static(x, w, idx)),
                    ("one contraction", lambda ex: _experts_one_contraction(ex, x, w, idx))):
        fn = torch.compile(lambda: [f(ex) for ex in layers], dynamic=False, backend=fusing_backend())
        dt = per_call(fn, 30)
        print(f"routed experts of one token, {name}: {dt / len(layers) * 1e6:.0f} us/layer, "
              f"{read / dt / 1e9:.1f} GB/s of weights streamed")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefill", type=int, default=0, help="profile one prefill of this many tokens instead")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--inductor", default="{}",
                    help='extra inductor options for the decode step as JSON, e.g. \'{"cpp_wrapper": true}\'')
    ap.add_argument("--plain", action="store_true",
                    help="plain torch.compile of the step (library GEMVs, guards on every call) for comparison")
    ap.add_argument("--hot-paths", action="store_true", help="prefill with compile_hot_paths() (LLM(compile=True))")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))
    dtype = getattr(torch, a.dtype)
    import torch._inductor.config as inductor

    inductor.cpp.enable_kernel_profile = True  # name inductor's kernels in the profile
    model, _ = sparseek.load(a.preset, dtype=dtype, tokenizer=False)
    V = model.args.vocab_size
    with torch.inference_mode():
        if a.prefill:
            ids = torch.randint(10, V, (1, a.prefill))
            if a.hot_paths:
                from sparseek.model.v4 import compile_hot_paths

                compile_hot_paths()

            def run():
                return model(ids, model.new_cache(1, a.prefill + 1), last_n=1)
            dt = per_call(run, 3)
            print(f"prefill {a.prefill}: {dt * 1e3:.1f} ms ({a.prefill / dt:,.0f} tok/s)")
        else:
            cache = model.new_cache(1, 512)
            model(torch.randint(10, V, (1, 64)), cache)
            opts = json.loads(a.inductor)
            if a.plain:
                step = torch.compile(model.decode_step, dynamic=False, options=opts or None)
            else:
                step = CompiledStep(model.decode_step, "cpu", options=opts)
            tok = torch.randint(10, V, (1, 1))

            def run():
                return step(tok, cache)
            dt = per_call(run, 30)
            print(f"compiled decode step: {dt * 1e3:.2f} ms/token ({1 / dt:.1f} tok/s)")
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            for _ in range(1 if a.prefill else 10):
                run()
        print(p.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=60, max_shapes_column_width=60))
        expert_rates(model, dtype)
        W, x = model.head.weight, torch.randn(1, model.args.hidden_size, dtype=dtype)
        fused = torch.compile(F.linear, dynamic=False, backend=fusing_backend())
        for name, fn in (("library call", F.linear), ("fused reduction", fused)):
            dt = per_call(lambda: fn(x, W), 30)
            print(f"LM-head GEMV {tuple(W.shape)} {a.dtype}, {name}: {dt * 1e3:.2f} ms, "
                  f"{W.numel() * W.element_size() / dt / 1e9:.1f} GB/s of weights streamed")


if __name__ == "__main__":
    main()

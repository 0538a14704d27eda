"""Where one compiled decode step (or one prefill) spends its time, and how fast a lone GEMV streams.

    python benchmarks/profile_decode.py --preset small --dtype bfloat16            # decode step
    python benchmarks/profile_decode.py --preset small --dtype float32 --prefill 512
    python benchmarks/profile_decode.py --inductor '{"cpp_wrapper": true}' --skip-guards   # options tried

Prints ms per token, the torch profiler's top operators grouped by input shape (inductor kernels
named), and the weight-streaming rate of the LM-head GEMV alone -- the practical ceiling of
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


def per_call(fn, n: int) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefill", type=int, default=0, help="profile one prefill of this many tokens instead")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--inductor", default="{}",
                    help='torch.compile options for the decode step as JSON, e.g. \'{"cpp_wrapper": true}\'')
    ap.add_argument("--skip-guards", action="store_true",
                    help="skip dynamo's guard evaluation between steps (set_stance skip_guard_eval_unsafe)")
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

            def run():
                return model(ids, model.new_cache(1, a.prefill + 1), last_n=1)
            dt = per_call(run, 3)
            print(f"prefill {a.prefill}: {dt * 1e3:.1f} ms ({a.prefill / dt:,.0f} tok/s)")
        else:
            cache = model.new_cache(1, 512)
            model(torch.randint(10, V, (1, 64)), cache)
            step = torch.compile(model.decode_step, dynamic=False, options=json.loads(a.inductor))
            tok = torch.randint(10, V, (1, 1))

            def run():
                return step(tok, cache)
            if a.skip_guards:
                run()
                torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
            dt = per_call(run, 30)
            print(f"compiled decode step: {dt * 1e3:.2f} ms/token ({1 / dt:.1f} tok/s)")
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            for _ in range(1 if a.prefill else 10):
                run()
        print(p.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=60, max_shapes_column_width=60))
        W, x = model.head.weight, torch.randn(1, model.args.hidden_size, dtype=dtype)
        dt = per_call(lambda: F.linear(x, W), 30)
        print(f"LM-head GEMV {tuple(W.shape)} {a.dtype}: {dt * 1e3:.2f} ms, "
              f"{W.numel() * W.element_size() / dt / 1e9:.1f} GB/s of weights streamed")


if __name__ == "__main__":
    main()

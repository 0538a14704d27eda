"""One big FP4 expert layer in a forward over many tokens (prefill) on a CPU: every expert the
tokens picked decoded at once (as before the thirtieth session) against in groups of at most
``DECODE_BUDGET_BYTES`` decoded (``QuantExperts._in_groups``, 1 GiB): time per forward and the
peak memory the forward adds.

    python benchmarks/quant_big_layer.py > benchmarks/results/cpu-quant-big-layer.txt

A real model's layer is bigger still (V4-Flash: 256 experts of 3 x 2048 x 4096, 12.9 GB decoded
in bf16); the default here (64 experts, 3.2 GB decoded) fits this 24 GB machine. Each setting runs
in its own process (peak resident memory only grows); they alternate, best of each (the first
call of each process compiles the decoders and is left out). ``groups-thp``: the same as
``groups`` with glibc's allocations advised onto transparent huge pages
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc >= 2.35; the kernel's THP mode must be
``always`` or ``madvise``): each fresh decoded buffer then faults in 2 MB pages, not 4 KB ones.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def one(mode: str, a) -> dict:
    from sparseek.quant import QuantExperts, formats, modules

    formats.compile_decoders()
    if mode == "one-pass":  # every expert the tokens picked decoded at once
        modules.DECODE_BUDGET_BYTES = 1 << 62
    torch.manual_seed(0)
    # random codes (any byte is two valid e2m1 codes) and scales of 2^-7: no dense copy is ever
    # made, so the peak below is the forward's own
    q = QuantExperts(a.experts, a.dim, a.inter, limit=7.0, fmt="fp4")
    for name in ("w1", "w2", "w3"):
        getattr(q, name).copy_(torch.randint(0, 256, getattr(q, name).shape, dtype=torch.uint8))
        getattr(q, f"{name}_scale").fill_(120)
    x = torch.randn(a.tokens, a.dim, dtype=torch.bfloat16)
    w = torch.rand(a.tokens, a.topk)
    idx = torch.rand(a.tokens, a.experts).topk(a.topk, dim=-1).indices
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    with torch.inference_mode():
        for _ in range(a.calls):
            t = time.perf_counter()
            y = q(x, w, idx)
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"mode": mode, "s": min(times[1:]) if len(times) > 1 else times[0], "first_s": times[0],
            "peak_mb": peak, "checksum": float(y.float().abs().sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a)))
        return
    decoded = a.experts * 3 * a.dim * a.inter * 2
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; {a.experts} FP4 experts of "
          f"3 x {a.inter} x {a.dim} ({decoded / 2**30:.1f} GiB decoded in bf16), {a.tokens} tokens, top-{a.topk}")
    best = {}
    for _ in range(a.rounds):
        for mode in ("one-pass", "groups", "groups-thp"):
            env = dict(os.environ)
            if mode == "groups-thp":  # glibc >= 2.35: its allocations madvise()d for huge pages
                env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
            r = json.loads(subprocess.run([sys.executable, __file__, "--one", mode, *sys.argv[1:]], env=env,
                                          capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            print(json.dumps(r), flush=True)
            if mode not in best or r["s"] < best[mode]["s"]:
                best[mode] = r
    f, g, h = best["one-pass"], best["groups"], best["groups-thp"]
    print(f"one pass:           {f['s'] * 1e3:6.0f} ms per forward, +{f['peak_mb']:6.0f} MB peak")
    print(f"groups (<= 1 GiB):  {g['s'] * 1e3:6.0f} ms per forward, +{g['peak_mb']:6.0f} MB peak"
          f"  ({f['s'] / g['s']:.2f}x the speed, {f['peak_mb'] / max(g['peak_mb'], 1):.1f}x less memory)")
    print(f"groups, huge pages: {h['s'] * 1e3:6.0f} ms per forward, +{h['peak_mb']:6.0f} MB peak"
          f"  ({f['s'] / h['s']:.2f}x the speed of one pass; GLIBC_TUNABLES=glibc.malloc.hugetlb=1)")


if __name__ == "__main__":
    main()

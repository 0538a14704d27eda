"""Peak memory and time of one prefill as the prompt grows: sparseek (linear) vs transformers (quadratic).

    python benchmarks/prefill_memory.py --preset small --lengths 512 1024 2048 4096 8192 \
        --out benchmarks/results/cpu-small-prefill-memory

Each (implementation, length) runs in a fresh process; peak memory is the resident-set high-water
mark (or CUDA max allocated) above what loading the weights took. Writes JSON, Markdown and a PNG.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_engine import _load, _peak_mb, _sync  # noqa: E402


def one(impl: str, ckpt: str, device: str, T: int, q) -> None:
    try:
        model = _load(impl, ckpt, device, torch.float32)
        vocab = model.config.vocab_size if impl == "transformers" else model.args.vocab_size
        ids = torch.randint(10, vocab, (1, T), device=device)
        base = _peak_mb(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if impl == "sparseek":
                model(ids, model.new_cache(1, T + 1), last_n=1)
            else:
                model(ids, use_cache=True, logits_to_keep=1)
        _sync(device)
        q.put({"seconds": time.perf_counter() - t0, "peak_mb": _peak_mb(device) - base})
    except Exception as e:
        q.put({"error": f"{type(e).__name__}: {str(e)[:200]}"})


def in_subprocess(fn, *args, timeout: float) -> dict:
    """``fn(*args, queue)`` in a fresh process (its own memory high-water mark) -> the dict it put."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(*args, q))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        return {"error": f"timeout after {timeout}s"}
    return q.get() if not q.empty() else {"error": f"exit code {p.exitcode} (out of memory?)"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--impls", nargs="+", default=["sparseek", "transformers"])
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import sparseek
    from sparseek.model import build_model

    args = sparseek.preset(a.preset, clamp_shared_expert=True)
    tmp = tempfile.mkdtemp(prefix="bench-mem-")
    m = build_model(args)
    m.init_weights(seed=0)
    sparseek.save(m, tmp)
    del m
    rows = []
    for T in a.lengths:
        row = {"T": T}
        for impl in a.impls:
            row[impl] = in_subprocess(one, impl, tmp, a.device, T, timeout=a.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"preset": a.preset, "device": a.device, "command": " ".join(["python"] + sys.argv), "rows": rows}
    md = [f"# Prefill peak memory and time vs prompt length: `{a.preset}` on {a.device}", "",
          f"Command: `{res['command']}`", "",
          "| tokens | sparseek s | sparseek +MB | transformers s | transformers +MB |", "|---|---|---|---|---|"]
    for r in rows:
        s, t = r.get("sparseek", {}), r.get("transformers", {})
        md.append(f"| {r['T']} | {_v(s, 'seconds')} | {_v(s, 'peak_mb')} | {_v(t, 'seconds')} | {_v(t, 'peak_mb')} |")
    print("\n".join(md))
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out + ".json", "w") as f:
            json.dump(res, f, indent=2)
        with open(a.out + ".md", "w") as f:
            f.write("\n".join(md) + "\n")
        _plot(rows, a.out + ".png")


def _v(d, k):
    if k in d:
        return f"{d[k]:.2f}" if k == "seconds" else f"{d[k]:.0f}"
    return d.get("error", "-")[:40]


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for impl in ("sparseek", "transformers"):
        pts = [(r["T"], r[impl]) for r in rows if impl in r and "peak_mb" in r[impl]]
        if pts:
            ax[0].plot([p[0] for p in pts], [p[1]["peak_mb"] for p in pts], "o-", label=impl)
            ax[1].plot([p[0] for p in pts], [p[1]["seconds"] for p in pts], "o-", label=impl)
    ax[0].set_title("peak memory above weights (MB)")
    ax[1].set_title("prefill time (s)")
    for x in ax:
        x.set_xlabel("prompt tokens")
        x.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

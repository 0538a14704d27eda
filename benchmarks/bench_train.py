"""Training steps, sparseek vs transformers on the same checkpoint: tokens/s, MFU, memory.

    python benchmarks/bench_train.py --preset small --seq 512 2048 --out benchmarks/results/cpu-small-train

One forward + backward per step (no optimizer: what transformers' baseline in anchors §2 times),
cross-entropy on next tokens, the same random batches for every implementation. Each
(implementation, length) runs in a fresh process, so its peak memory is its own: the resident-set
high-water mark (CUDA: max allocated) above the loaded weights, and the bytes autograd keeps for
backward (distinct storages, weights excluded). Implementations:

* ``sparseek``: the default training path (attention recomputes its probabilities in backward);
* ``sparseek-autograd``: plain autograd through the attention (``v4.recompute_attention = False``);
* ``sparseek-compiled``: the default with ``compile_hot_paths()`` (``sparseek train --compile``);
* ``sparseek-indexer-loss``: the default plus the lightning indexers' KL loss (``sparseek train
  --indexer-loss``; the mean loss column stays the language-model loss);
* ``sparseek-logits``: the default with the loss computed from materialized [tokens, vocab] fp32
  logits (``F.cross_entropy(model(x))``) instead of the fused head + loss ``model(x,
  targets=y)`` that every other sparseek row and ``sparseek train`` run (``model/loss.py``);
* ``sparseek-plain-pointwise``: SwiGLU, RMSNorm and mHC's two sides through plain autograd
  (``common.recompute_pointwise = False``; the default keeps their inputs and recomputes them in
  backward when activations are half precision);
* ``transformers``: ``DeepseekV4ForCausalLM`` (its eager attention over dense masks).

MFU counts the active-parameter and attention FLOPs of ``training_flops_per_token`` against the
matmul rate measured at the start of the run (bf16 on a GPU, the run's dtype on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_engine import _load, _peak_mb, _sync  # noqa: E402
from prefill_memory import in_subprocess  # noqa: E402

IMPLS = ["sparseek", "sparseek-autograd", "sparseek-compiled", "sparseek-indexer-loss", "sparseek-logits",
         "sparseek-plain-pointwise", "transformers"]


def saved_bytes_hooks(exclude: set[int]):
    """Context manager counting the distinct storages autograd saves (``exclude``: data pointers
    of the weights) -> (hooks, dict of pointer -> bytes)."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude:
            seen[st.data_ptr()] = st.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), seen


def one(impl: str, ckpt: str, device: str, dtype_name: str, batch: int, T: int, steps: int, gpu_blocks: bool,
        limit_gb: float | None, q) -> None:
    try:
        if limit_gb:  # an allocation past it fails in this process instead of waking the OOM killer
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (int(limit_gb * 2**30),) * 2)
        torch.manual_seed(0)
        dtype = getattr(torch, dtype_name)
        if impl.startswith("sparseek"):
            from sparseek.model import base as model_base, v4
            from sparseek.utils import tune_malloc

            tune_malloc()  # what the trainer does
            if gpu_blocks:  # a GPU's attention blocks (512 queries, 16x the budget) on any device
                gpu = torch.device("cuda")
                v4.query_block, v4.attn_block_budget = (lambda d: model_base.query_block(gpu)), (
                    lambda d: model_base.attn_block_budget(gpu))
            v4.recompute_attention = impl != "sparseek-autograd"
            from sparseek.model import common

            common.recompute_pointwise = impl != "sparseek-plain-pointwise"
            if impl == "sparseek-compiled":
                v4.compile_hot_paths()
        model = _load(impl, ckpt, device, dtype).train()
        # the lightning indexers' own KL loss (sparseek train --indexer-loss): what it costs
        learners = v4.indexer_learners(model) if impl == "sparseek-indexer-loss" else []
        vocab = model.config.vocab_size if impl == "transformers" else model.args.vocab_size
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        base = _peak_mb(device)
        g = torch.Generator().manual_seed(1)
        batches = [torch.randint(10, vocab, (batch, T + 1), generator=g).to(device) for _ in range(steps + 2)]
        ce = torch.nn.functional.cross_entropy

        def step(x, count=False):
            x, y = x[:, :-1], x[:, 1:]
            hooks, seen = saved_bytes_hooks(weights)
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                with hooks if count else contextlib.nullcontext():
                    for a in learners:
                        a.learn_indexer = True
                    if impl in ("transformers", "sparseek-logits"):
                        logits = model(input_ids=x).logits if impl == "transformers" else model(x)
                        loss = ce(logits.flatten(0, 1).float(), y.flatten())
                    else:
                        loss = model(x, targets=y)
            extra = sum((a.indexer_loss for a in learners if a.indexer_loss is not None), loss.new_zeros(()))
            (loss + extra).backward()
            model.zero_grad(set_to_none=True)
            return sum(seen.values()), float(loss.detach())

        step(batches[0])  # warm-up (compiles, allocates)
        saved, _ = step(batches[1], count=True)
        _sync(device)
        t0 = time.perf_counter()
        losses = [step(x)[1] for x in batches[2:]]
        _sync(device)
        dt = (time.perf_counter() - t0) / steps
        q.put({"tokens_per_s": batch * T / dt, "step_s": dt, "peak_mb": _peak_mb(device) - base,
               "saved_mb": saved / 2**20, "loss": sum(losses) / len(losses)})
    except Exception as e:
        q.put({"error": f"{type(e).__name__}: {str(e)[:200]}"})


def matmul_rate(device: str, dtype) -> float:
    """FLOP/s of a large square matmul in ``dtype`` (the MFU denominator)."""
    n = 2048 if device == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(5 if device == "cpu" else 20):  # the best of several: a busy moment only slows some
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="weights' dtype (default: float32 on a CPU, bfloat16 on a GPU)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=IMPLS)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="override preset fields (JSON values), e.g. num_attention_heads=64 head_dim=512")
    ap.add_argument("--memory-limit-gb", type=float, default=None,
                    help="address-space cap per measurement (CPU): a run that needs more reports an error")
    ap.add_argument("--gpu-blocks", action="store_true",
                    help="sparseek's attention blocks as on a GPU (to see a GPU's memory on a CPU)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import sparseek
    from sparseek.model import build_model
    from sparseek.train.trainer import training_flops_per_token

    dtype_name = a.dtype or ("float32" if a.device == "cpu" else "bfloat16")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    args = sparseek.preset(a.preset, clamp_shared_expert=True, **overrides)
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    m = build_model(args)
    m.init_weights(seed=0)
    sparseek.save(m, tmp)
    counts = m.param_counts()
    del m
    peak = matmul_rate(a.device, torch.bfloat16 if a.device != "cpu" else getattr(torch, dtype_name))
    rows = []
    for T in a.seq:
        row = {"seq": T, "flops_per_token": training_flops_per_token(args, T)}
        for impl in a.impls:
            r = in_subprocess(one, impl, tmp, a.device, dtype_name, a.batch, T, a.steps, a.gpu_blocks,
                              a.memory_limit_gb, timeout=a.timeout)
            if "tokens_per_s" in r:
                r["mfu"] = r["tokens_per_s"] * row["flops_per_token"] / peak
            row[impl] = r
            print(json.dumps({"seq": T, impl: r}), flush=True)
        rows.append(row)
    import transformers

    res = {"preset": a.preset, "device": a.device, "dtype": dtype_name, "batch": a.batch, "steps": a.steps,
           "matmul_flops": peak, "params": counts, "torch": torch.__version__,
           "transformers": transformers.__version__, "machine": platform.processor() or platform.machine(),
           "overrides": overrides, "gpu_blocks": a.gpu_blocks, "memory_limit_gb": a.memory_limit_gb, "command": " ".join(["python"] + sys.argv),
           "rows": rows}
    md = report(res, a.impls)
    print(md)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out + ".json", "w") as f:
            json.dump(res, f, indent=2)
        with open(a.out + ".md", "w") as f:
            f.write(md + "\n")


def report(res: dict, impls: list[str]) -> str:
    c = res["params"]
    lines = [f"# Training step (forward + backward): `{res['preset']}` on {res['device']} ({res['dtype']}, "
             f"torch {res['torch']}, transformers {res['transformers']})", "",
             f"Command: `{res['command']}`", "",
             *([f"Preset fields overridden: {res['overrides']}.", ""] if res.get("overrides") else []),
             *(["sparseek's attention runs in a GPU's blocks (512 queries, 16x the CPU budget).", ""]
               if res.get("gpu_blocks") else []),
             *([f"Each measurement may use at most {res['memory_limit_gb']:g} GB of address space.", ""]
               if res.get("memory_limit_gb") else []),
             f"Parameters: {c['total'] / 1e6:.1f}M total, {c['active'] / 1e6:.1f}M active. Batch {res['batch']}, "
             f"mean of {res['steps']} steps after a warm-up. Matmul rate measured: "
             f"{res['matmul_flops'] / 1e9:,.0f} GFLOP/s. +peak MB: memory high-water mark above the loaded "
             "weights; saved MB: what autograd keeps for backward (weights excluded).", "",
             "| seq | implementation | tokens/s | vs transformers | MFU | +peak MB | saved MB | mean loss |",
             "|---|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        ref = row.get("transformers", {}).get("tokens_per_s")
        for impl in impls:
            r = row.get(impl, {})
            if "error" in r:
                lines.append(f"| {row['seq']} | {impl} | {r['error'][:60]} | | | | | |")
                continue
            ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
            lines.append(f"| {row['seq']} | {impl} | {r['tokens_per_s']:,.0f} | {ratio} | {100 * r['mfu']:.0f}% | "
                         f"{r['peak_mb']:,.0f} | {r['saved_mb']:,.0f} | {r['loss']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

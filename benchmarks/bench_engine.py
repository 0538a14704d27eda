"""sparseek vs transformers on the same weights: prefill, decode (batch 1 and N), memory, cache size.

    python benchmarks/bench_engine.py --preset small --out benchmarks/results/cpu-small

Each measurement runs in a fresh subprocess (so peak memory is that phase's own), on one
checkpoint written once and loaded by both implementations. Prints a table of tokens/s, ratios
and the roofline fraction (bytes that must be read per decoded token / measured bandwidth), and
writes it as JSON + Markdown.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time

import torch


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def emit(text: str, out: str | None) -> None:
    """Print a benchmark's report and, given a path, write it there (the committed result)."""
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def _peak_mb(device) -> float:
    from sparseek.utils import peak_memory_bytes

    return peak_memory_bytes(device) / 2**20


def _load(impl: str, ckpt: str, device: str, dtype):
    if impl.startswith("sparseek"):
        import sparseek

        # "sparseek-fp8" / "sparseek-fp4": weights kept quantized in memory (sparseek.quant), the
        # routed experts in that format and the other linear layers in FP8
        quantize = next((q for q in ("fp8", "fp4") if f"-{q}" in impl), None)
        if impl.endswith("-libgemm"):  # the library GEMMs where sparseek's AMX expert kernel would run
            from sparseek.model import cpu_kernels

            cpu_kernels._state = False
        model, _ = sparseek.load(ckpt, dtype=dtype, device=device, tokenizer=False, quantize=quantize)
        return model
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()


def phase(impl: str, what: str, ckpt: str, device: str, dtype_name: str, T: int, batch: int, new: int, q):
    """One measurement in its own process: returns (tokens/s, peak MB, extra)."""
    try:
        torch.manual_seed(0)
        dtype = getattr(torch, dtype_name)
        model = _load(impl, ckpt, device, dtype)
        base_mem = _peak_mb(device)  # peaks are reported above what loading the weights took
        vocab = model.config.vocab_size if impl == "transformers" else model.args.vocab_size
        sparse = impl.startswith("sparseek")
        compiled = "-compiled" in impl
        ids = torch.randint(10, vocab, (batch, T), device=device)
        extra = {"weights_mb": _tensor_bytes(list(model.parameters()) + list(model.buffers())) / 2**20}
        with torch.inference_mode():
            if what == "prefill":
                if compiled:  # what LLM(compile=True) does for prefill
                    from sparseek.model.v4 import compile_hot_paths
                    from sparseek.quant.formats import compile_decoders

                    compile_hot_paths()
                    compile_decoders()  # FP8 / FP4 weights decoded whole by one kernel per matrix

                def run():
                    if sparse:
                        cache = model.new_cache(batch, T + 1)
                        return model(ids, cache, last_n=1)
                    return model(ids, use_cache=True, logits_to_keep=1)

                run()
                _sync(device)
                base_mem = _peak_mb(device)
                t0 = time.perf_counter()
                reps = 0
                while reps < 2 or time.perf_counter() - t0 < 3:
                    run()
                    reps += 1
                _sync(device)
                rate = batch * T * reps / (time.perf_counter() - t0)
            else:  # decode `new` tokens after a T-token prompt, greedy
                # time(new tokens) - time(1 token): both include the same prefill, which cancels
                if sparse:
                    from sparseek.engine import LLM, SamplingParams

                    # "sparseek-compiled": the torch.compile'd static decode step (compiled in the warm-up)
                    llm = LLM(model, None, max_batch_size=batch, max_seq_len=T + new + 16, compile=compiled)
                    prompts = [r.tolist() for r in ids]

                    def gen(n):
                        sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
                        return llm.generate(prompts, sp)
                else:
                    model.generation_config.pad_token_id = 0

                    def gen(n):
                        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                              return_dict_in_generate=True)

                gen(4)
                base_mem = _peak_mb(device)
                t0 = time.perf_counter()
                gen(1)
                _sync(device)
                t1 = time.perf_counter()
                out = gen(new)
                _sync(device)
                t2 = time.perf_counter()
                rate = batch * (new - 1) / max((t2 - t1) - (t1 - t0), 1e-9)
                extra["cache_bytes"] = llm._cache.nbytes() if sparse else _tensor_bytes(out.past_key_values)
        q.put({"tokens_per_s": rate, "peak_mb": _peak_mb(device) - base_mem, **extra})
    except Exception as e:  # report, don't hang the parent
        q.put({"error": f"{type(e).__name__}: {e}"})


def _tensor_bytes(obj, seen=None) -> int:
    seen = seen if seen is not None else set()
    if isinstance(obj, torch.Tensor):
        if obj.data_ptr() in seen:
            return 0
        seen.add(obj.data_ptr())
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o, seen) for o in obj.values())
    if hasattr(obj, "__dict__"):
        return sum(_tensor_bytes(o, seen) for o in vars(obj).values())
    return 0


def run_phase(*a) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=phase, args=(*a, q))
    p.start()
    p.join(timeout=1800)
    if p.is_alive():
        p.kill()
        return {"error": "timeout"}
    return q.get() if not q.empty() else {"error": f"exit code {p.exitcode}"}


def bandwidth_gbs(device: str) -> float:
    x = torch.empty(64 << 20, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 1.0:
        y.copy_(x)
        n += 1
    _sync(device)
    return 2 * x.numel() * 4 * n / (time.perf_counter() - t0) / 1e9  # read + write


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prefill", type=int, nargs="*", default=[512], help="prompt lengths to prefill (none: decode only)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8], help="decode batch sizes (none: prefill only)")
    ap.add_argument("--impls", nargs="+", default=["sparseek", "transformers"],
                    help="sparseek, sparseek-compiled (LLM(compile=True): compiled decode step, mHC hot paths), "
                         "transformers; sparseek-fp8 / sparseek-fp4 (-compiled): weights kept quantized in memory; "
                         "a -libgemm suffix: without the AMX expert kernel (sparseek/model/cpu_kernels.py)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds per phase (alternating implementations; best kept)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import sparseek
    from sparseek.model import build_model
    from sparseek.model.cache import cache_bytes

    args = sparseek.preset(a.preset, clamp_shared_expert=True)  # the computation transformers does
    tmp = tempfile.mkdtemp(prefix="bench-")
    model = build_model(args, dtype=getattr(torch, a.dtype))
    model.init_weights(seed=0)
    sparseek.save(model, tmp)
    counts = model.param_counts()
    del model

    results = {"preset": a.preset, "device": a.device, "dtype": a.dtype, "torch": torch.__version__,
               "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "params": counts, "rows": []}
    bw = bandwidth_gbs(a.device)
    results["bandwidth_gbs"] = bw
    elt = torch.tensor([], dtype=getattr(torch, a.dtype)).element_size()
    def measure(row, *phase_args):
        # implementations alternate, `--repeat` rounds; each keeps its fastest round (a shared
        # machine's slow spells then hit both sides alike instead of deciding the ratio)
        for _ in range(a.repeat):
            for impl in a.impls:
                got = run_phase(impl, *phase_args)
                best = row.get(impl)
                if best is None or got.get("tokens_per_s", 0) > best.get("tokens_per_s", 0):
                    row[impl] = got

    for T in a.prefill:
        row = {"phase": f"prefill {T}", "batch": 1}
        measure(row, "prefill", tmp, a.device, a.dtype, T, 1, 0)
        results["rows"].append(row)
        print(_fmt(row), flush=True)
    for B in a.batch:
        row = {"phase": f"decode (prompt {a.prompt})", "batch": B}
        measure(row, "decode", tmp, a.device, a.dtype, a.prompt, B, a.new)
        # roofline: every decode step reads the active weights once (shared by the batch) plus each
        # row's cache; embedding rows are one row per token, the head is read whole
        active_bytes = (counts["active"] + args.hidden_size * args.vocab_size) * elt
        ctx = a.prompt + a.new // 2
        cache_read = cache_bytes(args, ctx, getattr(torch, a.dtype))["total_bytes"]
        roof = bw * 1e9 / (active_bytes + B * cache_read) * B
        row["roofline_tokens_per_s"] = roof
        results["rows"].append(row)
        print(_fmt(row), flush=True)
    results["analytic_cache_bytes_per_token"] = cache_bytes(args, 4096, getattr(torch, a.dtype))["bytes_per_token"]
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out + ".json", "w") as f:
            json.dump(results, f, indent=2)
        with open(a.out + ".md", "w") as f:
            f.write(to_markdown(results, " ".join(sys.argv)))
    print(to_markdown(results, " ".join(sys.argv)))


def _fmt(row) -> str:
    return json.dumps(row)


def to_markdown(r: dict, command: str) -> str:
    lines = [f"# sparseek vs transformers: `{r['preset']}` on {r['device']} ({r['dtype']}, torch {r['torch']}, "
             f"{r['threads']} threads)", "", f"Command: `{command}`", "",
             f"Parameters: {r['params']['total'] / 1e6:.1f}M total, {r['params']['active'] / 1e6:.1f}M active "
             f"(+ {r['params']['embedding'] / 1e6:.1f}M embedding). Measured copy bandwidth "
             f"{r['bandwidth_gbs']:.1f} GB/s. Peak memory is what a phase adds above the loaded weights "
             "(CPU: resident-set high-water mark; it only grows, so a phase that needs little shows ~0).", "",
             "| phase | batch | sparseek tok/s | transformers tok/s | ratio | sparseek +peak MB | transformers +peak MB "
             "| roofline tok/s | sparseek % of roofline | weights MB (sparseek / transformers) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        for impl in [k for k in row if k.startswith("sparseek")]:
            s, t = row[impl], row.get("transformers", {})
            sv, tv = s.get("tokens_per_s"), t.get("tokens_per_s")
            ratio = f"{sv / tv:.1f}x" if sv and tv else "-"
            # the roofline counts the dense weights' bytes: it does not bound a quantized variant
            roof = row.get("roofline_tokens_per_s") if "-fp" not in impl else None
            frac = f"{100 * sv / roof:.1f}%" if sv and roof else "-"
            variant = impl[len("sparseek-"):].replace("-", ", ")
            name = row["phase"] + (f" ({variant})" if variant else "")
            lines.append(f"| {name} | {row['batch']} | {_n(sv, s)} | {_n(tv, t)} | {ratio} | "
                         f"{_n(s.get('peak_mb'))} | {_n(t.get('peak_mb'))} | {_n(roof)} | {frac} | "
                         f"{_n(s.get('weights_mb'))} / {_n(t.get('weights_mb'))} |")
    lines += ["", f"Analytic cache bytes/token (sparseek, {r['dtype']}): {r['analytic_cache_bytes_per_token']:.0f}"]
    for row in r["rows"]:
        if "cache_bytes" in row.get("sparseek", {}) and "cache_bytes" in row.get("transformers", {}):
            lines.append(f"- {row['phase']} batch {row['batch']}: cache held sparseek "
                         f"{row['sparseek']['cache_bytes'] / 2**20:.1f} MiB (preallocated for the whole run), "
                         f"transformers {row['transformers']['cache_bytes'] / 2**20:.1f} MiB")
    return "\n".join(lines) + "\n"


def _n(v, d=None) -> str:
    if v is None:
        return (d or {}).get("error", "-")[:60] if d else "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


if __name__ == "__main__":
    main()

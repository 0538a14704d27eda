"""sparseek vs llama.cpp on the CPU, on the same weights: one GGUF file run by both.

    pip install llama-cpp-python   # builds llama.cpp (a few minutes); not a sparseek dependency
    python benchmarks/bench_llamacpp.py --preset small --prompt 512 --max-tokens 64 \
        --out benchmarks/results/cpu-small-llamacpp.txt

llama.cpp is the reference for DeepSeek models on CPUs, and since its deepseek4 architecture it
runs V4 (``benchmarks/gguf_llamacpp.py`` checks that its logits equal sparseek's). The preset's
random weights are written with ``save_gguf`` in F32, BF16 and Q8_0; llama.cpp runs each file,
sparseek runs the F32 and BF16 ones (it decodes Q8_0 on load, so it has no Q8_0 row of its own).
Per row: prefill time of a ``--prompt``-token prompt, batch-1 greedy decode tokens/s (the fastest
of ``--rounds`` after a warm-up), and the weight bytes a decode step reads per second (active
parameters x bytes per weight / time per token: the roofline's numerator), with the ratio of
sparseek's decode rate to llama.cpp's on the same file. Both use every core (2 here). llama.cpp's
CPU "extra" weight buffers are off (they abort on DeepSeek files on AMX CPUs; see
``gguf_llamacpp.py``), which costs it its repacked Q8_0 / AMX kernels on this host.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

import sparseek
from sparseek.checkpoint.gguf import save_gguf

try:
    import llama_cpp
except ImportError:
    sys.exit("this benchmark needs llama.cpp's Python binding: pip install llama-cpp-python")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_llamacpp import _no_extra_buffers  # noqa: E402


def llama_row(path: str, prompt: list[int], n: int, rounds: int) -> tuple[float, float]:
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + n + 8, n_batch=512, n_ubatch=512, n_threads=os.cpu_count(),
                          n_threads_batch=os.cpu_count(), verbose=False)
    n_vocab = llm.n_vocab()
    best_prefill, best_decode = float("inf"), float("inf")
    for r in range(rounds + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(n):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
            llm.eval([int(logits.argmax())])
        t2 = time.perf_counter()
        if r:  # the first round warms up
            best_prefill, best_decode = min(best_prefill, t1 - t0), min(best_decode, (t2 - t1) / n)
    del llm
    return best_prefill, best_decode


def sparseek_row(path: str, dtype: str, prompt: list[int], n: int, rounds: int, compile_: bool) -> tuple[float, float]:
    from sparseek.engine import LLM, SamplingParams

    # one row: the compiled step runs max_batch_size rows whatever the batch
    llm = LLM(path, dtype=dtype, compile=compile_, max_batch_size=1, max_seq_len=len(prompt) + n + 8,
              prefix_cache_bytes=0)
    first = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    full = SamplingParams(max_tokens=n + 1, temperature=0, ignore_eos=True)
    best_prefill, best_full = float("inf"), float("inf")
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        llm.generate([prompt], first)
        t1 = time.perf_counter()
        llm.generate([prompt], full)
        t2 = time.perf_counter()
        if r:
            best_prefill, best_full = min(best_prefill, t1 - t0), min(best_full, t2 - t1)
    return best_prefill, (best_full - best_prefill) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    _no_extra_buffers()
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    torch.manual_seed(0)
    model, tok = sparseek.load(a.preset)
    args = model.args
    active = args.num_params()["active"]  # without the embedding table, idle experts and the MTP block
    say(f"sparseek {sparseek.__version__} (torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}); llama-cpp-python {llama_cpp.__version__}")
    say(f"command: python benchmarks/bench_llamacpp.py --preset {a.preset} --prompt {a.prompt} "
        f"--max-tokens {a.max_tokens} --rounds {a.rounds}" + (f" --out {a.out}" if a.out else ""))
    say(f"model: {a.preset} ({args.num_hidden_layers} layers, {args.n_routed_experts} experts top-"
        f"{args.num_experts_per_tok}), {active / 1e6:.1f}M parameters read per token (embedding table, idle experts, MTP excluded); "
        f"prompt {a.prompt} random tokens, {a.max_tokens} greedy tokens")
    tmp = tempfile.mkdtemp(prefix="bench-llamacpp-")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, args.vocab_size, (a.prompt,), generator=g).tolist()
    files = {}
    for qtype in ("f32", "bf16", "q8_0"):
        files[qtype] = os.path.join(tmp, f"{a.preset}-{qtype}.gguf")
        save_gguf(model, files[qtype], tokenizer=tok, qtype=qtype)
    del model
    bytes_per = {"f32": 4.0, "bf16": 2.0, "q8_0": 34 / 32}
    say(f"\n{'engine':<30} {'file':<6} {'prefill s':>9} {'prefill tok/s':>13} {'decode tok/s':>12} {'GB/s':>6} "
        f"{'decode vs llama.cpp':>19}")
    ref = {}
    rows = [("llama.cpp", q, None, None) for q in ("f32", "bf16", "q8_0")]
    rows += [("sparseek eager", "f32", "float32", False), ("sparseek compiled", "f32", "float32", True),
             ("sparseek eager", "bf16", "bfloat16", False), ("sparseek compiled", "bf16", "bfloat16", True)]
    for engine, q, dtype, compile_ in rows:
        if engine == "llama.cpp":
            pre, dec = llama_row(files[q], prompt, a.max_tokens, a.rounds)
            ref[q] = dec
        else:
            pre, dec = sparseek_row(files[q], dtype, prompt, a.max_tokens, a.rounds, compile_)
        gbs = active * bytes_per[q] / dec / 1e9
        ratio = f"{ref[q] / dec:.2f}x" if engine != "llama.cpp" else ""
        say(f"{engine:<30} {q:<6} {pre:>9.3f} {a.prompt / pre:>13.0f} {1 / dec:>12.1f} {gbs:>6.2f} {ratio:>19}")
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

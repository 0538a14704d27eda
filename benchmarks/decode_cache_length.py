"""Does batch-1 decode slow down with the preallocated cache's length, at the same context?

    python benchmarks/decode_cache_length.py --preset small --dtype bfloat16 \
        --rows 64:160 64:4096 64:32768 64:32768:whole 512:640 3000:32768 3000:32768:whole \
        --out benchmarks/results/cpu-small-decode-cache-length.txt

Each row (PROMPT:MAX_SEQ_LEN, or PROMPT:MAX_SEQ_LEN:whole for a step that reads the whole cache
rather than the engine's span of it -- the engine before spans) runs in its own process: ``LLM(compile=True, max_batch_size=1)``,
random prompt, greedy decode of ``--new`` tokens, the fastest of two timed rounds after a warm-up
(decode time = full run minus a first-token-only run). With a 128-token window and compressed
entries, what a step attends to does not grow with ``max_seq_len``; its cost should not either.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

_CHILD = """
import sys, time, torch, sparseek
from sparseek.engine import LLM, SamplingParams
preset, dtype, prompt_len, msl, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model, tok = sparseek.load(preset, dtype=dtype)
llm = LLM(model, tok, max_batch_size=1, max_seq_len=msl, compile=True, prefix_cache_bytes=0)
if sys.argv[6] == "whole":
    llm._spans = None  # the step's fixed shapes: every compressed entry the cache can hold
prompt = torch.randint(2, model.args.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
first = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
full = SamplingParams(max_tokens=n + 1, temperature=0, ignore_eos=True)
best = float("inf")
for r in range(3):
    t0 = time.perf_counter(); llm.generate([prompt], first); t1 = time.perf_counter()
    llm.generate([prompt], full); t2 = time.perf_counter()
    if r:
        best = min(best, ((t2 - t1) - (t1 - t0)) / n)
print(1 / best)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", nargs="+", default=["64:160", "64:4096", "64:32768", "64:32768:whole", "512:640"])
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    lines = [f"command: python benchmarks/decode_cache_length.py --preset {a.preset} --dtype {a.dtype} --rows "
             f"{' '.join(a.rows)} --new {a.new}" + (f" --out {a.out}" if a.out else ""),
             f"{'prompt':>6} {'max_seq_len':>11} {'reads':>5} {'decode tok/s':>12}"]
    for row in a.rows:
        prompt, msl, *whole = row.split(":")
        reads = "whole" if whole == ["whole"] else "span"
        out = subprocess.run([sys.executable, "-c", _CHILD, a.preset, a.dtype, prompt, msl, str(a.new), reads],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        lines.append(f"{prompt:>6} {msl:>11} {reads:>5} {float(out):>12.1f}")
        print(lines[-1], flush=True)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

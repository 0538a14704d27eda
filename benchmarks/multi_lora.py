"""What serving LoRA adapters unmerged costs: decode tokens/s of one batch of requests on the base
model, on one merged adapter (the plain fast paths), and on the unmerged adapters of
``LLM(lora_modules=...)`` (every request on the base, or the requests spread over the adapters),
eager and compiled, in alternating rounds of one process.

    python benchmarks/multi_lora.py --model small --dtype float32 --batch 4 --adapters 2 --rank 8 \
        --max-tokens 32 --rounds 2

Adapters are random (B drawn so that each changes the model) on the attention's projections and
the experts (routed and shared). Prompts are random token ids of 64 tokens; completions greedy with
``ignore_eos``; prefix caching off. Printed per row: decode tokens/s (output tokens after the
first, over the decode time: the fastest full run minus the fastest first-token-only run, each
over all rounds after an untimed warm-up) and the prefill time (the fastest first-token-only run:
every prompt prefilled, one token each), each with its ratio to the base row of the same mode.
Checked: the mixed rows' tokens equal each adapter merged and run alone (eager).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

import sparseek
from sparseek.checkpoint.adapters import merge_adapters, save_adapters
from sparseek.engine import LLM, SamplingParams
from sparseek.model import build_model
from sparseek.model.lora import add_lora

TARGETS = ("wq_a", "wq_b", "wkv", "wo_a", "wo_b", "experts")


def make_adapters(base, n: int, rank: int, out: str) -> dict[str, str]:
    dirs = {}
    for i in range(n):
        m = copy.deepcopy(base)
        add_lora(m, rank=rank, alpha=2.0 * rank, targets=TARGETS)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for k, p in m.named_parameters():
                if "lora_B" in k:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        dirs[f"ad{i}"] = f"{out}/ad{i}"
        save_adapters(m, dirs[f"ad{i}"])
    return dirs


def timed(llm: LLM, prompts, params) -> tuple[float, float, list[list[int]]]:
    """(seconds to every prompt's first token, seconds for the whole completions, tokens)."""
    one = [SamplingParams(**{**p.__dict__, "max_tokens": 1}) for p in params]
    t0 = time.perf_counter()
    llm.generate(prompts, one)
    t1 = time.perf_counter()
    outs = llm.generate(prompts, params)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, [o.token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    a = ap.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    base = build_model(sparseek.preset(a.model)).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, base.args.vocab_size, (64,), generator=g).tolist() for _ in range(a.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(base, a.adapters, a.rank, tmp)
        names = list(dirs)
        merged = merge_adapters(copy.deepcopy(base), dirs[names[0]])

        def params(loras):
            return [SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True, lora=n) for n in loras]

        mixed = [names[i % len(names)] for i in range(a.batch)]
        rows = {}  # (mode, row) -> (engine, prompts' params)
        for mode in a.modes:
            kw = dict(max_batch_size=a.batch, max_seq_len=64 + a.max_tokens + 16, prefix_cache_bytes=0,
                      compile=mode == "compiled")
            rows[mode, "base"] = (LLM(base, None, **kw), params([None] * a.batch))
            rows[mode, "merged adapter"] = (LLM(merged, None, **kw), params([None] * a.batch))
            multi = LLM(copy.deepcopy(base), None, lora_modules=dirs, **kw)
            rows[mode, "lora_modules, all base"] = (multi, params([None] * a.batch))
            rows[mode, f"lora_modules, {len(names)} adapters mixed"] = (multi, params(mixed))
        first: dict = {}
        whole: dict = {}
        tokens: dict = {}
        for r in range(a.rounds + 1):  # round 0 warms up (compiles), untimed
            for key, (llm, ps) in rows.items():
                t_first, t_whole, tokens[key] = timed(llm, prompts, ps)
                if r:
                    first[key] = min(first.get(key, float("inf")), t_first)
                    whole[key] = min(whole.get(key, float("inf")), t_whole)
        decoded = a.batch * (a.max_tokens - 1)
        best = {key: decoded / (whole[key] - first[key]) for key in rows}
        alone = [LLM(merge_adapters(copy.deepcopy(base), dirs[n]), None, max_batch_size=1, prefix_cache_bytes=0,
                     max_seq_len=64 + a.max_tokens + 16).generate([p], params([None])[0]).pop().token_ids
                 for n, p in zip(mixed, prompts)]
    print(f"# {a.model} {a.dtype}, batch {a.batch}, {a.adapters} adapters of rank {a.rank} on {', '.join(TARGETS)}, "
          f"{a.max_tokens} tokens, fastest of {a.rounds} rounds after a warm-up; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'mode':9} {'row':34} {'decode tok/s':>12} {'vs base':>8} {'prefill s':>10} {'vs base':>8}")
    for (mode, row), rate in best.items():
        t = first[mode, row]
        print(f"{mode:9} {row:34} {rate:12.1f} {rate / best[mode, 'base']:8.2f}x {t:10.3f} "
              f"{t / first[mode, 'base']:8.2f}x")
    for mode in a.modes:
        same = tokens[mode, f"lora_modules, {len(names)} adapters mixed"] == alone
        print(f"{mode}: mixed rows' tokens equal each adapter merged and run alone: {same}")


if __name__ == "__main__":
    main()

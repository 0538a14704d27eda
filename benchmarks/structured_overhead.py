"""What holding a completion to a grammar costs: engine time per generated token without a
grammar, with a regex, a JSON schema and DeepSeek-V4's forced tool-call layout (``reply_format``),
at batch 1 and 8, plus the grammar's own share (``Guide.mask`` + ``accept`` per token, timed
alone over the same outputs).

    python benchmarks/structured_overhead.py --preset small --out benchmarks/results/cpu-small-structured.txt

Random weights: what a grammar lets through differs from the free run, so times are compared per
step (outputs run to ``--max-tokens`` or to the grammar's end), on the second of two identical
calls; ``first +ms`` is what the first call took longer (building the grammar, and once per
vocabulary and set of special tokens, xgrammar's compiler).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from sparseek.engine import LLM, SamplingParams
from sparseek.engine.structured import make_guide
from sparseek.tokenizer.chat import reply_format

TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "required": ["query", "top_k"],
    "properties": {"query": {"type": "string"}, "top_k": {"type": "integer", "minimum": 1, "maximum": 50},
                   "lang": {"enum": ["en", "fr", "de"]}}}}}]
SCHEMA = {"type": "object", "required": ["name", "tags"],
          "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    llm = LLM(a.preset, dtype=torch.float32, max_batch_size=max(a.batch), max_seq_len=512)
    grammars = {"free": {}, "regex": {"regex": r"[a-z ]{1,400}"}, "json_schema": {"json_schema": SCHEMA},
                "forced tool call": {"structural_tag": reply_format(False, tools=TOOLS, tool_choice="required")}}
    lines = [f"# python benchmarks/structured_overhead.py {' '.join(argv if argv is not None else sys.argv[1:])}",
             f"# preset {a.preset} fp32, vocab {llm.args.vocab_size}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads", "",
             f"{'grammar':<18} {'batch':>5} {'tokens':>7} {'ms/token':>9} {'vs free':>8} {'grammar ms/token':>17} "
             f"{'first +ms':>12}"]
    llm.generate(["warm up"], SamplingParams(max_tokens=8, temperature=0))
    for b in a.batch:
        prompts = [f"item {i}: " for i in range(b)]
        base = None
        for name, kw in grammars.items():
            params = [SamplingParams(max_tokens=a.max_tokens, temperature=1.0, seed=i, ignore_eos=not kw, **kw)
                      for i in range(b)]
            times = []
            for _ in range(2):  # the first also builds the grammar (and the vocabulary's compiler once)
                t = time.perf_counter()
                outs = llm.generate(prompts, params)
                times.append(time.perf_counter() - t)
            n = sum(len(o.token_ids) for o in outs)
            per = 1000 * times[1] / max(1, max(len(o.token_ids) for o in outs))  # a step serves the batch
            base = base or per
            own = _grammar_cost(llm, kw, outs) if kw else 0.0
            lines.append(f"{name:<18} {b:>5} {n:>7} {per:>9.2f} {per / base:>7.2f}x {own:>17.3f} "
                         f"{1000 * (times[0] - times[1]):>12.0f}")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


def _grammar_cost(llm: LLM, kw: dict, outs) -> float:
    """ms per token of masking and advancing the grammar alone, replayed over ``outs``."""
    total, n = 0.0, 0
    logits = torch.randn(llm.args.vocab_size)
    for o in outs:
        g = make_guide(llm.tokenizer, llm.args.vocab_size, {llm.tokenizer.eos_id}, kw.get("json_schema"),
                       kw.get("regex"), kw.get("structural_tag"))
        t = time.perf_counter()
        for tok in o.token_ids:
            g.mask(logits)
            g.accept(tok)
        total += time.perf_counter() - t
        n += len(o.token_ids)
    return 1000 * total / max(1, n)


if __name__ == "__main__":
    sys.exit(main())

"""Prefix caching on few-shot evals: GSM8K's 8-shot prompts share a ~700-token preamble (generation),
an MMLU subject's 5-shot contexts a ~400-token one (log-likelihood scoring).

    python benchmarks/engine_prefix.py --model small --dtype float32 --prompts 32 --max-tokens 1 16 --mmlu 64

Each round builds a fresh engine (a cold prefix cache, as an eval run starts) and generates greedily
for the first ``--prompts`` GSM8K test questions behind the task's own 8 exemplars
(``sparseek.evals.gsm8k``, data from ``--data`` or the default eval data folder), with prefix
caching off (``prefix_cache_bytes=0``) and on, in alternating rounds of one process (this VM drifts
+-25% within minutes). Prints wall time, tokens fed to the model (counted at its forward) and the
ratio; ``--max-tokens 1`` times the prefill alone (time to every first token), larger values add
decoding, which prefix caching leaves as it is. Outputs must be equal (checked; fp32 or bf16 --
the prefill cuts at other positions with caching on, so bf16 may round a near-tie differently).

``--mmlu N``: the first N MMLU test questions (4 requests each, the task's own 5-shot contexts)
scored by ``EngineModel.loglikelihood``, with contexts that begin alike read once
(``sparseek.evals.model.PREFIX_MIN`` = 64) and without (set past any length), alternating;
scores must agree within 1e-4.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sparseek
from sparseek.engine import LLM, SamplingParams
from sparseek.evals.data import DataSource
from sparseek.evals.gsm8k import GSM8K


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--batch", type=int, default=8, help="the engine's max_batch_size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", default=None, help="folder with gsm8k_test.jsonl and gsm8k_fewshot_cot8.jsonl")
    ap.add_argument("--mmlu", type=int, default=0, help="also score this many MMLU questions")
    a = ap.parse_args()

    torch.set_num_threads(torch.get_num_threads())
    model, tok = sparseek.load(a.model, dtype=a.dtype)
    task = GSM8K()
    task.load(DataSource(a.data))
    prompts = [tok.encode(task.prompt(d)) for d in task.docs[:a.prompts]]
    lens = [len(p) for p in prompts]
    common = 0
    while all(len(p) > common and p[common] == prompts[0][common] for p in prompts):
        common += 1
    print(f"{a.model} {a.dtype}, {a.prompts} GSM8K 8-shot prompts of {min(lens)}-{max(lens)} tokens "
          f"({sum(lens)} in all, {common} in common), max_batch_size {a.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {a.rounds} alternating rounds")

    fed = [0]
    forward = type(model).forward

    def counted(m, ids, *args, **kw):
        fed[0] += ids.numel()
        return forward(m, ids, *args, **kw)

    type(model).forward = counted
    for n in a.max_tokens:
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        times: dict[str, list[float]] = {"off": [], "on": []}
        tokens, outs = {}, {}
        for _ in range(a.rounds):
            for name, budget in (("off", 0), ("on", 1 << 30)):
                llm = LLM(model, tok, max_batch_size=a.batch, max_seq_len=2048, prefix_cache_bytes=budget)
                fed[0] = 0
                t0 = time.perf_counter()
                res = llm.generate(prompts, params)
                times[name].append(time.perf_counter() - t0)
                tokens[name], outs[name] = fed[0], [r.token_ids for r in res]
        same = sum(x == y for x, y in zip(outs["off"], outs["on"]))
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        print(f"\nmax_tokens {n}:")
        print(f"  prefix cache off: {off:7.2f} s  {tokens['off']:7d} tokens fed")
        print(f"  prefix cache on : {on:7.2f} s  {tokens['on']:7d} tokens fed  {off / on:.2f}x faster, "
              f"{tokens['off'] / tokens['on']:.2f}x fewer tokens; same tokens as off {same}/{len(prompts)}")

    if a.mmlu:
        mmlu(model, tok, a, fed)


def mmlu(model, tok, a, fed) -> None:
    from sparseek.evals import model as evals_model
    from sparseek.evals.mmlu import MMLU

    task = MMLU()
    task.load(DataSource(a.data))
    docs = task.docs[:a.mmlu]
    reqs = [(task.context(d), task.target_delimiter + c) for d in docs for c in task.choices(d)]
    subjects = len({d["subject"] for d in docs})
    print(f"\nMMLU: {len(docs)} questions of {subjects} subject(s), {len(reqs)} requests, 5-shot")
    llm = LLM(model, tok, max_seq_len=2048)
    scorer = evals_model.EngineModel(llm, batch_size=16, progress=False)
    default = evals_model.PREFIX_MIN
    times: dict[str, list[float]] = {"off": [], "on": []}
    tokens, scores = {}, {}
    for _ in range(a.rounds):
        for name, minimum in (("off", 1 << 30), ("on", default)):
            evals_model.PREFIX_MIN = minimum
            fed[0] = 0
            t0 = time.perf_counter()
            scores[name] = scorer.loglikelihood(reqs)
            times[name].append(time.perf_counter() - t0)
            tokens[name] = fed[0]
    evals_model.PREFIX_MIN = default
    worst = max(abs(x[0] - y[0]) for x, y in zip(scores["off"], scores["on"]))
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"  shared beginnings off: {off:7.2f} s  {tokens['off']:7d} tokens fed")
    print(f"  shared beginnings on : {on:7.2f} s  {tokens['on']:7d} tokens fed  {off / on:.2f}x faster, "
          f"{tokens['off'] / tokens['on']:.2f}x fewer tokens; largest score difference {worst:.2e}")


if __name__ == "__main__":
    main()

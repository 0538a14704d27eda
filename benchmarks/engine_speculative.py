"""MTP speculative decoding: generation speed and acceptance, batched verification vs row by row.

    python benchmarks/engine_speculative.py --model /tmp/nano_run/checkpoint --batch 1 4 8 --k 1 2
    python benchmarks/engine_speculative.py --model small --dtype bfloat16 --drafter oracle --accept 0.8
    python benchmarks/engine_speculative.py --model small --compile --drafter oracle --batch 1 8 --k 1 2 3

Greedy generation of ``--max-tokens`` tokens for ``--batch`` prompts at once, timed end to end
(prompts are short, so decoding dominates), in alternating rounds of one process (this VM drifts
+-25% within minutes):

* ``plain``: no speculation (eager decode step, the baseline every speculative row is compared to);
* ``k=K batched``: the engine as it is -- every row verifies its K drafts in one forward of
  ``batch`` rows x (K + 1) tokens at their own positions, and the MTP block drafts for all rows at once;
* ``k=K row by row``: the same steps with each row verified and drafted in its own forwards (what
  the engine did before batched verification), for the ratio.

``--drafter mtp`` drafts with the checkpoint's MTP block (a trained checkpoint gives a real
acceptance rate; a random preset accepts next to nothing). ``--drafter oracle`` drafts the plain
greedy token with probability ``--accept`` and a wrong one otherwise (seeded): speed at a chosen
acceptance rate. Every speculative output must equal the plain greedy output (checked).

``--compile``: every engine compiled (``LLM(compile=True)``: plain decoding's step, and the
verification and MTP draft steps), each warmed up by one untimed run; the forward line then times
the compiled steps. Row-by-row verification has no compiled form and is skipped.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import sysconfig
import time

import torch

import sparseek
from sparseek.engine import LLM, SamplingParams


def _prompts(model_args, tokenizer, n: int, length: int) -> list[list[int]]:
    """Openings of Python standard-library files (what the main job's models learn from), else
    random ids."""
    if tokenizer is not None:
        files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
        out = []
        for path in random.Random(0).sample(files, len(files)):
            ids = tokenizer.encode(open(path, encoding="utf-8", errors="replace").read()[:4000])
            if len(ids) >= length:
                out.append(ids[:length])
            if len(out) == n:
                return out
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, model_args.vocab_size, (length,), generator=g).tolist() for _ in range(n)]


def oracle_drafter(refs: list[list[int]], accept: float, vocab: int, seed: int = 0):
    """A stand-in for ``LLM._propose`` drafting each request's plain greedy token (``refs`` by request
    index) with probability ``accept`` and a wrong one otherwise: speculative decoding's speed at a
    chosen acceptance rate, on any weights."""
    rng = random.Random(seed)

    def propose(llm, s, logits_V):
        ref = refs[s.out.index]
        i = len(s.out.token_ids) + len(s.drafts)
        good = ref[i] if i < len(ref) else 0
        return (good if rng.random() < accept else (good + 1) % vocab), None

    return propose


@torch.inference_mode()
def _forward_ms(model, prompts: list[list[int]], ks: list[int], reps: int = 10) -> str:
    """What a step's forwards cost at this batch: the main model over 1 and k + 1 tokens per row,
    the MTP block over k + 1 (drafting from the verified positions) and 1 (each chained draft)."""
    B, L = len(prompts), len(prompts[0])
    ids = torch.tensor(prompts)
    cache = model.new_cache(B, L + 16)
    _, h = model(ids, cache, return_hidden=True)
    model.forward_mtp(h, ids, cache)  # any tokens: only the cost is read

    def ms(f, T):
        f(T)
        t = time.perf_counter()
        for _ in range(reps):
            f(T)
        return (time.perf_counter() - t) / reps * 1e3

    def main(T):
        model(ids[:, :T], cache, last_n=T)
        cache.pos -= T

    def mtp(T):
        model.forward_mtp(h[:, :T], ids[:, :T], cache, at=torch.zeros(B, dtype=torch.long))
        cache.mtp_pos -= T

    parts = [f"main x1 {ms(main, 1):.1f}"] + [f"main x{k + 1} {ms(main, k + 1):.1f}" for k in ks]
    parts += [f"MTP x1 {ms(mtp, 1):.1f}"] + [f"MTP x{k + 1} {ms(mtp, k + 1):.1f}" for k in ks]
    return "forward ms (tokens per row): " + ", ".join(parts)


@torch.inference_mode()
def _compiled_ms(model, plain: LLM, spec: dict[int, LLM], reps: int = 20) -> str:
    """What the compiled engines' steps cost (all ``max_batch_size`` rows, as the engine runs them)."""
    B = plain.max_batch_size

    def ms(f, T, mtp=False):
        def call():
            f(T)
            (cache.mtp_pos if mtp else cache.pos).sub_(T)
        call()
        t = time.perf_counter()
        for _ in range(reps):
            call()
        return (time.perf_counter() - t) / reps * 1e3

    cache = plain._cache
    parts = [f"decode x1 {ms(lambda T: plain._decode_fn(torch.zeros(B, 1, dtype=torch.long), cache), 1):.1f}"]
    h = torch.zeros(B, max(spec) + 1, model.args.hc_mult, model.args.hidden_size, dtype=model.embed.weight.dtype)
    at = torch.zeros(B, dtype=torch.long)
    for k, llm in spec.items():
        cache = llm._cache
        parts.append(f"verify x{k + 1} {ms(lambda T: llm._verify_fn(torch.zeros(B, T, dtype=torch.long), cache), k + 1):.1f}")
        parts.append(f"MTP x{k + 1} {ms(lambda T: llm._mtp_fn(h[:, :T], torch.zeros(B, T, dtype=torch.long), cache, at), k + 1, True):.1f}")
    if spec:
        parts.append(f"MTP x1 {ms(lambda T: llm._mtp_fn(h[:, :T], torch.zeros(B, T, dtype=torch.long), cache, at), 1, True):.1f}")
    return "compiled step ms (tokens per row): " + ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small", help="preset or checkpoint directory")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--drafter", choices=["mtp", "oracle"], default="mtp")
    ap.add_argument("--accept", type=float, default=0.8, help="oracle drafter: share of right drafts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-rowwise", action="store_true", help="skip the row-by-row rows")
    ap.add_argument("--compile", action="store_true", help="compiled engines (see the module docstring)")
    a = ap.parse_args()
    a.no_rowwise = a.no_rowwise or a.compile
    model, tok = sparseek.load(a.model, dtype=getattr(torch, a.dtype))
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0, ignore_eos=True)
    print(f"{a.model} {a.dtype}, drafter {a.drafter}" + (f" (accept {a.accept})" if a.drafter == "oracle" else "")
          + (", compiled" if a.compile else "")
          + f", {a.max_tokens} new tokens per prompt of {a.prompt_len}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {a.rounds} alternating rounds")

    batched_step = LLM._spec_step

    def row_by_row(self, seqs, cache):
        for i, s in enumerate(seqs):
            batched_step(self, [s], cache.view(i, i + 1))

    for B in a.batch:
        prompts = _prompts(model.args, tok, B, a.prompt_len)
        max_len = a.prompt_len + a.max_tokens + 16
        plain_llm = LLM(model, tok, max_batch_size=B, max_seq_len=max_len, compile=a.compile)
        ref = [o.token_ids for o in plain_llm.generate(prompts, params)]  # (compiles the plain engine)
        modes, spec = {"plain": (plain_llm, None)}, {}
        for k in a.k:
            llm = spec[k] = LLM(model, tok, max_batch_size=B, max_seq_len=max_len, speculative_tokens=k,
                                compile=a.compile)
            modes[f"k={k} batched"] = (llm, batched_step)
            if not a.no_rowwise and B > 1:
                modes[f"k={k} row by row"] = (llm, row_by_row)
        if a.drafter == "oracle":
            LLM._propose = oracle_drafter(ref, a.accept, model.args.vocab_size)
        if a.compile:
            for llm in spec.values():
                llm.generate(prompts, params)  # compiles (minutes)
        secs = {m: [] for m in modes}
        stats = {}
        for _ in range(a.rounds):
            for m, (llm, step) in modes.items():
                if step is not None:
                    LLM._spec_step = step
                t = time.perf_counter()
                outs = llm.generate(prompts, params)
                secs[m].append(time.perf_counter() - t)
                LLM._spec_step = batched_step
                same = sum(o.token_ids == r for o, r in zip(outs, ref))
                drafted, accepted = sum(o.drafted for o in outs), sum(o.accepted for o in outs)
                stats[m] = (same, drafted, accepted)
        line = _compiled_ms(model, plain_llm, spec) if a.compile else _forward_ms(model, prompts, a.k)
        print(f"\nbatch {B}: {line}")
        base = sorted(secs["plain"])[a.rounds // 2]
        for m, v in secs.items():
            dt = sorted(v)[a.rounds // 2]
            same, drafted, accepted = stats[m]
            acc = f"acceptance {accepted / drafted:5.1%}" if drafted else " " * 16
            print(f"  {m:16s}: {B * a.max_tokens / dt:7.1f} tok/s  {base / dt:5.2f}x plain  {acc}  "
                  f"same tokens as plain {same}/{B}")


if __name__ == "__main__":
    main()

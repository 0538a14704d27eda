"""Offline inference: ``LLM.generate`` / ``LLM.stream`` with continuous batching.

The engine owns one preallocated cache of ``max_batch_size`` slots. Live sequences always sit in
slots [0, n): a finished sequence's slot is refilled by moving the last live one into it, so a
decode step is one batched forward over a contiguous view of the cache, each row at its own
position. New prompts join between decode steps (chunked prefill into their slot), so short and
long requests flow through together instead of waiting for the slowest one.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from sparseek.engine.sampling import SamplingParams, sample
from sparseek.engine.stops import StopChecker

log = logging.getLogger("sparseek")


@dataclass
class RequestOutput:
    """Result for one prompt (vLLM's shape; ``.outputs[0]`` is the output itself)."""

    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    finish_reason: str | None = None  # "stop" (EOS, stop token or stop string) or "length"
    stop_reason: str | int | None = None
    cumulative_logprob: float = 0.0

    @property
    def outputs(self) -> list["RequestOutput"]:
        return [self]


@dataclass
class StreamDelta:
    """New text of one request since the previous delta (``finish_reason`` set on the last one)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None


@dataclass
class _Seq:
    out: RequestOutput
    params: SamplingParams
    generator: torch.Generator | None
    stops: StopChecker
    stop_ids: set[int]
    decoder: object
    last_token: int = -1
    new_ids: list[int] = field(default_factory=list)
    new_logprobs: list[dict[int, float]] = field(default_factory=list)


class LLM:
    def __init__(self, model="nano", tokenizer=None, dtype=None, device="cpu", max_batch_size: int = 8,
                 max_seq_len: int = 4096, prefill_chunk: int = 512, add_bos: bool = True, seed: int = 0):
        if isinstance(model, str):
            from sparseek import load

            model, loaded_tok = load(model, dtype=dtype, device=device, seed=seed)
            tokenizer = tokenizer or loaded_tok
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.args = model.args
        self.max_batch_size = max_batch_size
        self.max_seq_len = min(max_seq_len, self.args.max_position_embeddings)
        self.prefill_chunk = prefill_chunk
        self.add_bos = add_bos
        self._cache = None

    # ------------------------------------------------------------------ public API
    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete every prompt (a string, a list of token ids, or a list of either)."""
        outputs: dict[int, RequestOutput] = {}
        reqs = self._requests(prompts, params)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(reqs), desc="generate", unit="req")
        for seq in self._run(reqs):
            if seq.out.finish_reason is not None and seq.out.index not in outputs:
                outputs[seq.out.index] = seq.out
                if bar:
                    bar.update()
        if bar:
            bar.close()
        return [outputs[i] for i in range(len(reqs))]

    def stream(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> Iterator[StreamDelta]:
        """Yield text deltas as they are produced (interleaved across prompts, tagged by ``index``)."""
        for seq in self._run(self._requests(prompts, params)):
            text = seq.stops.take_ready(final=seq.out.finish_reason is not None)
            if text or seq.new_ids or seq.out.finish_reason:
                yield StreamDelta(seq.out.index, text, list(seq.new_ids),
                                  list(seq.new_logprobs) if seq.params.logprobs is not None else None,
                                  seq.out.finish_reason)

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[tuple], batch_size: int = 16, use_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        """For each (context, continuation): log p(continuation | context) and whether greedy
        decoding would have produced the continuation. Strings are tokenized separately (context
        with BOS), as lm-evaluation-harness does; token-id lists are used as they are."""
        items = []
        for i, (ctx, cont) in enumerate(requests):
            c = self._ids(ctx, bos=True, what=f"request {i} context")
            x = self._ids(cont, bos=False, what=f"request {i} continuation")
            if not x:
                raise ValueError(f"request {i} has an empty continuation")
            full = (c + x)[-(self.max_seq_len):]  # keep the end: the continuation must be scored
            items.append((full, min(len(x), len(full) - 1)))
        results: list[tuple[float, bool] | None] = [None] * len(items)
        # rows of equal length share one forward
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(items), desc="loglikelihood", unit="req")
        i = 0
        while i < len(order):
            L = len(items[order[i]][0])
            group = [order[i]]
            while len(group) < batch_size and i + len(group) < len(order) and len(items[order[i + len(group)]][0]) == L:
                group.append(order[i + len(group)])
            ids = torch.tensor([items[j][0] for j in group], device=self.model.embed.weight.device)
            n_max = max(items[j][1] for j in group)
            logits = self.model(ids[:, :-1], last_n=n_max)
            lp = torch.log_softmax(logits.float(), dim=-1)
            for row, j in enumerate(group):
                n = items[j][1]
                target = ids[row, -n:]
                lpr = lp[row, -n:]
                score = float(lpr.gather(-1, target[:, None]).sum())
                results[j] = (score, bool((lpr.argmax(-1) == target).all()))
            i += len(group)
            if bar:
                bar.update(len(group))
        if bar:
            bar.close()
        return results

    def _ids(self, x, bos: bool, what: str) -> list[int]:
        if isinstance(x, str):
            self._need_tokenizer()
            return self.tokenizer.encode(x, add_bos=bos and self.add_bos)
        ids = [int(t) for t in x]
        if any(not 0 <= t < self.args.vocab_size for t in ids):
            raise ValueError(f"{what} has token ids outside [0, {self.args.vocab_size})")
        return ids

    def chat(self, messages: list[dict], params: SamplingParams | None = None, thinking: bool = False,
             **encode_kw) -> RequestOutput:
        """One assistant turn in DeepSeek-V4's chat format; ``.message`` holds the parsed reply."""
        from sparseek.tokenizer.chat import encode_messages, parse_completion

        self._need_tokenizer()
        mode = "thinking" if thinking else "chat"
        prompt = self.tokenizer.encode(encode_messages(messages, thinking_mode=mode, **encode_kw))
        params = params or SamplingParams(max_tokens=512)
        out = self.generate([prompt], params)[0]
        raw = self.tokenizer.decode(out.token_ids, skip_special_tokens=False)
        try:
            out.message = parse_completion(raw, mode)
        except ValueError:
            # a truncated or malformed reply: keep the text as content rather than fail
            out.message = {"role": "assistant", "content": out.text, "reasoning_content": "", "tool_calls": []}
        return out

    # ------------------------------------------------------------------ requests
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids instead of text, or tokenizer=...")

    def _requests(self, prompts, params) -> list[_Seq]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        eos = getattr(self.tokenizer, "eos_id", None)
        if eos is None:
            e = self.args.eos_token_id
            eos = e[0] if isinstance(e, list) else e
        seqs = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            if isinstance(p, str):
                self._need_tokenizer()
                ids = self.tokenizer.encode(p, add_bos=self.add_bos)
                text = p
            else:
                ids, text = [int(t) for t in p], None
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.args.vocab_size}): {bad[:5]}")
            if len(ids) >= self.max_seq_len:
                raise ValueError(f"prompt {i} is too long: {len(ids)} tokens, the engine's max_seq_len is "
                                 f"{self.max_seq_len}")
            gen = None
            if not sp.greedy:
                gen = torch.Generator(device="cpu")
                gen.manual_seed(sp.seed if sp.seed is not None else int(torch.randint(0, 2**62, (1,))))
            stop_ids = set(sp.stop_token_ids)
            if not sp.ignore_eos and eos is not None:
                stop_ids.add(eos)
            decoder = self.tokenizer.stream_decoder(sp.skip_special_tokens) if self.tokenizer else None
            out = RequestOutput(i, text, ids, logprobs=[] if sp.logprobs is not None else None)
            seqs.append(_Seq(out, sp, gen, StopChecker(sp.stop), stop_ids, decoder))
        return seqs

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def _run(self, requests: list[_Seq]) -> Iterator[_Seq]:
        if self._cache is None:
            self._cache = self.model.new_cache(self.max_batch_size, self.max_seq_len)
        cache = self._cache
        waiting = deque(requests)
        running: list[_Seq] = []
        while waiting or running:
            while waiting and len(running) < self.max_batch_size:
                seq = waiting.popleft()
                slot = len(running)
                cache.reset([slot])
                logits = self._prefill(seq, cache.select(slot))
                self._accept([seq], logits[None])
                yield seq
                if seq.out.finish_reason is None:
                    running.append(seq)
            if not running:
                continue
            n = len(running)
            tokens = torch.tensor([[s.last_token] for s in running], device=cache.device)
            logits = self.model(tokens, cache.view(0, n))[:, -1]
            self._accept(running, logits)
            full = (cache.pos[:n] >= self.max_seq_len).tolist()
            for s, no_room in zip(running, full):
                if s.out.finish_reason is None and no_room:
                    self._finish(s, "length")
                yield s
            for i in range(n - 1, -1, -1):  # keep live sequences in slots [0, n)
                if running[i].out.finish_reason is not None:
                    last = len(running) - 1
                    if i != last:
                        cache.copy_row(last, i)
                        running[i] = running[last]
                    running.pop()

    def _prefill(self, seq: _Seq, cache) -> torch.Tensor:
        ids = torch.tensor(seq.out.prompt_token_ids, device=cache.device)[None]
        want = seq.params.prompt_logprobs
        if want is not None:
            seq.out.prompt_logprobs = [None]
        logits = None
        for s in range(0, ids.shape[1], self.prefill_chunk):
            chunk = ids[:, s:s + self.prefill_chunk]
            logits = self.model(chunk, cache, last_n=None if want is not None else 1)[0]
            if want is not None:
                nxt = ids[0, s + 1:s + 1 + chunk.shape[1]]
                lp = torch.log_softmax(logits[:len(nxt)].float(), dim=-1)
                seq.out.prompt_logprobs += [_top(lp[j], int(nxt[j]), want) for j in range(len(nxt))]
        return logits[-1]

    def _accept(self, seqs: list[_Seq], logits_NV: torch.Tensor) -> None:
        params = [s.params for s in seqs]
        toks = sample(logits_NV, params, [s.generator for s in seqs]).tolist()
        need_lp = any(p.logprobs is not None for p in params)
        lp = torch.log_softmax(logits_NV.float(), dim=-1) if need_lp else None
        for j, (s, t) in enumerate(zip(seqs, toks)):
            s.new_ids, s.new_logprobs = [t], []
            s.last_token = t
            out = s.out
            out.token_ids.append(t)
            if lp is not None and s.params.logprobs is not None:
                entry = _top(lp[j], t, s.params.logprobs)
                out.logprobs.append(entry)
                s.new_logprobs = [entry]
                out.cumulative_logprob += entry[t]
            if t in s.stop_ids:
                self._finish(s, "stop", t)
                continue
            hit = s.stops.add(s.decoder.push(t)) if s.decoder else None
            if hit is not None:
                out.finish_reason, out.stop_reason = "stop", hit
                out.text = s.stops.text
            elif len(out.token_ids) >= s.params.max_tokens:
                self._finish(s, "length")
            else:
                out.text = s.stops.text

    @staticmethod
    def _finish(s: _Seq, reason: str, stop_reason=None) -> None:
        """End a sequence; text held back for an unfinished UTF-8 character is released."""
        if s.decoder is not None:
            hit = s.stops.add(s.decoder.flush())
            if hit is not None:
                reason, stop_reason = "stop", hit
        s.out.finish_reason, s.out.stop_reason = reason, stop_reason
        s.out.text = s.stops.text


def _top(lp_V: torch.Tensor, chosen: int, n: int) -> dict[int, float]:
    entry = {chosen: float(lp_V[chosen])}
    if n:
        v, i = lp_V.topk(n)
        for tok, val in zip(i.tolist(), v.tolist()):
            entry.setdefault(tok, val)
    return entry

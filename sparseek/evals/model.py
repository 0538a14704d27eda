"""``sparseek.LLM`` behind the evaluation protocol (and lm-eval's conventions).

Tokenization follows lm-evaluation-harness so that numbers are comparable with it:
* trailing whitespace of a context moves to the front of the continuation;
* the continuation's tokens are the tail of ``encode(context + continuation)`` after
  ``encode(context)`` (so a BPE merge across the boundary is scored as the model would see it),
  falling back to encoding the continuation alone when the two encodings disagree on the prefix;
* contexts start with BOS (DeepSeek models are trained with it); an empty context is BOS alone
  (EOS when the tokenizer has no BOS).
Generation prompts are truncated on the left so that prompt + ``max_tokens`` fits the engine.

Scoring: requests whose model input is identical (the 4 answer letters of an MMLU question) share
one forward, and inputs of different lengths share a batch, right-padded: the model is causal, so
padding after a row changes none of its logits. Inputs that begin alike by 64 tokens or more (a
subject's 5-shot preamble) are scored in batches of their own, the common beginning read once into
a cache whose snapshot each row restores (``Cache.snapshot``), the forward reading only the rest. ``scorer="engine"`` uses ``LLM.loglikelihood``
instead (no sharing, equal lengths per batch), e.g. to cross-check.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LOGIT_BUDGET = 1 << 28  # floats of log-probabilities held at once (1 GiB)
PREFIX_MIN = 64  # tokens a family of contexts must share for them to be read once (few-shot preambles)


def _common(a: tuple, b: tuple) -> int:
    """Length of the common beginning (binary search over C-level slice comparisons)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _families(groups) -> list[tuple[list[tuple], int]]:
    """Model inputs in families that begin alike by >= PREFIX_MIN tokens (sorted, neighbours
    compared), each with what all its members share, then the rest as one family sharing 0."""
    keys = sorted(groups)
    fams, rest, run, shared = [], [], [keys[0]], len(keys[0])
    for a, b in zip(keys, keys[1:]):
        n = _common(a, b)
        if n >= PREFIX_MIN:
            run.append(b)
            shared = min(shared, n)
            continue
        if len(run) > 1:
            fams.append((run, shared))
        else:
            rest += run
        run, shared = [b], len(b)
    if len(run) > 1:
        fams.append((run, shared))
    else:
        rest += run
    return fams + ([(rest, 0)] if rest else [])


class EngineModel:
    def __init__(self, llm, batch_size: int = 16, progress: bool = True, scorer: str = "shared"):
        if llm.tokenizer is None:
            raise ValueError("evaluation needs a tokenizer: the checkpoint has no tokenizer.json")
        self.llm = llm
        self.tok = llm.tokenizer
        self.batch_size = batch_size
        self.progress = progress
        if scorer not in ("shared", "engine"):
            raise ValueError(f"scorer must be 'shared' or 'engine', got {scorer!r}")
        self.scorer = scorer
        prefix = self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id
        self.prefix = [prefix] if (prefix is not None and llm.add_bos) else []

    @classmethod
    def load(cls, model: str, dtype=None, device: str = "cpu", max_batch_size: int = 8, max_seq_len: int = 4096,
             batch_size: int = 16, progress: bool = True, seed: int = 0, scorer: str = "shared",
             quantize: str | None = None) -> "EngineModel":
        from sparseek.engine import LLM

        llm = LLM(model, dtype=dtype, device=device, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                  seed=seed, quantize=quantize)
        return cls(llm, batch_size=batch_size, progress=progress, scorer=scorer)

    @property
    def max_len(self) -> int:
        return self.llm.max_seq_len

    # ---- tokenization
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        enc = self.tok.encode
        if not context:
            if not self.prefix:
                raise ValueError("an empty context needs a BOS or EOS token to condition on")
            return list(self.prefix), enc(continuation)
        ctx = enc(context)
        whole = enc(context + continuation)
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else []
        if not cont:
            cont = enc(continuation)
        return self.prefix + ctx, cont

    # ---- the protocol
    def loglikelihood(self, requests: Sequence[tuple[str, str]], progress: bool | None = None
                      ) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(c, x) for c, x in requests]
        return self.score_ids(pairs, progress)

    def score_ids(self, pairs: Sequence[tuple[list[int], list[int]]], progress: bool | None = None
                  ) -> list[tuple[float, bool]]:
        """(log p(cont | ctx), greedy?) for token-id pairs used as they are."""
        show = self.progress if progress is None else progress
        if not pairs:
            return []
        if self.scorer == "engine":
            return self.llm.loglikelihood(pairs, batch_size=self.batch_size, use_tqdm=show)
        return self._score_shared(pairs, show)

    @torch.inference_mode()
    def _score_shared(self, pairs, show: bool) -> list[tuple[float, bool]]:
        groups: dict[tuple, list[tuple[int, list[int], int]]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError(f"request {i} has an empty continuation")
            full = (list(ctx) + list(cont))[-(self.max_len + 1):]  # keep the end: the continuation is scored
            n = min(len(cont), len(full) - 1)
            groups.setdefault(tuple(full[:-1]), []).append((i, full[-n:], n))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = None
        if show:
            from tqdm import tqdm

            bar = tqdm(total=len(pairs), desc="loglikelihood", unit="req")
        self._prefix = None
        for keys, shared in _families(groups):
            for batch, first in self._pack(keys, groups):
                self._score_batch(batch, first, min(shared, first), groups, results, bar)
        self._prefix = None
        if bar:
            bar.close()
        return results

    def _pack(self, keys: list[tuple], groups):
        """Batches of ``keys`` (long first: the padding stays small) within ``batch_size`` rows and
        the log-probability budget -> (batch, the first position any of its requests scores)."""
        keys = sorted(keys, key=len, reverse=True)
        V = self.llm.args.vocab_size
        i = 0
        while i < len(keys):
            L_max = len(keys[i])
            first = min(len(keys[i]) - n for _, _, n in groups[keys[i]])
            j = i + 1
            while j < len(keys) and j - i < self.batch_size:
                f = min(first, min(len(keys[j]) - n for _, _, n in groups[keys[j]]))
                if (L_max - f) * (j - i + 1) * V > LOGIT_BUDGET:
                    break
                first, j = f, j + 1
            yield keys[i:j], first
            i = j

    def _score_batch(self, batch, first: int, shared: int, groups, results, bar) -> None:
        """One forward over ``batch`` (right-padded), log-probabilities at positions [first, L_max).
        With ``shared`` >= PREFIX_MIN tokens in common, those are read once into a cache row whose
        snapshot every row restores, and the forward reads only the rest."""
        model = self.llm.model
        device = model.embed.weight.device
        L_max = len(batch[0])
        ids = torch.zeros(len(batch), L_max, dtype=torch.long, device=device)
        for r, k in enumerate(batch):
            ids[r, :len(k)] = torch.tensor(k, device=device)
        W = L_max - first
        if shared >= PREFIX_MIN:
            key = batch[0][:shared]
            if self._prefix is None or self._prefix[0] != key:
                one = model.new_cache(1, shared)
                model(ids[:1, :shared], one, last_n=1)
                self._prefix = (key, one.snapshot(0))
            cache = model.new_cache(len(batch), L_max)
            for r in range(len(batch)):
                cache.restore(self._prefix[1], r)
            logits = model(ids[:, shared:], cache, last_n=W)
        else:
            logits = model(ids, last_n=W)
        lp = torch.log_softmax(logits.float(), dim=-1)  # window: positions [first, L_max)
        for r, k in enumerate(batch):
            for idx, target, n in groups[k]:
                a = len(k) - n - first
                rows = lp[r, a:a + n]
                t = torch.tensor(target, device=device)
                score = float(rows.gather(-1, t[:, None]).sum())
                results[idx] = (score, bool((rows.argmax(-1) == t).all()))
                if bar:
                    bar.update()

    def loglikelihood_rolling(self, texts: Sequence[str], progress: bool | None = None) -> list[float]:
        """Total log-likelihood of each text, in windows of the engine's length: every token is
        predicted once, the first from the BOS/EOS prefix, later windows with a full context."""
        reqs, owner = [], []
        for i, text in enumerate(texts):
            ids = self.tok.encode(text)
            for ctx, cont in rolling_windows(ids, self.prefix or [self.tok.eos_id], self.max_len):
                reqs.append((ctx, cont))
                owner.append(i)
        scores = self.score_ids(reqs, progress)
        totals = [0.0] * len(texts)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        return totals

    def generate(self, prompts: Sequence[str], params, progress: bool | None = None) -> list[str]:
        from sparseek.engine.sampling import SamplingParams

        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams(temperature=0)] * len(prompts)
        ids = []
        for p, sp in zip(prompts, params):
            x = self.prefix + self.tok.encode(p)
            room = max(1, self.max_len - sp.max_tokens - 1)
            ids.append(x[-room:])
        if not ids:
            return []
        outs = self.llm.generate(ids, list(params), use_tqdm=self.progress if progress is None else progress)
        return [o.text for o in outs]


def rolling_windows(ids: list[int], prefix: list[int], max_len: int) -> list[tuple[list[int], list[int]]]:
    """Split ``ids`` into (context, continuation) pairs of at most ``max_len`` tokens in total so that
    each token is scored exactly once; the last window is filled with as much context as fits."""
    if not ids:
        return []
    out = []
    start = 0
    first = True
    while start < len(ids):
        if first:
            n = min(max_len - len(prefix), len(ids))
            out.append((list(prefix), ids[:n]))
            first = False
        else:
            n = min(max_len - 1, len(ids) - start)
            ctx_len = max_len - n
            out.append((ids[max(0, start - ctx_len):start], ids[start:start + n]))
        start += n
    return out


def as_eval_model(model, progress: bool = True):
    """A ``sparseek.LLM`` is wrapped; anything else must already speak the protocol."""
    from sparseek.engine import LLM

    if isinstance(model, LLM):
        return EngineModel(model, progress=progress)
    if isinstance(model, str):
        return EngineModel.load(model, progress=progress)
    for m in ("loglikelihood", "generate"):
        if not callable(getattr(model, m, None)):
            raise TypeError(f"evaluation model {type(model).__name__} has no {m}() method")
    return model

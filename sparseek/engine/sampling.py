"""Sampling parameters and token selection (greedy, temperature, top-k, top-p, min-p, seeded), and the
logit adjustments that depend on the text so far (repetition / presence / frequency penalties, logit
bias, min_tokens)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to continue one prompt; the fields and defaults users know from vLLM.

    temperature 0 is greedy. ``seed`` makes sampling reproducible whatever else is batched with
    the request. ``n`` completions of each prompt, sampled apart (the first with ``seed`` itself). ``logprobs=N`` returns the chosen token's log-probability and the N most likely
    alternatives at each step; ``prompt_logprobs=N`` does the same for the prompt tokens (both of
    the model's own distribution, before penalties and filters).

    Filters (applied after temperature): ``top_k`` most likely tokens, the smallest set of mass
    ``top_p``, tokens at least ``min_p`` times as likely as the most likely one. Adjustments from
    the text so far (greedy decoding sees them too): ``repetition_penalty`` divides the positive
    logits of tokens in the prompt or the output and multiplies the negative ones (CTRL / HF);
    ``presence_penalty`` and ``frequency_penalty`` subtract a constant and a per-occurrence amount
    from tokens of the output (OpenAI); ``logit_bias`` adds to chosen tokens' logits; no stop
    token and no stop string ends the output before ``min_tokens`` tokens.

    vLLM's extras: ``include_stop_str_in_output`` keeps the stop string that ended the text;
    ``allowed_token_ids`` restricts every sampled token to a set; ``bad_words`` are never generated
    (each word's tokens, as it encodes alone and after a space: a one-token word is masked always,
    a longer one's last token whenever the output ends with the tokens before it);
    ``truncate_prompt_tokens=k`` keeps a prompt's last k tokens.
    """

    max_tokens: int = 64
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    # structured outputs (``sparseek.engine.structured``, needs xgrammar): the completion is held to
    # a JSON schema (True: any JSON value), a regular expression, or an xgrammar structural tag (its
    # JSON form: a reply's layout, e.g. free reasoning, then tool calls whose arguments follow their
    # schemas; ``sparseek.tokenizer.chat.reply_format`` builds DeepSeek's)
    json_schema: dict | bool | None = None
    regex: str | None = None
    structural_tag: dict | None = None
    # the LoRA adapter this request runs with, by the name the engine loaded it under
    # (LLM(lora_modules={name: directory})); None: the base model
    lora: str | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if self.logit_bias is not None:
            try:  # JSON objects (the OpenAI API) key tokens by strings
                self.logit_bias = {int(t): float(b) for t, b in dict(self.logit_bias).items()}
            except (TypeError, ValueError):
                raise ValueError(f"SamplingParams.logit_bias must map token ids to numbers, got {self.logit_bias!r}")
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "an integer >= 1"),
            (isinstance(self.n, int) and self.n >= 1, "n", "an integer >= 1"),
            (self.temperature >= 0, "temperature", ">= 0"),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an integer >= 0 (0 = off)"),
            (0 <= self.min_p <= 1, "min_p", "in [0, 1]"),
            (isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
             "an integer in [0, max_tokens]"),
            (self.repetition_penalty > 0, "repetition_penalty", "> 0 (1 = off)"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]"),
            (all(math.isfinite(b) for b in (self.logit_bias or {}).values()), "logit_bias", "finite"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs", "None or >= 0"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs", "None or >= 0"),
            (self.allowed_token_ids is None or (isinstance(self.allowed_token_ids, (list, tuple, set))
                                                and len(self.allowed_token_ids) > 0
                                                and all(isinstance(t, int) for t in self.allowed_token_ids)),
             "allowed_token_ids", "None or a non-empty list of token ids"),
            (self.bad_words is None or (isinstance(self.bad_words, (list, tuple))
                                        and all(isinstance(w, str) and w.strip() for w in self.bad_words)),
             "bad_words", "None or a list of non-empty strings"),
            (self.truncate_prompt_tokens is None or (isinstance(self.truncate_prompt_tokens, int)
                                                     and self.truncate_prompt_tokens >= 1),
             "truncate_prompt_tokens", "None or an integer >= 1"),
        ]
        checks += [
            (self.json_schema is None or self.json_schema is True or isinstance(self.json_schema, dict),
             "json_schema", "a JSON schema (dict), True (any JSON) or None"),
            (self.regex is None or (isinstance(self.regex, str) and self.json_schema is None), "regex",
             "a string, and not given with json_schema"),
            (self.structural_tag is None or (isinstance(self.structural_tag, dict) and self.json_schema is None
                                             and self.regex is None), "structural_tag",
             "a dict (xgrammar's structural tag), and not given with json_schema or regex"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {want}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def structured(self) -> bool:
        return self.json_schema is not None or self.regex is not None or self.structural_tag is not None

    @property
    def adjusts(self) -> bool:
        """Whether ``adjust`` changes the logits (penalties, biases, min_tokens, allowed tokens)."""
        return bool(self.repetition_penalty != 1 or self.presence_penalty or self.frequency_penalty
                    or self.logit_bias or self.min_tokens or self.allowed_token_ids)


def adjust(logits_V: torch.Tensor, p: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int],
           stop_ids: Iterable[int] = ()) -> torch.Tensor:
    """The logits ``p``'s penalties and biases make of ``logits_V`` after ``output_ids`` (fp32; the
    input itself when ``p`` adjusts nothing). ``stop_ids`` are masked while the output is shorter
    than ``min_tokens``."""
    if not p.adjusts:
        return logits_V
    x = logits_V.float().clone()
    dev = x.device
    if p.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(prompt_ids).union(output_ids)), dtype=torch.long, device=dev)
        v = x[seen]
        x[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and len(output_ids):
        ids, counts = torch.tensor(list(output_ids), dtype=torch.long, device=dev).unique(return_counts=True)
        x[ids] -= p.presence_penalty + p.frequency_penalty * counts.float()
    if p.logit_bias:
        x[torch.tensor(list(p.logit_bias), device=dev)] += torch.tensor(list(p.logit_bias.values()), device=dev)
    if len(output_ids) < p.min_tokens:
        stop = list(stop_ids)
        if stop:
            x[torch.tensor(stop, dtype=torch.long, device=dev)] = float("-inf")
    if p.allowed_token_ids:
        keep = torch.full_like(x, float("-inf"))
        allowed = torch.tensor(sorted(set(p.allowed_token_ids)), dtype=torch.long, device=dev)
        x = keep.index_copy_(0, allowed, x[allowed])
    return x


def _filter(x_V: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Tempered logits with the tokens top-k, top-p and min-p drop set to -inf (in place; transformers'
    order)."""
    if p.top_k and p.top_k < x_V.shape[-1]:
        x_V.masked_fill_(x_V < x_V.topk(p.top_k).values[-1], float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = x_V.sort(descending=True)
        pr = sorted_x.softmax(-1)
        # drop a token once the mass of the tokens before it already reaches top_p
        x_V[order[pr.cumsum(-1) - pr >= p.top_p]] = float("-inf")
    if p.min_p > 0:
        # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p)
        x_V.masked_fill_(x_V < x_V.max() + math.log(p.min_p), float("-inf"))
    return x_V


def probs(logits_V: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution ``sample`` draws from (temperature, top-k, top-p, min-p applied), fp32."""
    return _filter(logits_V.float() / max(p.temperature, 1e-6), p).softmax(-1)


def sample(logits_NV: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
           ) -> torch.Tensor:
    """One token per row. Sampling uses the Gumbel-max trick with noise drawn from each row's own
    generator, so a seeded request gets the same tokens whatever it is batched with."""
    logits = logits_NV.float()
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    x = logits[rows] / torch.tensor([params[i].temperature for i in rows], device=logits.device)[:, None]
    for j, i in enumerate(rows):
        _filter(x[j], params[i])
    u = torch.stack([torch.rand(x.shape[-1], generator=generators[i], device="cpu") for i in rows]).to(x.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    out[rows] = (x + gumbel).argmax(dim=-1)
    return out


# generation_config.json fields (transformers' names) -> SamplingParams fields they default
_GENERATION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                      "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def read_generation_config(source) -> tuple[dict, list[int]]:
    """(SamplingParams defaults, end-of-sequence token ids) from a checkpoint's
    ``generation_config.json`` (``source``: its folder, the file, or the parsed dict), as vLLM
    applies them: the sampling settings the model's authors recommend (R1: temperature 0.6,
    top_p 0.95) where a request sets none. ``do_sample: false`` means greedy, as in transformers.
    A folder without the file gives no defaults."""
    import json
    import os

    where = "generation_config"
    if isinstance(source, dict):
        cfg = source
    else:
        path = os.path.join(source, "generation_config.json") if os.path.isdir(source) else source
        if not os.path.exists(path):
            if os.path.isdir(source):
                return {}, []
            raise FileNotFoundError(f"no generation config at {path}")
        where = path
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a JSON object")
    out = {ours: cfg[theirs] for theirs, ours in _GENERATION_FIELDS.items() if cfg.get(theirs) is not None}
    if cfg.get("do_sample") is False:
        out["temperature"] = 0.0
    try:
        SamplingParams(**out)
    except ValueError as e:
        raise ValueError(f"{where}: {str(e).replace('SamplingParams.', '')}") from None
    eos = cfg.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else eos
    if not isinstance(eos, list) or not all(isinstance(t, int) and t >= 0 for t in eos):
        raise ValueError(f"{where}: eos_token_id must be a token id or a list of them, got {cfg.get('eos_token_id')!r}")
    return out, eos

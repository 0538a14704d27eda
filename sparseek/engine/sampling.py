"""Sampling parameters and token selection (greedy, temperature, top-k, top-p, seeded)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to continue one prompt; the fields and defaults users know from vLLM.

    temperature 0 is greedy. ``seed`` makes sampling reproducible whatever else is batched with
    the request. ``logprobs=N`` returns the chosen token's log-probability and the N most likely
    alternatives at each step; ``prompt_logprobs=N`` does the same for the prompt tokens.
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "an integer >= 1"),
            (self.temperature >= 0, "temperature", ">= 0"),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an integer >= 0 (0 = off)"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs", "None or >= 0"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0, "prompt_logprobs", "None or >= 0"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {want}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probs(logits_V: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution ``sample`` draws from (temperature, top-k, top-p applied), fp32."""
    x = logits_V.float() / max(p.temperature, 1e-6)
    if p.top_k and p.top_k < x.shape[-1]:
        x = x.masked_fill(x < x.topk(p.top_k).values[-1], float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = x.sort(descending=True)
        pr = sorted_x.softmax(-1)
        x = x.clone()
        x[order[pr.cumsum(-1) - pr >= p.top_p]] = float("-inf")
    return x.softmax(-1)


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
        p = params[i]
        if p.top_k and p.top_k < x.shape[-1]:
            kth = x[j].topk(p.top_k).values[-1]
            x[j] = x[j].masked_fill(x[j] < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = x[j].sort(descending=True)
            probs = sorted_x.softmax(-1)
            # drop a token once the mass of the tokens before it already reaches top_p
            drop = probs.cumsum(-1) - probs >= p.top_p
            x[j, order[drop]] = float("-inf")
    u = torch.stack([torch.rand(x.shape[-1], generator=generators[i], device="cpu") for i in rows]).to(x.device)
    gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    out[rows] = (x + gumbel).argmax(dim=-1)
    return out

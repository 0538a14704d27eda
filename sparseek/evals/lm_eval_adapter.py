"""lm-evaluation-harness model type ``sparseek``.

    import sparseek.evals.lm_eval_adapter          # registers the model type
    lm_eval.simple_evaluate(model="sparseek", model_args="pretrained=DIR_OR_PRESET,dtype=bfloat16", ...)
    lm_eval.simple_evaluate(model=SparseekLM(pretrained="nano"), tasks=[...], task_manager=...)

From the shell use ``python -m sparseek.evals.lm_eval_cli`` (lm-eval's own CLI with this module
imported first). Scoring and generation go through ``EngineModel`` (the same code as
``sparseek eval``), so both paths give the same numbers for the same prompts.
"""

from __future__ import annotations

import logging

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from sparseek.evals.base import cut_at_stop
from sparseek.evals.model import EngineModel

log = logging.getLogger("sparseek")


def _device(device: str | None) -> str:
    """lm-eval's CLI asks for "cuda:0" by default: fall back to the CPU when there is no GPU."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available: using the CPU", device)
        return "cpu"
    return str(device)


def _int_or(value, default):
    try:
        return int(value)
    except (TypeError, ValueError):
        return default  # None, "auto", "auto:4": our batching needs no probing


@register_model("sparseek")
class SparseekLM(LM):
    def __init__(self, pretrained: str = "nano", dtype: str | None = None, device: str | None = None,
                 batch_size=16, max_batch_size=None, max_length: int = 4096, max_gen_toks: int = 256,
                 seed: int = 0, scorer: str = "shared", llm=None, **_ignored):
        super().__init__()
        device = _device(device) if llm is None else str(llm.model.embed.weight.device)
        if llm is None:
            from sparseek.engine import LLM

            llm = LLM(pretrained, dtype=dtype, device=device, max_seq_len=int(max_length),
                      max_batch_size=_int_or(max_batch_size, 8), seed=int(seed))
        self.model = EngineModel(llm, batch_size=_int_or(batch_size, 16), scorer=scorer)
        self.pretrained = pretrained
        self.max_gen_toks = int(max_gen_toks)
        self._device = device

    @property
    def tokenizer_name(self) -> str:
        return f"sparseek:{self.pretrained}"

    # ---- chat models (lm-eval's --apply_chat_template)
    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """What lm-eval hashes into its request cache: the checkpoint's own template, or V4's format."""
        tok = self.model.llm.tokenizer
        return tok.chat_template or "deepseek-v4-chat-format"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The few-shot conversation as the model's chat prompt (``Tokenizer.chat_prompt``: V4's
        format or the checkpoint's template). Without a generation prompt the last (assistant)
        message is an answer prefix the model continues, not a closed turn. The leading BOS text
        is left out: the engine adds BOS to every prompt."""
        tok = self.model.llm.tokenizer
        history, prefix = list(chat_history), ""
        if not add_generation_prompt and history and history[-1].get("role") == "assistant":
            prefix = history.pop()["content"] or ""
        text = tok.chat_prompt(history)[0] + prefix
        bos = tok.bos_token or ""
        return text[len(bos):] if bos and text.startswith(bos) and self.model.llm.add_bos else text

    # ---- the three request types
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        args = [tuple(r.args) for r in requests]
        out = self.model.loglikelihood(args, progress=not disable_tqdm)
        for a, res in zip(args, out):
            self.cache_hook.add_partial("loglikelihood", a, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        out = self.model.loglikelihood_rolling(texts, progress=not disable_tqdm)
        for t, res in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), res)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from sparseek.engine.sampling import SamplingParams

        prompts, params, stops = [], [], []
        for r in requests:
            context, kw = r.args
            kw = dict(kw or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kw.get("do_sample", False)) and float(kw.get("temperature", 1.0)) > 0
            params.append(SamplingParams(
                max_tokens=int(kw.get("max_gen_toks", self.max_gen_toks)), stop=until,
                temperature=float(kw.get("temperature", 1.0)) if sample else 0.0,
                top_p=float(kw.get("top_p", 1.0) or 1.0) if sample else 1.0,
                top_k=int(kw.get("top_k", 0) or 0) if sample else 0,
                seed=kw.get("seed")))
            prompts.append(context)
            stops.append(until)
        texts = self.model.generate(prompts, params, progress=not disable_tqdm)
        out = [cut_at_stop(t, s) for t, s in zip(texts, stops)]
        for r, res in zip(requests, out):
            self.cache_hook.add_partial("generate_until", r.args, res)
        return out

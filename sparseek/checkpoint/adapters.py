"""LoRA adapters on disk: sparseek's own layout and PEFT's, saved, attached, merged.

``save_adapters`` writes a model's adapters (``sparseek.model.lora``) as
``adapter_model.safetensors`` + a PEFT-style ``adapter_config.json`` that names the base model
(``base_model_name_or_path``), so ``sparseek.load(adapter_dir)`` (and every CLI verb's ``-m``)
loads the base and merges the adapters: inference then runs at the base model's speed, with no
adapter math per token. ``load_adapters`` attaches them unmerged (training goes on);
``merge_adapters`` folds them into the weights straight from the file. Adapters trained with
PEFT on transformers' DeepSeek models (``base_model.model.<module>.lora_A.weight``) merge the same
way, their module names mapped onto sparseek's as checkpoint names are; ``read_adapters(dir,
model)`` converts them to sparseek's layout for serving unmerged (``sparseek.model.multi_lora``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sparseek.model.common import Experts
from sparseek.model.lora import adapter_state, add_lora, check_unquantized, lora_targets

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def save_adapters(model: nn.Module, directory: str, base: str | None = None, tokenizer=None) -> None:
    """Write the adapters (safetensors + PEFT-style JSON config naming ``base``, the base model's
    directory or preset) into ``directory``; each file is written aside and renamed into place, so
    an interrupted save leaves the previous adapters whole."""
    os.makedirs(directory, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": model.lora_config["rank"], "lora_alpha": model.lora_config["alpha"],
           "target_modules": model.lora_config["targets"]}
    if base is not None:
        cfg["base_model_name_or_path"] = os.path.abspath(base) if os.path.isdir(base) else base
    tmp = tempfile.mkdtemp(prefix=".adapters-", dir=directory)
    try:
        save_file(adapter_state(model), os.path.join(tmp, ADAPTER_FILE))
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        if tokenizer is not None:
            tokenizer.save(tmp)
        # the weights first: a config in place always describes the weights beside it or newer ones
        names = [ADAPTER_FILE] + sorted(n for n in os.listdir(tmp) if n != ADAPTER_FILE)
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def is_adapter_dir(path: str) -> bool:
    """An adapter directory: adapters without a model of their own (no config.json)."""
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and not os.path.isfile(os.path.join(path, "config.json"))


def adapter_base(directory: str) -> str:
    """The base model an adapter directory was trained on (a checkpoint directory or a preset)."""
    cfg = _adapter_config(directory)
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{directory}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path): load the "
                         f"base and pass the adapters separately (sparseek.load(base, lora={directory!r}), --lora)")
    if not os.path.isabs(base) and not os.path.exists(base) and os.path.isdir(os.path.join(directory, base)):
        base = os.path.join(directory, base)  # a path relative to the adapters
    return base


def _adapter_config(directory: str) -> dict:
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} holds no LoRA adapters ({ADAPTER_CONFIG} is missing)")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg['peft_type']!r} is not LoRA")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise ValueError(f"{path} lacks {key!r}")
    return cfg


def load_adapters(model: nn.Module, directory: str) -> nn.Module:
    """Attach the adapters saved in ``directory`` to ``model`` (unmerged: training can go on);
    refuses, by name, adapters whose tensors do not fit the model."""
    cfg = _adapter_config(directory)
    state = load_file(os.path.join(directory, ADAPTER_FILE))
    if any(k.startswith(PEFT_PREFIX) for k in state):
        raise ValueError(f"{directory} holds PEFT adapters: sparseek merges them (sparseek.load(..., lora=...)) but "
                         "does not attach them for more training")
    add_lora(model, cfg["r"], cfg["lora_alpha"], cfg["target_modules"])
    own = adapter_state(model)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: adapters {list(state[k].shape)}, model {list(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"the adapters in {directory} do not fit this model: {len(missing)} missing "
                         f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(shapes)} of another "
                         f"shape {shapes[:3]}")
    model.load_state_dict(state, strict=False)
    return model


def read_adapters(directory: str, model: nn.Module | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of the adapters in ``directory`` in sparseek's layout, for serving them
    unmerged (``sparseek.model.multi_lora``). PEFT's layout is converted for ``model`` (its module
    names mapped as ``merge_adapters`` maps them; each pair's scale -- rsLoRA, alpha and rank
    patterns -- folded into its B, so the config says r = lora_alpha = 1)."""
    cfg = _adapter_config(directory)
    path = os.path.join(directory, ADAPTER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has {ADAPTER_CONFIG} but no {ADAPTER_FILE}")
    with safe_open(path, "pt") as f:
        peft = any(k.startswith(PEFT_PREFIX) for k in f.keys())
    if not peft:
        return cfg, load_file(path)
    if model is None:
        raise ValueError(f"{directory} holds PEFT adapters: converting them needs the model they apply to")
    return _peft_as_native(model, directory, cfg)


def _peft_as_native(model: nn.Module, directory: str, cfg: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT's pairs as sparseek's: ``<linear>.lora_A`` [r, in] / ``.lora_B`` [out, r], and per expert
    stack ``<experts>.lora_A_w1`` [E, r, in] / ``.lora_B_w1`` [E, out, r] (experts PEFT did not adapt
    zero; ranks of one stack padded to its largest)."""
    updates = _plan_or_raise(model, cfg, directory, peft=True)
    state: dict[str, torch.Tensor] = {}
    stacks: dict[tuple[str, str], list] = {}
    with safe_open(os.path.join(directory, ADAPTER_FILE), "pt") as f:
        held: dict[str, torch.Tensor] = {}
        for u in updates:
            for k in (u.key_a, u.key_b):
                if k not in held:
                    held[k] = f.get_tensor(k).float()
            a, b = u.pair(held[u.key_a], held[u.key_b])
            if u.expert is None:
                state[f"{u.module}.lora_A"], state[f"{u.module}.lora_B"] = a.clone(), u.scale * b
            else:
                stacks.setdefault((u.module, u.attr), []).append((u.expert, a, u.scale * b, u.dst.shape))
    for (module, w), parts in stacks.items():
        n = model.get_submodule(module).n
        r = max(a.shape[0] for _, a, _, _ in parts)
        out, fan_in = parts[0][3]
        A, B = torch.zeros(n, r, fan_in), torch.zeros(n, out, r)
        for e, a, b, _ in parts:
            A[e, :a.shape[0]], B[e, :, :b.shape[1]] = a, b
        state[f"{module}.lora_A_{w}"], state[f"{module}.lora_B_{w}"] = A, B
    targets = sorted({k.rsplit(".", 2)[-2] for k in state})
    return {"peft_type": "LORA", "r": 1, "lora_alpha": 1.0, "target_modules": targets}, state


def merge_adapters(model: nn.Module, directory: str) -> nn.Module:
    """Fold the adapters saved in ``directory`` straight into ``model``'s weights (W += scale * B A,
    summed in fp32 from the file's tensors and rounded once to the model's dtype), with no module
    swaps: the model stays plain, so every fast path (grouped experts, compiled decode) serves the
    fine-tune. Reads sparseek's layout and PEFT's (adapters trained with PEFT on transformers'
    DeepSeek models; ``use_rslora``, ``rank_pattern`` and ``alpha_pattern`` honoured). Refuses, by
    name, adapters that do not fit the model and PEFT options it cannot merge."""
    cfg = _adapter_config(directory)
    check_unquantized(model)
    path = os.path.join(directory, ADAPTER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has {ADAPTER_CONFIG} but no {ADAPTER_FILE}")
    updates = _plan_or_raise(model, cfg, directory)
    with safe_open(path, "pt") as f:
        held: dict[str, torch.Tensor] = {}  # the adapter pair being applied, read once in fp32
        with torch.no_grad():
            for u in updates:  # one matrix (one expert) at a time: no [E, out, in] fp32 copy
                if u.key_a not in held:
                    held = {k: f.get_tensor(k).to(u.dst.device, torch.float32) for k in (u.key_a, u.key_b)}
                a, b = u.pair(held[u.key_a], held[u.key_b])
                u.dst.copy_(u.dst.float() + u.scale * (b @ a))
    return model


@dataclass
class _Update:
    """One low-rank update of one matrix: ``dst`` += scale * B @ A, with (A [r, in], B [out, r]) =
    ``pair`` of the file's tensors ``key_a`` / ``key_b``; ``dst`` is ``module``'s ``attr`` (expert
    ``expert`` of a stack, or the whole matrix: None)."""
    dst: torch.Tensor
    key_a: str
    key_b: str
    pair: Callable
    scale: float
    module: str
    attr: str
    expert: int | None = None


def _whole(a, b):
    return a, b


def _plan_or_raise(model: nn.Module, cfg: dict, directory: str, peft: bool | None = None) -> list[_Update]:
    with safe_open(os.path.join(directory, ADAPTER_FILE), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if peft is None:
        peft = any(k.startswith(PEFT_PREFIX) for k in shapes)
    missing, unexpected, bad, updates = (_peft_plan if peft else _native_plan)(model, cfg, shapes)
    if missing or unexpected or bad:
        raise ValueError(f"the adapters in {directory} do not fit this model: {len(missing)} missing "
                         f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(bad)} of another "
                         f"shape {bad[:3]}")
    return updates


def _native_plan(model: nn.Module, cfg: dict, shapes: dict):
    """sparseek's layout: ``<module>.lora_A`` / ``.lora_B`` per linear layer, ``<experts>.lora_A_w1``
    ... stacked per expert like the experts."""
    scale, r = cfg["lora_alpha"] / cfg["r"], cfg["r"]
    want: dict[str, tuple[int, ...]] = {}
    items = []
    for _, _, child, q in lora_targets(model, set(cfg["target_modules"])):
        if isinstance(child, Experts):
            # a stack holding part of a layer's experts (expert-sharded ranks) takes its part of the adapters
            first, total = getattr(child, "first", 0), getattr(child, "total", None) or child.n
            for w in ("w1", "w2", "w3"):
                t = getattr(child, w)
                want[f"{q}.lora_A_{w}"], want[f"{q}.lora_B_{w}"] = (total, r, t.shape[2]), (total, t.shape[1], r)
                items += [_Update(t[e], f"{q}.lora_A_{w}", f"{q}.lora_B_{w}", lambda a, b, i=first + e: (a[i], b[i]),
                                  scale, q, w, e) for e in range(t.shape[0])]
        else:
            want[f"{q}.lora_A"], want[f"{q}.lora_B"] = (r, child.in_features), (child.out_features, r)
            items.append(_Update(child.weight, f"{q}.lora_A", f"{q}.lora_B", _whole, scale, q, "weight"))
    missing = sorted(k for k in want if k not in shapes)
    unexpected = sorted(k for k in shapes if k not in want)
    bad = [f"{k}: adapters {list(shapes[k])}, model {list(want[k])}"
           for k in sorted(shapes.keys() & want.keys()) if shapes[k] != want[k]]
    return missing, unexpected, bad, items


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module override: the first pattern that matches the end of the module's name."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            return value
    return default


def _peft_plan(model: nn.Module, cfg: dict, shapes: dict):
    """PEFT's layout: ``base_model.model.<transformers module>.lora_A.weight`` [r, in] and
    ``.lora_B.weight`` [out, r]; module names map onto sparseek's as checkpoint tensor names do
    (``sparseek.checkpoint.names``), per-expert modules onto their expert in the stack."""
    from sparseek.checkpoint.io import stacked_params
    from sparseek.checkpoint.names import target_of

    for opt, why in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save (whole modules saved beside the "
                     "adapters)"), ("fan_in_fan_out", "fan_in_fan_out")):
        if cfg.get(opt):
            raise ValueError(f"PEFT adapters with {why} are not merged by sparseek")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"PEFT adapters with bias={cfg['bias']!r} are not merged by sparseek (DeepSeek's layers "
                         "have no biases)")
    stacked = stacked_params(model)
    suffix_a, suffix_b = ".lora_A.weight", ".lora_B.weight"
    stems = sorted(k[: -len(suffix_a)] for k in shapes if k.endswith(suffix_a))
    unexpected = sorted(k for k in shapes if not k.startswith(PEFT_PREFIX) or not k.endswith((suffix_a, suffix_b))
                        or k[: -len(suffix_a)] not in stems)
    missing, bad, items = [], [], []
    for stem in stems:
        module = stem[len(PEFT_PREFIX):]
        if stem + suffix_b not in shapes:
            missing.append(stem + suffix_b)
            continue
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        if module.endswith(".experts") or ".experts.base_layer" in module:
            fused = _peft_fused_items(model, module, shapes, stem + suffix_a, stem + suffix_b, cfg, stacked)
            if isinstance(fused, str):
                bad.append(fused)
            else:
                items += fused
            continue
        t = target_of(module + ".weight", model.args.is_v4, stacked, model.args.num_hidden_layers)
        owner_name, attr = t.param.rsplit(".", 1)
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            owner = None
        w = getattr(owner, attr, None)
        if not isinstance(w, torch.Tensor):
            unexpected.append(f"{stem} (no {t.param} in this model)")
            continue
        e = None
        if t.expert is not None:  # one expert of a stack (of this rank's part of it, when sharded)
            e = t.expert - getattr(owner, "first", 0)
            if not 0 <= e < w.shape[0]:
                continue
            w = w[e]
        r = shapes[stem + suffix_a][0]
        if shapes[stem + suffix_a] != (r, w.shape[1]) or shapes[stem + suffix_b] != (w.shape[0], r):
            bad.append(f"{module}: lora_A {list(shapes[stem + suffix_a])}, lora_B {list(shapes[stem + suffix_b])}, "
                       f"weight {list(w.shape)}")
            continue
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        items.append(_Update(w, stem + suffix_a, stem + suffix_b, _whole, scale, owner_name, attr, e))
    return missing, unexpected, bad, items


def _peft_fused_items(model, module: str, shapes: dict, key_a: str, key_b: str, cfg: dict, stacked):
    """PEFT's adapters on transformers' fused expert tensors (``target_parameters``; what
    transformers 5 makes of ``gate_proj`` / ``up_proj`` / ``down_proj`` on a MoE): one wrapper per
    tensor, nested (``experts``, ``experts.base_layer``, ...), A [E * r, in] and B [out, r * E], expert
    e's update B.view(out, r, E)[..., e] @ A.view(E, r, in)[e], as PEFT computes it. Which tensor a
    pair adapts follows from its shape: gate_up [E, 2I, D] reads D and writes 2I ([gate; up]),
    down [E, D, I] reads I and writes D; PEFT's rank / alpha patterns name the tensor
    (``.*\\.gate_up_proj``). Returns the items, or what does not fit."""
    from sparseek.checkpoint.names import target_of

    layer = module.split(".base_layer")[0]
    t = target_of(layer + ".gate_up_proj", model.args.is_v4, stacked, model.args.num_hidden_layers)
    if not t.fused:
        return f"{module}: no routed experts here in this model"
    owner_name = t.param.rsplit(".", 1)[0]
    owner = model.get_submodule(owner_name)
    n, inter, dim = owner.w1.shape
    first, total = getattr(owner, "first", 0), getattr(owner, "total", None) or owner.n
    (rows, fan_in), (fan_out, cols) = shapes[key_a], shapes[key_b]
    if rows % total or rows != cols:
        return f"{module}: lora_A {[rows, fan_in]}, lora_B {[fan_out, cols]} for {total} experts"
    r = rows // total
    if (fan_in, fan_out) == (dim, 2 * inter):
        tensor = "gate_up_proj"
    elif (fan_in, fan_out) == (inter, dim):
        tensor = "down_proj"
    else:
        return f"{module}: lora_A {[rows, fan_in]}, lora_B {[fan_out, cols]} fit neither gate_up_proj nor down_proj"
    alpha = _pattern_value(cfg.get("alpha_pattern"), f"{layer}.{tensor}", cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

    def part(w: str, e: int, lo: int, hi: int) -> _Update:
        def pair(a, b):
            return a.view(total, r, fan_in)[first + e], b.view(fan_out, r, total)[lo:hi, :, first + e]
        return _Update(getattr(owner, w)[e], key_a, key_b, pair, scale, owner_name, w, e)

    if tensor == "gate_up_proj":
        return [u for e in range(n) for u in (part("w1", e, 0, inter), part("w3", e, inter, 2 * inter))]
    return [part("w2", e, 0, dim) for e in range(n)]


__all__ = ["save_adapters", "load_adapters", "read_adapters", "merge_adapters", "is_adapter_dir", "adapter_base",
           "ADAPTER_FILE", "ADAPTER_CONFIG"]

"""Load and save models as (sharded) safetensors, never pickle.

Loading memory-maps every file and hands unchanged tensors to the model without a copy; FP8 and
FP4 weights are dequantized to the requested dtype one tensor at a time. Every mismatch between
the checkpoint and the model (missing, unexpected or mis-shaped tensors) is collected and
reported in one ``CheckpointError``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections import defaultdict

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparseek.checkpoint.names import Target, checkpoint_names, target_of
from sparseek.checkpoint.quant import FP8_BLOCK, dequant_fp4, dequant_fp8
from sparseek.config import ModelArgs
from sparseek.model import build_model
from sparseek.model.common import Experts

log = logging.getLogger("sparseek")
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 4 << 30


class CheckpointError(ValueError):
    """The checkpoint does not fit the model; the message lists every problem."""


# ---------------------------------------------------------------------------- reading
# DeepSeek's inference/convert.py writes one file per tensor-parallel rank, model{i}-mp{N}.safetensors
_MP_FILE = re.compile(r"model(\d+)-mp(\d+)\.safetensors")
# ... splitting these (by the name's module) along a dim: column-parallel on 0, row-parallel on 1
_MP_DIMS = {"embed": 0, "head": 0, "wq": 0, "wq_b": 0, "wkv_b": 0, "wo_a": 0, "attn_sink": 0, "weights_proj": 0,
            "w1": 0, "w3": 0, "wo": 1, "wo_b": 1, "w2": 1}


def tensor_parallel_files(path: str) -> list[str] | None:
    """The rank files of a directory DeepSeek's ``convert.py --model-parallel N`` wrote, in rank
    order (None: not such a directory); a missing rank is an error that names it."""
    if not os.path.isdir(path):
        return None
    found = {int(m[1]): int(m[2]) for f in os.listdir(path) if (m := _MP_FILE.fullmatch(f))}
    if not found:
        return None
    sizes = set(found.values())
    if len(sizes) != 1:
        raise CheckpointError(f"{path} mixes tensor-parallel files of several sizes (mp {sorted(sizes)})")
    n = sizes.pop()
    lost = [i for i in range(n) if i not in found]
    if lost:
        raise CheckpointError(f"{path} lacks the tensor-parallel files of ranks {lost} (model{{i}}-mp{n}.safetensors)")
    return [os.path.join(path, f"model{i}-mp{n}.safetensors") for i in range(n)]


def tensor_files(path: str) -> dict[str, str]:
    """tensor name -> file, from an index, a directory of .safetensors, or one file (for
    tensor-parallel rank files, the first rank's file holding the name)."""
    if (ranks := tensor_parallel_files(path)) is not None:
        return {k: v[0] for k, v in _rank_parts(ranks).items()}
    if os.path.isfile(path):
        files = [path]
        root = os.path.dirname(path)
    else:
        root = path
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                wm = json.load(f).get("weight_map")
            if not isinstance(wm, dict):
                raise CheckpointError(f"{index} has no weight_map")
            missing = sorted({v for v in wm.values() if not os.path.exists(os.path.join(path, v))})
            if missing:
                raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
            return {k: os.path.join(path, v) for k, v in wm.items()}
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        # other safetensors may sit beside the weights (a trainer's optimizer state, adapters)
        weights = [f for f in files if os.path.basename(f).startswith("model")]
        files = weights or files
    if not files:
        raise CheckpointError(f"no .safetensors files in {root or path}"
                              + (" (pickled .bin/.pt checkpoints are not loaded, by design)"
                                 if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(root or ".")) else ""))
    out: dict[str, str] = {}
    for fp in files:
        with safe_open(fp, framework="pt") as f:
            for k in f.keys():
                if k in out:
                    raise CheckpointError(f"tensor {k!r} appears in both {out[k]} and {fp}")
                out[k] = fp
    return out


def _rank_parts(ranks: list[str]) -> dict[str, list[str]]:
    parts: dict[str, list[str]] = defaultdict(list)
    for fp in ranks:
        with safe_open(fp, framework="pt") as f:
            for k in f.keys():
                parts[k].append(fp)
    return parts


class _Reader:
    def __init__(self, files: dict[str, str]):
        self.files = files
        self._open: dict[str, object] = {}

    @classmethod
    def of(cls, path: str) -> "_Reader":
        ranks = tensor_parallel_files(path)
        return _Reader(tensor_files(path)) if ranks is None else _RankReader(_rank_parts(ranks))

    def open(self, fp: str):
        if fp not in self._open:
            self._open[fp] = safe_open(fp, framework="pt")
        return self._open[fp]

    def handle(self, name: str):
        return self.open(self.files[name])

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        s = self.handle(name).get_slice(name)
        return tuple(s.get_shape()), s.get_dtype()

    def get(self, name: str) -> torch.Tensor:
        return _fp4_bytes(self.handle(name).get_tensor(name))


class _RankReader(_Reader):
    """DeepSeek's tensor-parallel rank files read as one checkpoint: a routed expert lives in its
    rank's file under its global name; tensors its ``convert.py`` splits (``_MP_DIMS``) are
    concatenated back along their dim, unless every rank holds the same copy (versions of the
    script differ on the shared experts: the weights' first rows decide, a scale follows its weight)."""

    def __init__(self, parts: dict[str, list[str]]):
        super().__init__({k: v[0] for k, v in parts.items()})
        self.parts = parts
        self._dims: dict[str, int | None] = {}

    def split_dim(self, name: str) -> int | None:
        weight = name[:-len("scale")] + "weight"
        if name.endswith(".scale") and weight in self.parts:
            return self.split_dim(weight)  # a scale is split as its weight (its rows could agree by chance)
        if name not in self._dims:
            files, dim = self.parts[name], None
            parts = name.split(".")
            key = parts[-2] if parts[-1] in ("weight", "scale") and len(parts) > 1 else parts[-1]
            if len(files) > 1 and key in _MP_DIMS:
                heads = [_fp4_bytes(self.open(f).get_slice(name)[0:1]) for f in files[:2]]
                dim = None if torch.equal(heads[0], heads[1]) else _MP_DIMS[key]
            self._dims[name] = dim
        return self._dims[name]

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        shape, dt = super().meta(name)
        if (d := self.split_dim(name)) is not None:
            shape = (*shape[:d], shape[d] * len(self.parts[name]), *shape[d + 1:])
        return shape, dt

    def get(self, name: str) -> torch.Tensor:
        if (d := self.split_dim(name)) is None:
            return super().get(name)
        return torch.cat([_fp4_bytes(self.open(f).get_tensor(name)) for f in self.parts[name]], dim=d)


def _fp4_bytes(t: torch.Tensor) -> torch.Tensor:
    """FP4 pairs stored with torch's own dtype (safetensors' F4, as DeepSeek's convert.py writes
    them) as the int8 bytes the checkpoint layout uses elsewhere."""
    return t.view(torch.int8) if t.dtype == torch.float4_e2m1fn_x2 else t


_QUANT_DTYPES = {"F8_E4M3": "fp8", "I8": "fp4", "U8": "fp4", "F4": "fp4"}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
                       "I32": torch.int32}


def _logical_shape(shape: tuple[int, ...], dtype: str) -> tuple[int, ...]:
    if dtype in ("I8", "U8"):  # two FP4 values a byte (F4 states its shape in values already)
        return (*shape[:-1], shape[-1] * 2)
    return shape


def load_model(path: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               args: ModelArgs | None = None, quantized: bool = False, prepare=None) -> nn.Module:
    """Build the model described by ``path/config.json`` and fill it from the safetensors files.

    ``quantized=True`` keeps FP8 / FP4 weights as they are stored (``sparseek.quant``'s layers
    decode them in the forward) instead of dequantizing them to ``dtype`` on load.

    ``prepare(model)`` runs on the model while it is still on the meta device, before any tensor
    is read: it may swap modules (e.g. ``sparseek.parallel.shard_experts_``), and only what the
    result holds is read. An expert stack holding part of a layer's experts says which with
    ``first`` (its first expert's index) and ``total`` (the layer's count), so a rank reads only
    its own experts' bytes."""
    path = os.fspath(path)
    args = args or ModelArgs.from_json(path)
    reader = _Reader.of(path)
    with torch.device("meta"):
        model = build_model(args, dtype=dtype)
    expected = {k: v for k, v in model.state_dict().items()}
    stacked = stacked_params(model)

    plan: dict[str, list[tuple[Target, str]]] = defaultdict(list)
    unexpected = []
    mtp_start = None if args.is_v4 else args.num_hidden_layers  # V3 numbers its MTP layer after the others
    for name in reader.files:
        t = target_of(name, args.is_v4, stacked, mtp_start)
        if t.param in expected:
            plan[t.param].append((t, name))
            if t.fused == "gate_up_proj":  # one fused tensor feeds both w1 (gate) and w3 (up)
                w3 = t.param[:-1] + "3"
                plan[w3].append((Target(w3, fused=t.fused), name))
        elif not _V3_MTP_SHARED.match(t.param):  # V3's MTP layer carries copies of the embedding and head
            unexpected.append(name)

    if len(model.mtp) and not any(p.startswith("mtp.") for p in plan):
        where = "mtp.*" if args.is_v4 else f"model.layers.{args.num_hidden_layers}.*"
        log.warning("checkpoint has no MTP weights (%s): loading without the MTP block", where)
        model.mtp = nn.ModuleList()
        expected = {k: v for k, v in expected.items() if not k.startswith("mtp.")}
    # model tensor -> (the parameter whose plan entries fill it, "weight" / "scale"): kept as raw bytes
    raw = _keep_quantized(model, plan, reader) if quantized else {}
    if quantized and not raw:
        log.warning("%s has no FP8 / FP4 weights to keep quantized: loaded as stored (%s)", path, dtype)
    if raw or prepare is not None:
        if prepare is not None:
            model = prepare(model) or model
        expected = {k: v for k, v in model.state_dict().items() if k in expected or k in raw}
    span = {f"{n}.{p}": (getattr(m, "first", 0), getattr(m, "total", None) or m.n)  # stacked: (first, layer's count)
            for n, m in model.named_modules() if isinstance(m, Experts) for p in ("w1", "w2", "w3")}

    missing, bad_shape = [], []
    for pname, ref in expected.items():
        if raw.get(pname, (None, ""))[1] == "scale":
            continue  # checked with its weight
        entries = plan.get(pname, [])
        weights = [(t, n) for t, n in entries if t.part == "weight"]
        if not weights:
            missing.append(pname if pname not in stacked else f"{pname} (all experts)")
            continue
        if pname in stacked and not any(t.fused for t, _ in weights):
            have = {t.expert for t, _ in weights}
            lost = [e for e in range(span[pname][1]) if e not in have]
            if lost:
                missing.append(f"{pname} experts {_ranges(lost)}")
        for t, n in weights:
            shape, dt = reader.meta(n)
            want = _want_shape(t, ref.shape if pname not in span else (span[pname][1], *ref.shape[1:]))
            got = _raw_shape(shape, dt) if pname in raw else _logical_shape(shape, dt)
            if got != want:
                bad_shape.append(f"{n}: checkpoint {list(shape)} ({dt}), model expects {list(want)}")
            if dt in _QUANT_DTYPES and not any(tt.part == "scale" and tt.expert == t.expert for tt, _ in entries):
                missing.append(f"{n}: quantized ({dt}) but its .scale / .weight_scale_inv is missing")
    if missing or unexpected or bad_shape:
        raise CheckpointError(report_problems(f"checkpoint at {path}", missing, unexpected, bad_shape))

    state: dict[str, torch.Tensor] = {}
    source_dtypes: dict[str, torch.dtype] = {}
    for pname, ref in expected.items():
        if pname in raw:
            src, part = raw[pname]
            state[pname] = _materialize_raw(reader, plan[src], ref, part, span.get(src, (None,))[0])
            continue
        state[pname] = _materialize(reader, plan[pname], ref, span.get(pname, (None,))[0])
        dts = {reader.meta(n)[1] for t, n in plan[pname] if t.part == "weight"}
        if len(dts) == 1 and (dt := _SAFETENSORS_DTYPES.get(dts.pop())) is not None:
            source_dtypes[pname] = dt
    model.load_state_dict(state, assign=True, strict=True)
    # Norms, compressors etc. compute in fp32 but are published in bf16: remember each tensor's
    # published dtype so that saving writes the checkpoint back bit for bit.
    model.checkpoint_dtypes = source_dtypes
    model = model.to(device)
    for m in model.modules():
        if isinstance(m, Experts):
            m.fuse_gate_up_()  # loaded as two tensors; inference then runs one GEMM fewer per expert
    return model


def _keep_quantized(model: nn.Module, plan: dict, reader: "_Reader") -> dict[str, tuple[str, str]]:
    """Swap (on the meta device) each linear layer and expert stack whose checkpoint weights are
    FP8 / FP4 for its ``sparseek.quant`` counterpart in the same format; returns the swapped
    modules' tensors (see ``load_model``)."""
    from sparseek.quant.modules import QuantExperts, QuantLinear, quantizable

    def fmt_of(entries) -> tuple[str, str] | None:
        kinds = set()
        for t, n in entries:
            dt = reader.meta(n)[1]
            if t.part == "weight":
                kinds.add(("w", _QUANT_DTYPES.get(dt)))
            elif t.part == "scale":
                kinds.add(("s", "e8m0" if dt == "F8_E8M0" else "f32" if dt == "F32" else None))
        w = {k for tag, k in kinds if tag == "w"}
        s = {k for tag, k in kinds if tag == "s"}
        if len(w) == 1 and len(s) == 1 and None not in w | s and not any(t.fused for t, _ in entries):
            return w.pop(), s.pop()
        return None

    raw: dict[str, tuple[str, str]] = {}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is Experts:
                params = [f"{full}.{w}" for w in ("w1", "w2", "w3")]
                fmts = {fmt_of(plan.get(p, [])) for p in params}
                if len(fmts) != 1 or None in fmts:
                    continue
                fmt, scale_fmt = fmts.pop()
                n, inter, dim = child.w1.shape
                try:
                    setattr(parent, name, QuantExperts(n, dim, inter, child.limit, fmt, scale_fmt, device="meta",
                                                                  act=child.act_fp8))
                except ValueError:
                    continue
                for p in params:
                    raw[p], raw[f"{p}_scale"] = (p, "weight"), (p, "scale")
            elif quantizable(full, child) and (f := fmt_of(plan.get(f"{full}.weight", []))):
                try:
                    setattr(parent, name, QuantLinear(child.in_features, child.out_features, *f, device="meta"))
                except ValueError:
                    continue
                raw[f"{full}.weight"], raw[f"{full}.scale"] = (f"{full}.weight", "weight"), (f"{full}.weight", "scale")
    return raw


def report_problems(what: str, missing: list[str], unexpected: list[str], bad_shape: list[str]) -> str:
    """One message listing every mismatch between a checkpoint and the model (30 of each kind)."""
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)):
        if items:
            shown = "\n    ".join(items[:30]) + (f"\n    ... and {len(items) - 30} more" if len(items) > 30 else "")
            problems.append(f"  {len(items)} {title}:\n    {shown}")
    return f"{what} does not match the model:\n" + "\n".join(problems)


def _raw_shape(shape: tuple[int, ...], dtype: str) -> tuple[int, ...]:
    """The shape of a checkpoint tensor viewed as bytes."""
    if dtype == "F4":
        return (*shape[:-1], shape[-1] // 2)
    size = {"F32": 4, "BF16": 2, "F16": 2}.get(dtype, 1)
    return (*shape[:-1], shape[-1] * size)


def _materialize_raw(reader: "_Reader", entries, ref: torch.Tensor, part: str, first: int | None) -> torch.Tensor:
    """``first``: the index of the stack's first expert (None: not a stack)."""
    from sparseek.quant.formats import raw_bytes

    names = {t.expert: n for t, n in entries if t.part == part}
    if first is None:
        return raw_bytes(reader.get(names[None]))
    out = torch.empty(ref.shape, dtype=torch.uint8)
    for e in range(ref.shape[0]):
        out[e] = raw_bytes(reader.get(names[first + e]))
    return out


def stacked_params(model: nn.Module) -> set[str]:
    return {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, Experts) for p in ("w1", "w2", "w3")}


_V3_MTP_SHARED = re.compile(r"^mtp\.\d+\.(embed_tokens|shared_head\.head)\.")


def _want_shape(t: Target, ref_shape: torch.Size) -> tuple[int, ...]:
    if t.fused == "gate_up_proj":
        return (ref_shape[0], 2 * ref_shape[1], ref_shape[2])
    if t.fused:
        return tuple(ref_shape)
    return tuple(ref_shape[1:]) if t.expert is not None else tuple(ref_shape)


def _ranges(xs: list[int]) -> str:
    return f"{xs[:10]}{'...' if len(xs) > 10 else ''}"


def _read(reader: _Reader, entries: list[tuple[Target, str]], expert: int | None, dtype: torch.dtype) -> torch.Tensor:
    weight = next(n for t, n in entries if t.part == "weight" and t.expert == expert)
    w = reader.get(weight)
    if w.dtype == torch.float8_e4m3fn:
        scale = reader.get(next(n for t, n in entries if t.part == "scale" and t.expert == expert))
        return dequant_fp8(w, scale, dtype)
    if w.dtype in (torch.int8, torch.uint8):
        scale = reader.get(next(n for t, n in entries if t.part == "scale" and t.expert == expert))
        return dequant_fp4(w, scale, dtype)
    return w.to(dtype)


def _materialize(reader: _Reader, entries, ref: torch.Tensor, first: int | None) -> torch.Tensor:
    """``first``: the index of the stack's first expert (None: not a stack); a stack of fewer
    experts than the layer's reads only its own."""
    dtype = ref.dtype
    if first is None:
        return _read(reader, entries, None, dtype)  # .to(dtype) is a no-op view of the mmap when dtypes agree
    fused = [(t, n) for t, n in entries if t.fused]
    if fused:
        t, n = fused[0]
        w = reader.handle(n).get_slice(n)[first:first + ref.shape[0]].to(dtype)
        if t.fused == "gate_up_proj":  # transformers packs [gate; up] along dim 1
            inter = ref.shape[1]
            w = w[:, :inter] if t.param.endswith(".w1") else w[:, inter:]
        return w.contiguous()
    out = torch.empty(ref.shape, dtype=dtype)
    for e in range(ref.shape[0]):
        out[e] = _read(reader, entries, first + e, dtype)
    return out


# ---------------------------------------------------------------------------- writing
def checkpoint_state(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors (or ``state``, e.g. gathered from ranks) under their published names."""
    args: ModelArgs = model.args
    sd = dict(state if state is not None else model.state_dict())
    published = _published_quantized(model)  # quantized layers: their bytes in the checkpoint's dtypes
    sd.update((k, v) for k, v in published.items() if k in sd)
    stacked = {k for k, v in sd.items() if re.search(r"\.experts\.w[123](_scale)?$", k) and v.dim() == 3}
    dtypes = getattr(model, "checkpoint_dtypes", {})
    out: dict[str, torch.Tensor] = {}
    for pname, t in sd.items():
        t = t.detach()
        if pname in dtypes and pname not in published:
            t = t.to(dtypes[pname])
        for cname, e in checkpoint_names(pname, tuple(t.shape), stacked, args.is_v4, args.num_hidden_layers):
            out[cname] = (t[e] if e is not None else t).contiguous().cpu()
    if not args.is_v4 and any(k.startswith("mtp.") for k in sd):
        # V3's MTP layers publish their own copies of the embedding and head (vLLM and SGLang read them)
        for k in range(args.n_mtp):
            layer = f"model.layers.{args.num_hidden_layers + k}."
            for cname in [n for n in out if n.startswith(("model.embed_tokens.", "lm_head."))]:
                copy = layer + (cname.replace("model.embed_tokens.", "embed_tokens.") if cname.startswith("model.")
                                else cname.replace("lm_head.", "shared_head.head."))
                out[copy] = out[cname].clone()
    return out


def _quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from sparseek.quant.modules import QuantExperts, QuantLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExperts))]


def _published_quantized(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, m in _quantized_layers(model) for k, v in m.published().items()}


def side_file(model, name: str) -> str | None:
    """The file ``name`` (e.g. generation_config.json) that belongs with the checkpoint ``model``
    (a path or preset name): in its folder, or for an adapter directory in its base's."""
    if not isinstance(model, str) or not os.path.isdir(model):
        return None
    path = os.path.join(model, name)
    if os.path.isfile(path):
        return path
    from sparseek.checkpoint.adapters import adapter_base, is_adapter_dir

    return side_file(adapter_base(model), name) if is_adapter_dir(model) else None


def save_model(model: nn.Module, directory: str, tokenizer=None, max_shard_bytes: int = MAX_SHARD_BYTES,
               state: dict[str, torch.Tensor] | None = None, extra_files=()) -> None:
    """Write config.json + sharded safetensors (+ tokenizer files, + ``extra_files`` copied as
    they are, e.g. the source's generation_config.json) atomically into ``directory``.

    Files are written into a temporary folder next to ``directory`` and moved in only when all of
    them are complete, so an interrupted save never leaves a half-written checkpoint behind.
    """
    directory = os.fspath(directory)
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".sparseek-save-", dir=parent)
    try:
        tensors = checkpoint_state(model, state)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(tensors, key=_natural_key):
            t = tensors[name]
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        if n > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        model.args.save(tmp)
        _record_dtype(model, tmp)
        _record_quantization(model, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        for path in extra_files:
            shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
        os.makedirs(directory, exist_ok=True)
        stale = [f for f in os.listdir(directory) if f.endswith(".safetensors") or f == INDEX_FILE]
        for f in stale:
            if f not in os.listdir(tmp):
                os.remove(os.path.join(directory, f))
        for f in os.listdir(tmp):
            os.replace(os.path.join(tmp, f), os.path.join(directory, f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _record_dtype(model: nn.Module, directory: str) -> None:
    """For a model built here (a preset, a trained one), config.json's ``torch_dtype`` names the
    dtype its weights were saved in (the embedding's: never quantized), so that loading without a
    dtype gives the model back as it was. A loaded checkpoint is saved in its own dtypes, and its
    config as it was read."""
    if getattr(model, "checkpoint_dtypes", None):
        return
    emb = getattr(model, "embed", None)
    dtype = getattr(getattr(emb, "weight", None), "dtype", None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def _record_quantization(model: nn.Module, directory: str) -> None:
    """config.json's ``quantization_config`` says what the files hold, as DeepSeek's configs do (FP8
    128 x 128 blocks, dynamic activation scales; ``scale_fmt: ue8m0`` for e8m0 scales; V4's
    ``expert_dtype``): written when the model has quantized layers, dropped when a quantized
    checkpoint was loaded dequantized (its files now hold plain weights, and a reader trusting the
    old entry would misread them)."""
    from sparseek.quant.modules import QuantExperts

    fmts = {(m.fmt, m.scale_fmt, isinstance(m, QuantExperts)) for _, m in _quantized_layers(model)}
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if not fmts:
        if "quantization_config" not in cfg:
            return
        cfg.pop("quantization_config")
    else:
        qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
        if any(s == "e8m0" for _, s, _ in fmts):
            qc["scale_fmt"] = "ue8m0"
        cfg["quantization_config"] = qc
        experts = {f for f, _, is_experts in fmts if is_experts}
        if model.args.is_v4 and len(experts) == 1:
            cfg["expert_dtype"] = experts.pop()
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]

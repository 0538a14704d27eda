"""Training checkpoints: model in the published layout + trainer state in safetensors, written atomically.

A checkpoint directory ``step-000200/`` holds what ``sparseek.load`` needs (config.json, model
safetensors, tokenizer) plus, per rank, ``trainer-rank00000.safetensors`` (that rank's optimizer
tensors -- its FSDP shards and its experts' moments in a sharded run -- and RNG state, with the
nesting as JSON metadata) and ``trainer.json`` (step, world size, run scalars), written last as
the mark of a complete checkpoint. Everything is written into a temporary directory and renamed
into place, and ``latest`` is replaced atomically, so a crash never leaves a half-written
checkpoint as the one to resume from. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sparseek.checkpoint.io import save_model
from sparseek.parallel import local_tensor

STEP_DIR = re.compile(r"^step-(\d+)$")


def _flatten(obj, prefix: str, tensors: dict):
    """Split a nested structure into tensors (safetensors) and JSON-able leaves. A sharded
    (DTensor) tensor is stored as this rank's shard."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = local_tensor(obj).detach().contiguous().cpu()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), _flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    return obj


def _key(k):
    return {"int": k} if isinstance(k, int) else k


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {(k["int"] if isinstance(k, dict) else k): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
    return obj


def save_checkpoint(out_dir: str, step: int, model, tokenizer, optimizer, extra: dict, keep_last: int = 3,
                    state: dict | None = None) -> str | None:
    """Write ``out_dir/step-NNNNNN``. In a distributed run every rank calls this (each writes its
    own trainer state; rank 0 the model, whose gathered tensors ``state`` holds) and rank 0 gets
    the path; the others get None."""
    rank, world = _rank_world()
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, f"step-{step:06d}")
    tmp = tempfile.mkdtemp(prefix=".tmp-step-", dir=out_dir) if rank == 0 else None
    if world > 1:  # every rank writes its shard into the directory rank 0 made (a shared file system)
        box = [tmp]
        dist.broadcast_object_list(box, src=0)
        tmp = box[0]
    try:
        if rank == 0:  # first: saving a model clears other safetensors from its directory
            save_model(model, tmp, tokenizer=tokenizer, state=state)
            tensors: dict[str, torch.Tensor] = {}
            meta = {"step": step, "world_size": world, "extra": _flatten(extra, "extra", tensors)}
            save_file(tensors, os.path.join(tmp, "trainer.safetensors"))
        if world > 1:
            dist.barrier()
        tensors = {}
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state()
        nested = {"optimizer": _flatten(optimizer.state_dict(), "optimizer", tensors) if optimizer is not None
                  else None, "rng": _flatten(rng, "rng", tensors)}
        save_file(tensors, os.path.join(tmp, _rank_file(rank)), metadata={"state": json.dumps(nested)})
        if world > 1:
            dist.barrier()  # every shard is on disk before the checkpoint is marked complete
        if rank == 0:
            with open(os.path.join(tmp, "trainer.json"), "w", encoding="utf-8") as f:
                json.dump(meta, f)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank != 0:
        return None
    _write_latest(out_dir, os.path.basename(final))
    _prune(out_dir, keep_last)
    return final


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_file(rank: int) -> str:
    return f"trainer-rank{rank:05d}.safetensors"


def _write_latest(out_dir: str, name: str) -> None:
    tmp = os.path.join(out_dir, f".latest.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
    os.replace(tmp, os.path.join(out_dir, "latest"))


def _prune(out_dir: str, keep_last: int) -> None:
    steps = sorted((int(m.group(1)), d) for d in os.listdir(out_dir) if (m := STEP_DIR.match(d)))
    for _, d in steps[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)


def latest_checkpoint(out_dir: str) -> str | None:
    """The newest complete checkpoint (``latest`` if it points at one, else the highest step)."""
    if not os.path.isdir(out_dir):
        return None
    p = os.path.join(out_dir, "latest")
    if os.path.exists(p):
        name = open(p, encoding="utf-8").read().strip()
        if os.path.exists(os.path.join(out_dir, name, "trainer.json")):
            return os.path.join(out_dir, name)
    steps = sorted((int(m.group(1)), d) for d in os.listdir(out_dir) if (m := STEP_DIR.match(d))
                   and os.path.exists(os.path.join(out_dir, d, "trainer.json")))
    return os.path.join(out_dir, steps[-1][1]) if steps else None


def load_trainer_state(ckpt_dir: str) -> dict:
    """This rank's trainer state. A run resumes with as many ranks as wrote the checkpoint (each
    rank's optimizer shards belong to its slice of the model)."""
    rank, world = _rank_world()
    with open(os.path.join(ckpt_dir, "trainer.json"), encoding="utf-8") as f:
        meta = json.load(f)
    saved_world = meta.get("world_size", 1)
    if saved_world != world:
        raise ValueError(f"{ckpt_dir} was written by {saved_world} rank(s); resume it with the same number "
                         f"(this run has {world}) -- or load its weights alone with sparseek.load")
    path = os.path.join(ckpt_dir, _rank_file(rank))
    if not os.path.exists(path):
        raise ValueError(f"{ckpt_dir} has no {_rank_file(rank)} (an incomplete checkpoint, or one from an older "
                         "sparseek): its weights still load with sparseek.load, its optimizer state does not")
    with safe_open(path, framework="pt") as f:
        nested = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return {
        "step": meta["step"],
        "optimizer": _unflatten(nested["optimizer"], tensors),
        "rng": _unflatten(nested["rng"], tensors),
        "extra": _unflatten(meta["extra"], load_file(os.path.join(ckpt_dir, "trainer.safetensors"))),
    }


def restore_sharded_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of saved shards: give every state tensor of a sharded
    (DTensor) parameter its parameter's sharding back."""
    from torch.distributed.tensor import DTensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            st = optimizer.state[p]
            for k, v in list(st.items()):
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.to_local().shape:
                    st[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                               stride=p.stride(), run_check=False)

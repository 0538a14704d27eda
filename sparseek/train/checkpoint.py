"""Training checkpoints: model in the published layout + trainer state in safetensors, written atomically.

A checkpoint directory ``step-000200/`` holds what ``sparseek.load`` needs (config.json, model
safetensors, tokenizer) plus ``trainer.safetensors`` (optimizer tensors, RNG states) and
``trainer.json`` (step, scalars, optimizer hyper-parameters). Everything is written into a
temporary directory and renamed into place, and ``latest`` is replaced atomically, so a crash
never leaves a half-written checkpoint as the one to resume from. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

from sparseek.checkpoint.io import save_model

STEP_DIR = re.compile(r"^step-(\d+)$")


def _flatten(obj, prefix: str, tensors: dict):
    """Split a nested structure into tensors (safetensors) and JSON-able leaves."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().contiguous().cpu()
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
                    state: dict | None = None) -> str:
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, f"step-{step:06d}")
    tmp = tempfile.mkdtemp(prefix=".tmp-step-", dir=out_dir)
    try:
        save_model(model, tmp, tokenizer=tokenizer, state=state)
        tensors: dict[str, torch.Tensor] = {}
        state = {
            "step": step,
            # a sharded run saves the weights only (its optimizer state lives in shards)
            "optimizer": _flatten(optimizer.state_dict(), "optimizer", tensors) if optimizer is not None else None,
            "rng": _flatten({"torch": torch.get_rng_state()}, "rng", tensors),
            "extra": _flatten(extra, "extra", tensors),
        }
        save_file(tensors, os.path.join(tmp, "trainer.safetensors"))
        with open(os.path.join(tmp, "trainer.json"), "w", encoding="utf-8") as f:
            json.dump(state, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_latest(out_dir, os.path.basename(final))
    _prune(out_dir, keep_last)
    return final


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
    with open(os.path.join(ckpt_dir, "trainer.json"), encoding="utf-8") as f:
        state = json.load(f)
    tensors = load_file(os.path.join(ckpt_dir, "trainer.safetensors"))
    return {
        "step": state["step"],
        "optimizer": _unflatten(state["optimizer"], tensors),
        "rng": _unflatten(state["rng"], tensors),
        "extra": _unflatten(state["extra"], tensors),
    }

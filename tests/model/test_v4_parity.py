"""Our DeepSeek-V4 against transformers' DeepseekV4ForCausalLM, weights moved only through checkpoints."""

from __future__ import annotations

import pytest
import torch

import sparseek
from sparseek.model import build_model
from tests.conftest import randomize_, rel_err

transformers = pytest.importorskip("transformers")

LENGTHS = (1, 3, 4, 5, 127, 128, 129, 131, 300, 600)


def _args():
    # transformers clamps the shared expert's SwiGLU; DeepSeek's code does not. Match the reference
    # we compare against.
    return sparseek.preset("debug", clamp_shared_expert=True)


def _ids(seed: int, T: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(1000 + seed + T))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ours_to_transformers(tmp_path, seed):
    args = _args()
    ours = randomize_(build_model(args), seed).eval()
    sparseek.save(ours, tmp_path)
    theirs, info = transformers.DeepseekV4ForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    theirs.eval()
    with torch.no_grad():
        for T in LENGTHS:
            ids = _ids(seed, T, args.vocab_size)
            err = rel_err(ours(ids), theirs(ids).logits)
            assert err <= 1e-4, f"T={T}: relative max error {err:.2e}"


@pytest.mark.parametrize("seed", [3, 4])
def test_transformers_to_ours(tmp_path, seed):
    args = _args()
    cfg = transformers.DeepseekV4Config(**{k: v for k, v in args.to_dict().items()
                                           if k not in ("architectures",)})
    theirs = randomize_(transformers.DeepseekV4ForCausalLM(cfg), seed).eval()
    theirs.save_pretrained(tmp_path)
    ours, _ = sparseek.load(str(tmp_path), dtype=torch.float32, tokenizer=False)
    assert len(ours.mtp) == 0  # transformers has no MTP block; we load without it
    with torch.no_grad():
        for T in LENGTHS:
            ids = _ids(seed, T, args.vocab_size)
            err = rel_err(ours(ids), theirs(ids).logits)
            assert err <= 1e-4, f"T={T}: relative max error {err:.2e}"


def test_shared_expert_clamp_switch_matters(tmp_path):
    """The clamp switch is real: with large activations the two settings disagree."""
    a = sparseek.preset("debug")
    m = randomize_(build_model(a), 0)
    with torch.no_grad():
        for layer in m.layers:
            layer.ffn.shared_experts.w3.weight.mul_(50)
    ids = _ids(0, 64, a.vocab_size)
    unclamped = m(ids)
    for layer in m.layers:
        layer.ffn.shared_experts.limit = a.swiglu_limit
    assert rel_err(m(ids), unclamped) > 1e-3

"""Our DeepSeek-V4 against transformers' DeepseekV4ForCausalLM, weights moved only through checkpoints."""

from __future__ import annotations

import pytest
import torch

import sparseek
from sparseek.model import build_model
from tests.conftest import IndexTieCounter, randomize_, rel_err, tie_free_ids

transformers = pytest.importorskip("transformers")

LENGTHS = (1, 3, 4, 5, 127, 128, 129, 131, 300, 600)


def _args():
    # transformers clamps the shared expert's SwiGLU; DeepSeek's code does not. Match the reference
    # we compare against.
    return sparseek.preset("debug", clamp_shared_expert=True)




@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ours_to_transformers(tmp_path, seed):
    args = _args()
    ours = randomize_(build_model(args), seed).eval()
    sparseek.save(ours, tmp_path)
    theirs, info = transformers.DeepseekV4ForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    theirs.eval()
    _compare(ours, theirs, seed)


def _compare(ours, theirs, seed):
    with torch.no_grad():
        for T in LENGTHS:
            ids = tie_free_ids(ours, 2, T, seed)
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
    _compare(ours, theirs, seed)


def test_top_k_ties_do_not_break_causality():
    """On tied indexer scores our pick does not depend on how many tokens follow (transformers'
    unstable top-k does): logits at position t are the same for any sequence length > t."""
    m = randomize_(build_model(_args()), 1).eval()
    for s in range(20):
        ids = torch.randint(0, 512, (2, 300), generator=torch.Generator().manual_seed(s))
        with IndexTieCounter() as c, torch.no_grad():
            full = m(ids)
        if c.count:
            break
    assert c.count, "no input with ties found; the test needs one"
    with torch.no_grad():
        for T in (40, 100, 250):
            assert rel_err(m(ids[:, :T]), full[:, :T]) < 1e-5


def test_shared_expert_clamp_switch_matters(tmp_path):
    """The clamp switch is real: with large activations the two settings disagree."""
    a = sparseek.preset("debug")
    m = randomize_(build_model(a), 0)
    with torch.no_grad():
        for layer in m.layers:
            layer.ffn.shared_experts.w3.weight.mul_(50)
    ids = torch.randint(0, a.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    unclamped = m(ids)
    for layer in m.layers:
        layer.ffn.shared_experts.limit = a.swiglu_limit
    assert rel_err(m(ids), unclamped) > 1e-3

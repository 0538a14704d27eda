"""Triton kernels against their PyTorch references, through Triton's CPU interpreter
(``TRITON_INTERPRET=1``): the same kernel source that runs on a GPU."""

import pytest
import torch

import sparseek
from sparseek.model import build_model, kernels
from tests.conftest import randomize_, rel_err

pytestmark = pytest.mark.skipif(not kernels.available(), reason="triton is not installed")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "enabled", True)


def _reference(q, w, keys, n_vis):
    s = torch.einsum("bqic,bnc->bqin", q.float(), keys.float()).relu_()
    s = torch.einsum("bqin,bqi->bqn", s, w)
    return s.masked_fill(torch.arange(keys.shape[1]) >= n_vis[..., None], float("-inf"))


# fp16 stands in for bf16 (same code path: tensor-core dot, fp32 accumulation): the interpreter
# computes through numpy, which has no bfloat16
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-3)])
@pytest.mark.parametrize("B,Q,H,C,N", [(1, 1, 4, 16, 7), (2, 37, 3, 24, 70)])  # ragged tiles, C not a power of 2
def test_indexer_scores_equal_reference(interpret, dtype, tol, B, Q, H, C, N):
    g = torch.Generator().manual_seed(Q)
    q = torch.randn(B, Q, H, C, generator=g).to(dtype)
    keys = torch.randn(B, N, C, generator=g).to(dtype)
    w = torch.randn(B, Q, H, generator=g)
    n_vis = torch.randint(0, N + 1, (B, Q), generator=g)
    got = kernels.indexer_scores(q, w, keys, n_vis)
    want = _reference(q, w, keys, n_vis)
    assert torch.equal(got.isinf(), want.isinf())
    fin = want.isfinite()
    assert rel_err(got[fin], want[fin]) < tol


def test_model_with_kernel_equals_model_without(interpret, monkeypatch):
    """A prefill long enough for the indexer to pick (more entries than top-k) picks the same
    entries through the kernel as through the einsums."""
    model = randomize_(build_model(sparseek.preset("debug")), 3).eval()
    ids = torch.randint(0, model.args.vocab_size, (2, 4 * model.args.index_topk + 40),
                        generator=torch.Generator().manual_seed(1))
    calls = []
    orig = kernels.indexer_scores
    monkeypatch.setattr(kernels, "indexer_scores", lambda *a: calls.append(1) or orig(*a))
    with torch.no_grad():
        fused = model(ids)
        assert calls
        monkeypatch.setattr(kernels, "enabled", False)
        plain = model(ids)
    assert rel_err(fused, plain) < 1e-5


def test_kernel_not_used_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernels.usable(torch.zeros(1))

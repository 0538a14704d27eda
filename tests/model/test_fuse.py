"""Small products fused by the compiler (sparseek.model.fuse) and the compiled mHC hot paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import sparseek
from sparseek.model import build_model, v4
from sparseek.model.fuse import fusing_backend
from tests.conftest import randomize_, rel_err


def _products(x_1K, w_NK, a_BMK, b_BKN, bias_N, comb_NSS, res_NSD):
    return (F.linear(x_1K, w_NK), F.linear(x_1K, w_NK, bias_N), torch.bmm(a_BMK, b_BKN),
            torch.matmul(comb_NSS.transpose(-1, -2), res_NSD))


def _compiled_code(fn, *args):
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(fn, dynamic=False, backend=fusing_backend()), *args)
    return out, "\n".join(code)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_row_small_and_short_products_become_fused_reductions(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = ((1, 96), (80, 96), (2, 4, 24), (2, 24, 40), (80,), (300, 4, 4), (300, 4, 1024))  # last: 4.9M MACs, K=4
    args = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    got, code = _compiled_code(_products, *args)
    assert "extern_kernels." not in code.replace("import extern_kernels", "")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for g_, r in zip(got, _products(*(a.double() for a in args))):
        assert g_.dtype == dtype and rel_err(g_, r) <= tol


def test_many_rows_keep_the_library_gemm():
    """A reduction would re-read the weight once per row: prefill-sized products stay GEMMs."""
    x, w = torch.randn(16, 96), torch.randn(80, 96)
    a, b = torch.randn(4, 64, 64), torch.randn(4, 64, 128)  # 2M multiply-adds over K=64: above both cuts
    (y, z), code = _compiled_code(lambda x, w, a, b: (F.linear(x, w), torch.bmm(a, b)), x, w, a, b)
    assert "extern_kernels.mm" in code and "extern_kernels.bmm" in code
    torch.testing.assert_close(y, F.linear(x, w))
    torch.testing.assert_close(z, torch.bmm(a, b))


@pytest.mark.parametrize("rows", [1, 4])
def test_few_row_products_fuse_up_to_rows(rows):
    """``rows``: the most rows an ``mm``/``addmm`` may have to become a reduction (a speculative
    verify step's k + 1 tokens); one more row keeps the library GEMM. Same values either way."""
    g = torch.Generator().manual_seed(1)
    w, bias = torch.randn(80, 96, generator=g).bfloat16(), torch.randn(80, generator=g).bfloat16()
    for m in (rows, rows + 1):
        x = torch.randn(m, 96, generator=g).bfloat16()
        torch._dynamo.reset()
        fn = torch.compile(lambda x, w, b: (F.linear(x, w), F.linear(x, w, b)), dynamic=False,
                           backend=fusing_backend(rows=rows))
        got, code = run_and_get_code(fn, x, w, bias)
        code = "\n".join(code)
        assert ("extern_kernels.mm" in code or "extern_kernels.addmm" in code) == (m > rows), m
        for y, r in zip(got, (F.linear(x.double(), w.double()), F.linear(x.double(), w.double(), bias.double()))):
            assert y.dtype == torch.bfloat16 and rel_err(y, r) <= 1e-2


# bf16: the slowest test of the suite on a CPU without bf16 matrix units (~5 min of compiling and
# scalar bf16 GEMMs here), so it runs with the slow tests (pytest -m slow)
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_compiled_hot_paths_equal_eager(eager_hot_paths, dtype):
    """compile_hot_paths() (what `train --compile` and LLM(compile=True) use): same logits and
    gradients (the indexers' included) as the eager functions, for two prompt lengths (the second
    makes T symbolic); in
    bf16 the routed experts' grouped GEMMs stay inside the compiled graph (fp32: outside)."""
    torch._dynamo.reset()
    model = randomize_(build_model(sparseek.preset("debug"), dtype=dtype), 3)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    g = torch.Generator().manual_seed(0)

    learners = [b.attn for b in model.layers if b.attn.indexer is not None]

    def run(T):  # with the indexers' KL loss, as `sparseek train` runs (T = 40: the indexer picks)
        ids = torch.randint(3, model.args.vocab_size, (2, T), generator=g)
        model.zero_grad()
        for a in learners:
            a.learn_indexer = True
        logits = model(ids)
        kl = sum(a.indexer_loss for a in learners)
        (logits.float().square().mean() + kl).backward()
        for a in learners:
            a.learn_indexer, a.indexer_loss = False, None
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = [run(T) for T in (24, 40)]
    eager = [getattr(m, n) for m, n, _ in v4.hot_paths()]
    v4.compile_hot_paths()
    assert all(getattr(m, n) is not f for (m, n, _), f in zip(v4.hot_paths(), eager))
    g.manual_seed(0)
    from torch._dynamo.utils import counters

    counters.clear()
    got = [run(T) for T in (24, 40)]
    breaks = sum(counters["graph_break"].values())  # the grouped GEMMs leave the graph in fp32 only
    assert (breaks > 0) == (dtype == torch.float32), dict(counters["graph_break"])
    for (lr, gr), (lg, gg) in zip(ref, got):
        assert rel_err(lg, lr) < tol
        assert gr.keys() == gg.keys()
        assert max(rel_err(gg[n], gr[n]) for n in gr) < 10 * tol


def test_recompile_limit_where_torch_compile_has_none(monkeypatch):
    """torch < 2.12 (the GPU image's 2.11) has no per-function ``recompile_limit``: passing it
    would fail, so the process-wide limit is raised instead, and never lowered. (Config values
    change under ``config.patch``: monkeypatch's undo deletes a config entry.)"""
    def old_compile(model=None, *, fullgraph=False, dynamic=None, backend="inductor", mode=None, options=None,
                    disable=False):
        raise AssertionError("not called")

    cfg = torch._dynamo.config
    before = cfg.recompile_limit
    with cfg.patch(recompile_limit=8):
        assert v4._recompile_limit() == {"recompile_limit": v4.HOT_PATH_RECOMPILES}
        assert cfg.recompile_limit == 8
        monkeypatch.setattr(torch, "compile", old_compile)
        assert v4._recompile_limit() == {} and cfg.recompile_limit == v4.HOT_PATH_RECOMPILES
    with cfg.patch(recompile_limit=500):
        assert v4._recompile_limit() == {} and cfg.recompile_limit == 500
    assert cfg.recompile_limit == before


def test_vectorized_bitcasts_keep_the_bits():
    """``vectorize_bitcasts``: inductor's CPU code reinterprets int32 vectors as float32 (and back)
    in registers instead of its scalar loop, with the same bits (denormal and negative-zero
    patterns included; no NaNs, whose payloads arithmetic may change)."""
    from sparseek.model.fuse import vectorize_bitcasts

    vectorize_bitcasts()

    def f(words, x):
        fl = ((words << 3) & -0x40000001).view(torch.float32) * 2.0  # a float read from bits (< 2^1)
        return fl, (x.view(torch.int32) ^ 0x55).view(torch.float32)  # and a round trip

    g = torch.Generator().manual_seed(0)
    words = torch.randint(-2**31, 2**31 - 1, (4096,), dtype=torch.int32, generator=g)
    words[:3] = torch.tensor([1, -0x80000000 >> 3, 0], dtype=torch.int32)  # a denormal, -0, 0
    x = torch.randn(4096, generator=g)
    want = f(words, x)
    got, code = _compiled_code(f, words, x)
    for a, b in zip(got, want):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert "at::vec::cast<float, int32_t>" in code and "at::vec::cast<int32_t, float>" in code

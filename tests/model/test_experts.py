"""The grouped expert computation (one grouped GEMM per matrix, no host sync) against the per-expert
loop it replaces, and the fixed-shape decode path against both."""

import pytest
import torch

from sparseek.model.common import Experts, grouped_ffn


def _experts(dtype, n=8, dim=64, inter=32):
    torch.manual_seed(0)
    ex = Experts(n, dim, inter, limit=7.0, dtype=dtype)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return ex


def _routing(n_tok, n, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(n_tok)])
    idx[: n_tok // 2, 0] = 2  # one crowded expert...
    idx[idx == 5] = 6  # ...and one that gets no token at all
    return torch.rand(n_tok, k, generator=g), idx


def _run(ex, x, w, idx, grouped):
    ex.grouped = grouped
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    ex.zero_grad()
    y = ex(x, w, idx)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, w.grad, [p.grad.clone() for p in ex.parameters()]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_grouped_equals_loop_forward_and_backward(dtype, tol):
    ex = _experts(dtype)
    w, idx = _routing(37, ex.n, 3)
    assert not (idx == 5).any() and (idx == 2).sum() > 18
    x = torch.randn(37, 64, dtype=dtype)
    got, want = _run(ex, x, w, idx, True), _run(ex, x, w, idx, False)
    for a, b in zip([got[0], got[1], got[2], *got[3]], [want[0], want[1], want[2], *want[3]]):
        err = (a.float() - b.float()).abs().max() / b.float().abs().max()
        assert err < tol, err
    assert got[3][0][5].abs().max() == 0  # the idle expert gets no gradient


@pytest.mark.parametrize("sizes", [[1, 0, 9, 8], [3, 9, 0, 0]])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("pad", [True, False])  # the GPU's layout; the CPU's
def test_grouped_ffn_rows_and_padding(sizes, grad, pad):
    """Rows already sorted by expert come back in the same order, each through its own expert,
    whatever the group sizes (0, 1, 8, 9 rows: below, at and past the 8-row alignment; idle last
    experts), with autograd on (the last group spans the buffer's tail) or off (it does not)."""
    ex = _experts(torch.float32, n=4)
    e = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    x = torch.randn(len(e), 64)
    s = torch.rand(len(e))
    with torch.set_grad_enabled(grad):
        got = grouped_ffn(x, e, ex.w1, ex.w2, ex.w3, ex.limit, s, pad=pad)
    assert got.isfinite().all()
    for r in range(len(e)):
        i = int(e[r])
        h = torch.nn.functional.silu((x[r] @ ex.w1[i].t()).clamp(max=7)) * (x[r] @ ex.w3[i].t()).clamp(-7, 7)
        torch.testing.assert_close(got[r], (h * s[r]) @ ex.w2[i].t(), rtol=1e-5, atol=1e-5)


def test_static_step_switches_to_grouped_for_many_tokens():
    """A fixed-shape step gathers per-pair experts only for a few tokens; for many it runs the
    grouped path. Both equal the per-expert loop."""
    from sparseek.model.common import MoE
    import sparseek

    args = sparseek.preset("debug")
    torch.manual_seed(0)
    moe = MoE(args, hash_routed=False)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    for n_tok in (1, 3 * args.n_routed_experts):
        x = torch.randn(n_tok, 1, args.hidden_size)
        moe.experts.grouped = True
        static = moe(x, static=True)
        moe.experts.grouped = False
        loop = moe(x)
        torch.testing.assert_close(static, loop, rtol=1e-4, atol=1e-5)


def test_grouped_under_autocast_matches_loop():
    """fp32 weights, bf16 autocast (the trainer's GPU setting): the grouped GEMM casts like the
    Linear layers around it do, and gradients reach the fp32 weights."""
    ex = _experts(torch.float32)
    w, idx = _routing(21, ex.n, 3)
    x = torch.randn(21, 64)
    outs = []
    for grouped in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(_run(ex, x, w, idx, grouped))
    (y1, _, _, g1), (y2, _, _, g2) = outs
    assert g1[0].dtype == torch.float32
    torch.testing.assert_close(y1.float(), y2.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() / b.abs().max() < 2e-2


@pytest.mark.parametrize("pad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_up_read_as_one_matrix_without_a_copy(pad, dtype):
    """Experts allocates w1 and w3 as the halves of one buffer, so inference reads them as one
    [E, 2I, D] matrix (one grouped GEMM instead of two) with the same result; training keeps them
    apart for autograd; separate tensors (a cast, a loaded checkpoint) take the two-GEMM path until
    fuse_gate_up_() moves them back together, values unchanged."""
    from sparseek.model.common import gate_up_view

    ex = _experts(dtype)
    w, idx = _routing(37, ex.n, 3)
    x = torch.randn(37, 64, dtype=dtype)
    with torch.no_grad():
        w13 = gate_up_view(ex.w1, ex.w3)
        assert w13 is not None and w13.shape == (8, 64, 64)
        assert w13.data_ptr() == ex.w1.data_ptr() and torch.equal(w13[:, 32:], ex.w3)
        e = idx.reshape(-1).sort(stable=True).values
        xs = x[idx.reshape(-1).argsort(stable=True) // 3]
        one = grouped_ffn(xs, e, ex.w1, ex.w2, ex.w3, ex.limit, pad=pad, w13=w13)
        two = grouped_ffn(xs, e, ex.w1, ex.w2, ex.w3, ex.limit, pad=pad)
        torch.testing.assert_close(one, two, rtol=1e-6, atol=1e-6)
    assert gate_up_view(ex.w1, ex.w3) is None  # autograd on, weights require grad
    ex.w3.data = ex.w3.data.clone()  # what a load or a cast leaves: two tensors
    w1, w3 = ex.w1.detach().clone(), ex.w3.detach().clone()
    with torch.no_grad():
        assert gate_up_view(ex.w1, ex.w3) is None
        ex.fuse_gate_up_()
        assert gate_up_view(ex.w1, ex.w3) is not None
    assert torch.equal(ex.w1, w1) and torch.equal(ex.w3, w3) and ex.w1.requires_grad


def test_loaded_checkpoint_reads_gate_up_as_one(tmp_path):
    import sparseek
    from sparseek.model.common import Experts, gate_up_view

    model, _ = sparseek.load("debug", tokenizer=False)
    sparseek.save(model, tmp_path)
    loaded, _ = sparseek.load(str(tmp_path), tokenizer=False)
    experts = [m for m in loaded.modules() if isinstance(m, Experts)]
    with torch.no_grad():
        assert experts and all(gate_up_view(m.w1, m.w3) is not None for m in experts)
    ids = torch.randint(0, model.args.vocab_size, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_batched_rows_cost_model():
    """Even, small groups run as one padded bmm (L = the largest group); one crowded expert keeps
    its extra rows apart (0 < L < its count); a few experts with many rows each keep one GEMM
    call per expert (L = 0)."""
    from sparseek.model.common import batched_rows

    assert batched_rows([4, 3, 5, 4] * 8) == 5
    assert 0 < batched_rows([4] * 31 + [300]) < 300
    assert batched_rows([0] * 28 + [400] * 4) == 0


def test_padded_bmm_orientation():
    """The cost model runs the padded bmm as x @ W^T at a few rows per expert (a decode step),
    as the transposed W @ x^T at many, and always prices the cheaper of the two."""
    from sparseek.model.common import _bmm_us, _x_first

    assert _x_first(1) and _x_first(8) and not _x_first(128)
    assert all(_bmm_us(L) <= _bmm_us(L + 1) for L in range(256))


@pytest.mark.parametrize("sizes", [
    [3, 1, 0, 2, 4, 1, 2, 3],          # all padded into one bmm
    [2, 1, 1, 2, 1, 140, 2, 1],        # one crowded expert: its rows past L take a GEMM call
    [0, 0, 0, 0, 0, 0, 150, 150],      # few experts, many rows: one call each
])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("x_first", [True, False])
def test_experts_batched_equals_each_rows_expert(sizes, fused, scaled, x_first, monkeypatch):
    """CPU inference's expert op (bmm of padded groups + GEMM calls for the rest) gives every row
    its own expert's FFN, in the input order, whichever split the cost model picks, with w1 and w3
    as one matrix or two, the bmm as x @ W^T or as W @ x^T."""
    from sparseek.model import common
    from sparseek.model.common import batched_rows

    monkeypatch.setattr(common, "_x_first", lambda L: x_first)

    ex = _experts(torch.float32)
    e = torch.repeat_interleave(torch.arange(8), torch.tensor(sizes))
    x = torch.randn(len(e), 64)
    s = torch.rand(len(e)) if scaled else None
    if not fused:
        ex.w3.data = ex.w3.data.clone()
    L = batched_rows(sizes)
    assert (L == max(sizes)) == (sizes[0] == 3) and (L == 0) == (sizes[0] == 0)
    with torch.inference_mode():
        got = torch.ops.sparseek.experts_batched(x, e, [ex.w1, ex.w3], ex.w2, s, ex.limit)
        h = torch.nn.functional.silu(torch.einsum("md,mid->mi", x, ex.w1[e]).clamp(max=7)) * \
            torch.einsum("md,mid->mi", x, ex.w3[e]).clamp(-7, 7)
        want = torch.einsum("mi,mdi->md", h if s is None else h * s[:, None], ex.w2[e])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

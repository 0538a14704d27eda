"""The AMX grouped GEMM (sparseek/model/cpu_kernels.py) against fp32 products, inside a compiled
graph, in the routed experts, and the fallbacks where it cannot run."""

import os
import warnings

import pytest
import torch

from sparseek.model import cpu_kernels
from sparseek.model.common import Experts, Linear
from sparseek.model import v4
from sparseek.model.v4 import grouped_projection

amx = pytest.mark.skipif(not cpu_kernels.available(), reason="no AMX bf16 on this CPU (or no compiler)")


def _reference(x, w, counts):
    """Each group's rows through its own matrix in fp32, rounded once to bf16."""
    rows = torch.split(x.float(), counts)
    return torch.cat([r @ w[e].float().T for e, r in enumerate(rows)]).to(torch.bfloat16)


@amx
@pytest.mark.parametrize("counts,N,K", [
    ([0, 5, 17, 40, 0], 64, 64),        # empty groups first and last, rows not a multiple of 16
    ([1], 32, 32),                      # one row, one tile each way
    ([0, 0], 32, 64),                   # no rows at all
    ([33, 16, 48, 2], 96, 160),         # odd and even numbers of 16-row blocks
    ([200, 3], 512, 256),               # one crowded expert
])
@pytest.mark.parametrize("offs_dtype", [torch.int32, torch.int64])
def test_grouped_mm_matches_fp32_products(counts, N, K, offs_dtype):
    torch.manual_seed(0)
    w = torch.randn(len(counts), N, K, dtype=torch.bfloat16)
    x = torch.randn(sum(counts), K, dtype=torch.bfloat16)
    offs = torch.tensor(counts).cumsum(0).to(offs_dtype)
    got = cpu_kernels.grouped_mm(x, w, offs)
    torch.testing.assert_close(got, _reference(x, w, counts), rtol=8e-3, atol=1e-3)


@amx
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU")
def test_grouped_mm_runs_on_every_thread_with_the_same_result():
    """The library's parallel regions use torch's threads (built without OpenMP they ran on one),
    and many groups shared out among the threads give the one-thread bits."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.sparseek_cpu.parallel_threads() == 2
        torch.manual_seed(3)
        counts = torch.randint(0, 40, (48,)).tolist()
        w = torch.randn(48, 128, 64, dtype=torch.bfloat16)
        x = torch.randn(sum(counts), 64, dtype=torch.bfloat16)
        offs = torch.tensor(counts).cumsum(0)
        two = cpu_kernels.grouped_mm(x, w, offs)
        torch.set_num_threads(1)
        assert torch.ops.sparseek_cpu.parallel_threads() == 1
        assert torch.equal(cpu_kernels.grouped_mm(x, w, offs), two)
        torch.testing.assert_close(two, _reference(x, w, counts), rtol=8e-3, atol=1e-3)
    finally:
        torch.set_num_threads(threads)


@amx
def test_grouped_mm_reads_strided_operands():
    """w as the gate/up view (two halves of one buffer, rows strided past K) and x a column slice
    of a wider tensor: the kernel reads them in place."""
    torch.manual_seed(1)
    base = torch.randn(3, 2, 32, 96, dtype=torch.bfloat16)
    w = base[:, :, :, :64].reshape(3, 64, 64)  # copy: the reference operand
    w_view = base.view(3, 64, 96)[:, :, :64]
    assert w_view.stride() == (6144, 96, 1)
    x_wide = torch.randn(20, 128, dtype=torch.bfloat16)
    x = x_wide[:, 32:96]
    counts = [7, 0, 13]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    assert cpu_kernels.grouped_mm_fits(x, w_view)
    torch.testing.assert_close(cpu_kernels.grouped_mm(x, w_view, offs), _reference(x, w_view, counts),
                               rtol=8e-3, atol=1e-3)
    torch.testing.assert_close(cpu_kernels.grouped_mm(x, w_view, offs), cpu_kernels.grouped_mm(x.contiguous(), w, offs))


@amx
def test_grouped_mm_in_a_compiled_graph():
    torch.manual_seed(2)
    w = torch.randn(4, 64, 32, dtype=torch.bfloat16)
    x = torch.randn(30, 32, dtype=torch.bfloat16)
    offs = torch.tensor([3, 3, 20, 30], dtype=torch.int32)
    f = torch.compile(lambda x, w, o: torch.nn.functional.silu(cpu_kernels.grouped_mm(x, w, o)), fullgraph=True)
    torch.testing.assert_close(f(x, w, offs), torch.nn.functional.silu(cpu_kernels.grouped_mm(x, w, offs)))


@amx
def test_grouped_mm_rejects_bad_operands():
    w = torch.randn(2, 64, 48, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiples of 32"):
        cpu_kernels.grouped_mm(torch.randn(4, 48, dtype=torch.bfloat16), w, torch.tensor([1, 4]))
    w = torch.randn(2, 64, 32, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        cpu_kernels.grouped_mm(torch.randn(4, 32, dtype=torch.bfloat16), w, torch.tensor([3, 1]))


@amx
@pytest.mark.parametrize("compiled", [False, True])
def test_routed_experts_with_the_kernel_equal_the_library_gemms(compiled, monkeypatch):
    """A layer of routed experts in bf16 inference (eager: in place of the expert op; compiled: in
    place of torch._grouped_mm) gives what the library GEMMs give."""
    torch.manual_seed(3)
    ex = Experts(8, 64, 32, limit=7.0, dtype=torch.bfloat16)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(45, 64, dtype=torch.bfloat16)
    w, idx = torch.rand(45, 2), torch.randint(0, 8, (45, 2))
    idx[:30, 0] = 3  # one crowded expert
    fn = torch.compile(ex.compute) if compiled else ex.compute
    calls = []
    real = cpu_kernels.grouped_mm
    monkeypatch.setattr(cpu_kernels, "grouped_mm", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        got = fn(x, w, idx)
        assert calls, "the kernel did not run"
        monkeypatch.setattr(cpu_kernels, "_state", False)
        torch._dynamo.reset()
        want = (torch.compile(ex.compute) if compiled else ex.compute)(x, w, idx)
    torch.testing.assert_close(got, want, rtol=1.6e-2, atol=2e-3)


@amx
@pytest.mark.parametrize("rows", [1, 9, 100, 128])
def test_dense_layers_through_the_kernel_equal_fp32_products(rows, monkeypatch):
    """A bf16 Linear of a few rows runs the kernel (fp32 products rounded once); the grouped output
    projection's groups too."""
    torch.manual_seed(4)
    lin = Linear(96, 64, bias=False, dtype=torch.bfloat16)
    x = torch.randn(1, rows, 96, dtype=torch.bfloat16)
    calls = []
    real = cpu_kernels.linear
    monkeypatch.setattr(cpu_kernels, "linear", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        got = lin(x)
    assert calls, "the kernel did not run"
    want = (x.float() @ lin.weight.float().T).to(torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=8e-3, atol=1e-3)
    xg, wg = torch.randn(2, rows, 3, 64, dtype=torch.bfloat16), torch.randn(3, 32, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        got = grouped_projection(xg, wg)
    torch.testing.assert_close(got, torch.einsum("btgi,gri->btgr", xg.float(), wg.float()).to(torch.bfloat16),
                               rtol=8e-3, atol=1e-3)


def test_dense_layers_keep_torch_where_the_kernel_loses(monkeypatch):
    """Many rows, fp32, autograd, a bias: F.linear. In a compiled graph a single row is left to
    torch (the compiled decode step fuses it into a reduction)."""
    monkeypatch.setattr(cpu_kernels, "_state", True)
    w = torch.randn(64, 96, dtype=torch.bfloat16)
    assert cpu_kernels.linear_fits(torch.randn(3, 5, 96, dtype=torch.bfloat16), w)
    assert not cpu_kernels.linear_fits(torch.randn(2, 65, 96, dtype=torch.bfloat16), w)  # 130 rows
    assert not cpu_kernels.linear_fits(torch.randn(4, 96), w.float())
    assert not cpu_kernels.linear_fits(torch.randn(4, 96, dtype=torch.bfloat16).T.contiguous().T, w)
    assert not cpu_kernels.linear_fits(torch.randn(4, 96, dtype=torch.bfloat16), w.clone().requires_grad_())
    assert cpu_kernels.rows_fit(1) and cpu_kernels.rows_fit(128) and not cpu_kernels.rows_fit(129)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not cpu_kernels.rows_fit(1) and cpu_kernels.rows_fit(2) and not cpu_kernels.rows_fit(129)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    lin = Linear(96, 64, bias=True, dtype=torch.bfloat16)  # fits but for its bias: the kernel adds none
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert cpu_kernels.linear_fits(x, lin.weight)
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))


def test_grouped_mm_fits_only_what_it_computes(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", True)
    x, w = torch.randn(8, 64, dtype=torch.bfloat16), torch.randn(2, 32, 64, dtype=torch.bfloat16)
    assert cpu_kernels.grouped_mm_fits(x, w)
    assert not cpu_kernels.grouped_mm_fits(x.float(), w.float())  # bf16 only
    assert not cpu_kernels.grouped_mm_fits(x[:, :48], w[:, :, :48])  # K not a multiple of 32
    assert not cpu_kernels.grouped_mm_fits(x, w[:, :24])  # N not a multiple of 32
    assert not cpu_kernels.grouped_mm_fits(x.T.contiguous().T, w)  # columns strided
    assert not cpu_kernels.grouped_mm_fits(x, w.clone().requires_grad_())  # training: autograd needs torch's op
    monkeypatch.setattr(cpu_kernels, "_sharded", lambda *ts: True)
    assert not cpu_kernels.grouped_mm_fits(x, w)  # FSDP / TP shards keep torch's GEMMs
    monkeypatch.setattr(cpu_kernels, "_sharded", lambda *ts: False)
    monkeypatch.setattr(cpu_kernels, "_state", False)
    assert not cpu_kernels.grouped_mm_fits(x, w)


def test_available_falls_back_with_a_warning(monkeypatch):
    """Turned off, on a CPU without AMX, or when the build fails (here: faked), the library GEMMs
    serve; only a failed build warns, and it is tried once per process."""
    monkeypatch.setattr(cpu_kernels, "_supported_cpu", lambda: True)
    monkeypatch.setattr(cpu_kernels, "_state", None)
    monkeypatch.setenv("SPARSEEK_CPU_KERNELS", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernels.available() is False
    monkeypatch.delenv("SPARSEEK_CPU_KERNELS")
    monkeypatch.setattr(cpu_kernels, "_state", None)
    monkeypatch.setattr(cpu_kernels, "_supported_cpu", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_kernels.available() is False
    tries = []

    def broken():
        tries.append(1)
        raise RuntimeError("Error building extension 'sparseek_cpu_kernels'\nc++: error: unrecognized option '-mamx-tile'")

    monkeypatch.setattr(cpu_kernels, "_state", None)
    monkeypatch.setattr(cpu_kernels, "_supported_cpu", lambda: True)
    monkeypatch.setattr(cpu_kernels, "_build", broken)
    with pytest.warns(UserWarning, match="could not be built.*-mamx-tile"):
        assert cpu_kernels.available() is False
    assert cpu_kernels.available() is False and tries == [1]


def test_a_stale_build_lock_is_removed(tmp_path, monkeypatch):
    """A lock file left by a killed build would make torch wait forever: one older than
    ``_STALE_LOCK_S`` is removed before building, a fresh one (a build running now) is not."""
    import os
    import time

    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: None)
    monkeypatch.setattr(cpu_kernels, "_register_fake", lambda: None)
    lock = tmp_path / "lock"
    lock.touch()
    assert cpu_kernels._build() and lock.exists()
    old = time.time() - cpu_kernels._STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    assert cpu_kernels._build() and not lock.exists()


def _sinkhorn_torch(logits, iters, eps, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "sinkhorn_fits", lambda _: False)
        return v4.sinkhorn(logits, iters, eps)


@amx
@pytest.mark.parametrize("shape", [(1, 4, 4), (2, 37, 4, 4), (130, 3, 3), (5, 16, 16), (0, 4, 4)])
def test_sinkhorn_kernel_matches_torch(shape, monkeypatch):
    """Token counts that fill no, one and several 16-lane blocks, partial last blocks, S = 3 / 16,
    logits of a realistic spread (softmax saturating some entries) and eps as the models use."""
    torch.manual_seed(0)
    logits = torch.randn(shape) * 4
    for iters in (1, 20):
        ref = _sinkhorn_torch(logits, iters, 1e-6, monkeypatch)
        got = cpu_kernels.sinkhorn(logits, iters, 1e-6)
        assert got.shape == ref.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    if logits.numel():  # after 20 iterations: columns sum to 1, rows nearly (steep logits converge slowly)
        assert (got.sum(-2) - 1).abs().max() < 1e-5 and (got.sum(-1) - 1).abs().max() < 0.1


@amx
def test_sinkhorn_kernel_in_the_model_and_in_compiled_graphs(monkeypatch):
    """v4.sinkhorn takes the kernel for inference on CPU fp32 (eager and inside a compiled graph:
    one op between inductor's loops), never where autograd needs its backward."""
    calls = []
    real = torch.ops.sparseek_cpu.sinkhorn
    logits = torch.randn(64, 4, 4)
    ref = _sinkhorn_torch(logits, 20, 1e-6, monkeypatch)
    with torch.no_grad():
        monkeypatch.setattr(cpu_kernels, "sinkhorn", lambda *a: calls.append(1) or real(*a))
        torch.testing.assert_close(v4.sinkhorn(logits, 20, 1e-6), ref, rtol=1e-5, atol=1e-6)
        assert calls
        monkeypatch.undo()
        from torch._inductor.utils import run_and_get_code

        got, code = run_and_get_code(torch.compile(v4.sinkhorn, fullgraph=True), logits, 20, 1e-6)
        assert "sparseek_cpu.sinkhorn" in "\n".join(code)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    leaf = logits.clone().requires_grad_()
    assert not cpu_kernels.sinkhorn_fits(leaf)  # training keeps torch's differentiable ops
    v4.sinkhorn(leaf, 20, 1e-6).sum().backward()
    assert leaf.grad is not None
    assert not cpu_kernels.sinkhorn_fits(logits.double()) and not cpu_kernels.sinkhorn_fits(torch.randn(4, 4, 5))


@amx
def test_sinkhorn_kernel_rejects_bad_logits():
    with pytest.raises(RuntimeError, match="S <= 16"):
        cpu_kernels.sinkhorn(torch.randn(2, 4, 5), 20, 1e-6)
    with pytest.raises(RuntimeError, match="fp32"):
        cpu_kernels.sinkhorn(torch.randn(2, 4, 4, dtype=torch.float64), 20, 1e-6)


def _mhc_site(S, D, seed):
    """A Block-like mHC site: mixing weights of a realistic spread, a norm weight away from 1."""
    g = torch.Generator().manual_seed(seed)
    M = (2 + S) * S
    return (torch.randn(M, S * D, generator=g) / (S * D) ** 0.5, 0.5 + torch.rand(3, generator=g),
            torch.randn(M, generator=g) * 0.5, 1 + 0.1 * torch.randn(D, generator=g))


def _mhc_torch(x, fn, scale, base, norm_w, monkeypatch):
    """The eager torch code the ops replace: v4.hc_pre, then the sublayer's RMSNorm."""
    with monkeypatch.context() as m:
        m.setattr(cpu_kernels, "sinkhorn_fits", lambda _: False)
        h, post, comb = v4.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    norm = v4.RMSNorm(x.shape[-1], 1e-5)
    norm.weight.data.copy_(norm_w)
    return norm(h), post, comb


def _close_bf16(got, want, max_frac=0.01):
    """bf16 results of fp32 sums in another order: equal but for one-ulp rounding flips."""
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=1e-5)  # a flip across a binade
    assert not got.numel() or (got != want).float().mean().item() <= max_frac


@amx
@pytest.mark.parametrize("T", [0, 1, 17, 130])
@pytest.mark.parametrize("S,D", [(4, 512), (1, 16), (3, 48), (16, 32)])
def test_mhc_ops_match_torch(T, S, D, monkeypatch):
    """hc_pre (+ the norm) and hc_post against the eager code: token counts filling no, one and
    several 16-token blocks with partial ones, S = 1 / 3 / 4 / 16 streams, D from one vector up."""
    torch.manual_seed(T + S)
    fn, scale, base, norm_w = _mhc_site(S, D, T + D)
    x = torch.randn(2, T, S, D).to(torch.bfloat16)
    f = torch.randn(2, T, D).to(torch.bfloat16)
    with torch.no_grad():
        want_h, want_post, want_comb = _mhc_torch(x, fn, scale, base, norm_w, monkeypatch)
        h, post, comb = cpu_kernels.hc_pre(x, fn, scale, base, norm_w, 20, 1e-6, 1e-6, 1e-5)
        torch.testing.assert_close(post, want_post, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(comb, want_comb, rtol=1e-5, atol=1e-6)
        _close_bf16(h, want_h)
        _close_bf16(cpu_kernels.hc_post(f, x, post, comb), v4.hc_post(f, x, post, comb))


@amx
def test_mhc_ops_in_the_model(monkeypatch):
    """A bf16 model's blocks take the ops for CPU inference (3 per block) and give the logits of
    the eager torch code; training (autograd) and compiled graphs keep torch's code."""
    import sparseek
    from sparseek.model import build_model
    from tests.conftest import randomize_, rel_err

    torch.manual_seed(0)
    model32 = randomize_(build_model(sparseek.preset("debug")), 11).eval()
    model = randomize_(build_model(sparseek.preset("debug")), 11).to(torch.bfloat16).eval()
    ids = torch.randint(0, 512, (2, 40))
    calls = []
    for name in ("hc_pre", "hc_post"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _r=real: calls.append(1) or _r(*a))
    with torch.inference_mode():
        got = model(ids)
        assert len(calls) == 4 * len(model.layers)  # two pre and two post passes a block
        with monkeypatch.context() as m:
            m.setattr(cpu_kernels, "mhc_fits", lambda *a: False)
            want = model(ids)
        ref = model32(ids)
    # the same rounding as torch's code but for the order of fp32 sums: positions agree to bf16
    # noise (a rare flipped expert pick aside), and the fp32 model is as near as from torch's code
    assert ((got - want).abs().amax(-1) < 0.1).float().mean() > 0.9
    assert rel_err(got, ref) < 1.1 * rel_err(want, ref) + 1e-3
    x = torch.randn(1, 3, 4, 64, dtype=torch.bfloat16)
    fn = model.layers[0].hc_attn_fn
    assert not cpu_kernels.mhc_fits(x, fn)  # autograd would need the ops' backward (training)
    with torch.no_grad():
        assert cpu_kernels.mhc_fits(x, fn) and fn.dtype == torch.bfloat16  # after a blanket .to(bf16) too
        assert not cpu_kernels.mhc_fits(x.float(), fn) and not cpu_kernels.mhc_fits(x[..., :40], fn)
        seen = []
        torch.compile(lambda t: seen.append(cpu_kernels.mhc_fits(t, fn)) or t + 1, backend="eager")(x)
        assert seen == [False]  # a compiled graph keeps inductor's fused form


@amx
def test_mhc_ops_reject_bad_input():
    fn, scale, base, norm_w = _mhc_site(4, 32, 0)
    x = torch.randn(3, 4, 32).to(torch.bfloat16)
    pre = torch.ops.sparseek_cpu.mhc_pre
    with pytest.raises(RuntimeError, match="bf16 streams"):
        pre(x.float(), fn, scale, base, norm_w, 20, 1e-6, 1e-6, 1e-6)
    with pytest.raises(RuntimeError, match="bf16 streams"):
        pre(x.transpose(0, 1), fn, scale, base, norm_w, 20, 1e-6, 1e-6, 1e-6)
    with pytest.raises(RuntimeError, match="D % 16"):
        pre(x[..., :24].contiguous(), fn, scale, base, norm_w, 20, 1e-6, 1e-6, 1e-6)
    with pytest.raises(RuntimeError, match="fn of shape"):
        pre(x, fn[:20], scale, base, norm_w, 20, 1e-6, 1e-6, 1e-6)
    with pytest.raises(RuntimeError, match="norm weight"):
        pre(x, fn, scale, base, norm_w.to(torch.bfloat16), 20, 1e-6, 1e-6, 1e-6)
    with pytest.raises(RuntimeError, match="sublayer output"):
        torch.ops.sparseek_cpu.mhc_post(torch.randn(3, 16).to(torch.bfloat16), x, torch.rand(3, 4),
                                        torch.rand(3, 4, 4))
    with pytest.raises(RuntimeError, match="comb"):
        torch.ops.sparseek_cpu.mhc_post(torch.randn(3, 32).to(torch.bfloat16), x, torch.rand(3, 4),
                                        torch.rand(3, 4, 3))


def _attention_case(B, G, Q, H, L, N, mode, seed):
    """attend_lse's inputs: window bands with ~30% of keys masked (some rows entirely), HCA's
    visible compressed prefix or CSA's picks (-1 = none), sinks, C = 32."""
    g = torch.Generator().manual_seed(seed)
    C = 32
    q = (torch.randn(B, G, Q, H, C, generator=g) * 2).to(torch.bfloat16)
    win = torch.randn(B, G, L, C, generator=g).to(torch.bfloat16)
    win_mask = torch.rand(1, G, Q, L, generator=g) > 0.3
    win_mask[..., 0, :] = False  # a query that sees no window key (the sink keeps it finite)
    comp = comp_mask = idx = None
    if mode != "none":
        comp = torch.randn(B, N, C, generator=g).to(torch.bfloat16)
    if mode == "hca":
        comp_mask = torch.rand(B, G, Q, N, generator=g) > 0.2
    if mode == "csa":
        idx = torch.randint(-1, N, (B, G, Q, 6), generator=g)
    return q, win, win_mask, comp, comp_mask, idx, torch.randn(H, generator=g), C ** -0.5


@amx
@pytest.mark.parametrize("shape", [(1, 4, 64, 8, 191, 64, "hca"), (2, 1, 3, 4, 17, 5, "csa"),
                                   (1, 2, 5, 8, 128, 0, "none"), (2, 3, 7, 2, 33, 40, "csa"), (1, 1, 1, 1, 1, 1, "hca")])
def test_attention_softmax_op_matches_torch(shape, monkeypatch):
    """attend_lse with the softmax op against torch's code: window lengths from 1 to 191 (tails of
    every size), HCA masks, CSA picks with -1s, a query without visible keys, eager and compiled."""
    args = _attention_case(*shape, seed=sum(shape[:-1]))
    monkeypatch.setattr(cpu_kernels, "SOFTMAX_MIN_ROWS", 1)  # the small shapes too
    calls = []
    real = torch.ops.sparseek_cpu.attn_softmax
    with torch.no_grad():
        with monkeypatch.context() as m:
            m.setattr(cpu_kernels, "attn_softmax_fits", lambda *a: False)
            want_o, want_lse = v4.attend_lse(*args)
        monkeypatch.setattr(torch.ops.sparseek_cpu, "attn_softmax", lambda *a: calls.append(1) or real(*a))
        got_o, got_lse = v4.attend_lse(*args)
        assert calls, "the op did not run"
        monkeypatch.setattr(torch.ops.sparseek_cpu, "attn_softmax", real)
        from torch._inductor.utils import run_and_get_code

        (comp_o, comp_lse), code = run_and_get_code(torch.compile(v4.attend_lse, dynamic=True), *args)
        assert "sparseek_cpu.attn_softmax" in "\n".join(code)
    for o, lse in ((got_o, got_lse), (comp_o, comp_lse)):
        assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32 and lse.shape == want_lse.shape
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o.float(), want_o.float(), rtol=2 ** -6, atol=2e-3)


@amx
def test_attention_softmax_op_only_for_bf16_inference():
    q, win, *_ = _attention_case(1, 2, 4, 8, 8, 0, "none", 0)
    with torch.no_grad():
        assert cpu_kernels.attn_softmax_fits(q, win) and q[..., 0].numel() == cpu_kernels.SOFTMAX_MIN_ROWS
        assert not cpu_kernels.attn_softmax_fits(q[:, :1], win)  # a batch-1 decode step's few rows
        assert not cpu_kernels.attn_softmax_fits(q.float(), win.float())
    assert not cpu_kernels.attn_softmax_fits(q.requires_grad_(), win)  # training: torch's code and backward
    op = torch.ops.sparseek_cpu.attn_softmax
    s, keep, sink = torch.randn(4, 2, 8).to(torch.bfloat16), torch.ones(4, 8, dtype=torch.bool), torch.randn(2)
    with pytest.raises(RuntimeError, match="bf16 window scores"):
        op(s.float(), keep, None, None, sink, 1.0)
    with pytest.raises(RuntimeError, match="window mask"):
        op(s, keep[:, :5], None, None, sink, 1.0)
    with pytest.raises(RuntimeError, match="sink logits"):
        op(s, keep, None, None, torch.randn(3), 1.0)
    with pytest.raises(RuntimeError, match="go together"):
        op(s, keep, s, None, sink, 1.0)
    with pytest.raises(RuntimeError, match="compressed-key mask"):
        op(s, keep, s, keep[:, :3], sink, 1.0)

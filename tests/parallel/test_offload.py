"""Routed experts kept in host memory (``--cpu-moe``): placement, loading, and the split forward.

This machine has no GPU, so the split forward's path (rows sent to the experts' memory, the shared
expert run meanwhile, long forwards copying the experts over) is forced on the CPU by declaring
the experts elsewhere: every step of it runs, with same-device copies. ``gpu_suite.py --only
cpu-moe`` checks it across a real GPU and host."""

from __future__ import annotations

import pytest
import torch

import sparseek
from sparseek.checkpoint import save_model
from sparseek.engine import LLM, SamplingParams
from sparseek.model.common import Experts, MoE, gate_up_view, mapped, routed_params
from sparseek.parallel.offload import experts_devices, moe_layers, offload_experts_
from sparseek.quant.modules import QuantExperts
from tests.conftest import randomize_


def _model(name: str = "debug", seed: int = 0):
    model, _ = sparseek.load(name, dtype="float32", tokenizer=False)
    return randomize_(model, seed).eval()


@pytest.fixture
def elsewhere(monkeypatch):
    """Every MoE block runs as if its routed experts were in another device's memory."""
    monkeypatch.setattr(MoE, "_experts_elsewhere", lambda self, x: True)


@pytest.mark.parametrize("name", ["debug", "debug-v3"])
@pytest.mark.parametrize("stream_tokens", [None, 1])
def test_split_forward_equals_plain(name, stream_tokens, monkeypatch):
    """The split forward computes what the plain one does, bit for bit: the experts on their own
    (stream_tokens None: where they are; 1: copied to the rows' device for every forward)."""
    model = _model(name)
    ids = torch.randint(0, model.args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
        calls = []
        real = MoE._offloaded

        def spy(self, *a):
            calls.append(self)
            return real(self, *a)

        monkeypatch.setattr(MoE, "_experts_elsewhere", lambda self, x: True)
        monkeypatch.setattr(MoE, "_offloaded", spy)
        monkeypatch.setattr(MoE, "stream_tokens", stream_tokens)
        got = model(ids)
    assert len(calls) == len(moe_layers(model.layers)) > 0  # every block of the forward took the split path
    assert torch.equal(got, want)


def test_engine_greedy_unchanged_by_split_forward(elsewhere):
    """Through the engine: prefill forwards of 32+ tokens copy the experts over, decode steps send
    their rows; the greedy tokens equal the plain engine's."""
    model = _model()
    prompts = [list(range(3, 43)), list(range(5, 12))]  # 40 tokens (streamed prefill) and 7
    params = SamplingParams(max_tokens=6, temperature=0.0)
    monkey_off = pytest.MonkeyPatch()
    monkey_off.setattr(MoE, "_experts_elsewhere", lambda self, x: False)
    want = [o.token_ids for o in LLM(model, max_seq_len=128).generate(prompts, params)]
    monkey_off.undo()
    got = [o.token_ids for o in LLM(model, max_seq_len=128).generate(prompts, params)]
    assert got == want and all(len(t) == 6 for t in got)


@torch.no_grad()
def test_mapped_copy_keeps_the_original_and_the_fused_buffer():
    ex = _model().layers[1].ffn.experts
    before = {k: (v.data_ptr(), v.clone()) for k, v in ex.named_parameters()}
    assert gate_up_view(ex.w1, ex.w3) is not None
    copy = mapped(ex, lambda t: t.clone())
    assert type(copy) is type(ex) and copy.limit == ex.limit
    for k, (ptr, val) in before.items():
        assert getattr(ex, k).data_ptr() == ptr and torch.equal(getattr(ex, k), val)  # original untouched
        assert getattr(copy, k).data_ptr() != ptr and torch.equal(getattr(copy, k), val)
        assert not getattr(copy, k).requires_grad
    assert gate_up_view(copy.w1, copy.w3) is not None  # one buffer on arrival, one GEMM fewer
    x = torch.randn(5, ex.w1.shape[2])
    w, idx = torch.rand(5, 2), torch.randint(0, ex.n, (5, 2))
    assert torch.equal(copy(x, w, idx), ex(x, w, idx))
    q = QuantExperts.from_experts(ex, fmt="fp8", scale_fmt="e8m0")
    qc = mapped(q, lambda t: t.clone())
    assert all(getattr(qc, b).data_ptr() != getattr(q, b).data_ptr() for b, _ in q.named_buffers())
    assert torch.equal(qc(x, w, idx), q(x, w, idx))


def test_offload_places_only_the_routed_experts():
    """The meta device stands in for a GPU: everything but the kept experts goes there, the kept
    experts stay in host memory with their values; ``layers`` keeps the first N blocks' only."""
    model = _model()
    blocks = moe_layers(model)
    assert len(blocks) >= 2
    kept = blocks[0].experts.w2.detach().clone()
    offload_experts_(model, "meta", layers=1)
    assert experts_devices(model) == {"cpu": 1, "meta": len(blocks) - 1}
    assert torch.equal(blocks[0].experts.w2, kept)
    with torch.no_grad():
        assert gate_up_view(blocks[0].experts.w1, blocks[0].experts.w3) is not None
    host = {n for n, p in model.named_parameters() if p.device.type == "cpu"}
    assert host == {f"{n}.{p}" for n, m in model.named_modules() if m is blocks[0].experts for p in ("w1", "w2", "w3")}
    with pytest.raises(ValueError, match="MoE blocks"):
        offload_experts_(_model(), "meta", layers=len(blocks) + 1)
    every = _model()  # layers=True, as cpu_moe=True says: every block (not 1)
    assert experts_devices(offload_experts_(every, "meta", layers=True)) == {"cpu": len(blocks)}


def test_load_cpu_moe_reads_into_host_memory(tmp_path):
    model = _model()
    save_model(model, str(tmp_path))
    loaded, _ = sparseek.load(str(tmp_path), device="meta", cpu_moe=True, tokenizer=False)
    blocks = moe_layers(loaded)
    assert experts_devices(loaded) == {"cpu": len(blocks)}
    assert all(p.device.type == "meta" for n, p in loaded.named_parameters() if ".experts." not in n)
    want = dict(model.named_parameters())
    for n, p in loaded.named_parameters():
        if ".experts." in n:
            assert torch.equal(p.float(), want[n])
    assert routed_params(loaded) == sum(p.numel() for n, p in loaded.named_parameters() if ".experts." in n)
    two, _ = sparseek.load(str(tmp_path), device="meta", cpu_moe=2, tokenizer=False)
    assert experts_devices(two) == {"cpu": 2, "meta": len(blocks) - 2}


def test_engine_cpu_moe_arguments():
    with pytest.raises(ValueError, match="cpu_moe applies while loading"):
        LLM(_model(), cpu_moe=True)
    with pytest.raises(ValueError, match="meta device"):  # e.g. --device meta: a message, not a trace
        LLM("debug", device="meta", cpu_moe=2)
    llm = LLM("debug", cpu_moe=True, max_seq_len=64)  # on a CPU: nothing to move, and it still generates
    assert experts_devices(llm.model) == {"cpu": len(moe_layers(llm.model))}
    assert len(llm.generate([[3, 4, 5]], SamplingParams(max_tokens=3, temperature=0.0))[0].token_ids) == 3


def test_cli_cpu_moe_flags():
    from sparseek.cli import main

    with pytest.raises(SystemExit, match="give one of them"):
        main(["generate", "-m", "debug", "--cpu-moe", "--n-cpu-moe", "1", "--prompt", "x"])
    with pytest.raises(SystemExit, match="0 or more"):
        main(["generate", "-m", "debug", "--n-cpu-moe", "-1", "--prompt", "x"])


def test_compiled_host_experts(monkeypatch):
    """``compile_host_experts``: quantized experts' host products run as the compiled word GEMVs
    (equal to the eager decode-then-GEMM within fp32 accumulation order), bf16 experts and rows
    past ``FUSED_ROWS`` stay eager (bit for bit)."""
    from sparseek.model import common
    from sparseek.model.fuse import FUSED_ROWS
    from sparseek.parallel import offload

    monkeypatch.setattr(common, "host_experts", common.host_experts)  # undone after the test
    offload.compile_host_experts()
    assert common.host_experts is not offload._eager_host
    ex = _model().layers[1].ffn.experts.requires_grad_(False)
    q = QuantExperts.from_experts(ex, fmt="fp8", scale_fmt="e8m0")
    g = torch.Generator().manual_seed(3)
    frames = torch._dynamo.utils.counters["frames"]
    with torch.inference_mode():
        for n in (1, 3, FUSED_ROWS + 1):
            x = torch.randn(n, ex.w1.shape[2], generator=g)
            w, idx = torch.rand(n, 2, generator=g), torch.randint(0, ex.n, (n, 2), generator=g)
            want = q(x, w, idx)
            before = frames["ok"]
            got = common.host_experts(q, x, w, idx)
            assert (frames["ok"] > before) == (n <= FUSED_ROWS)  # a graph compiled for each row count it takes
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
            assert torch.equal(common.host_experts(ex, x, w, idx), ex(x, w, idx))

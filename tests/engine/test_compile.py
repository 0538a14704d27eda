"""The compiled decode step: GEMVs as fused reductions on a CPU, guards skipped after warm-up
(the rewrite itself is tested in tests/model/test_fuse.py)."""

from __future__ import annotations

import pytest
import torch

import sparseek
from sparseek.engine.compile import FUSED_ROWS, CompiledStep, Spans
from sparseek.model import build_model, common
from tests.conftest import randomize_


@pytest.mark.parametrize("batch", [1, FUSED_ROWS])
def test_compiled_decode_step_equals_eager_as_the_cache_fills(batch):
    """Decode on the GEMV path (batch 1, and the most rows that still fuse) with guards skipped
    after warm-up: every step's logits equal the eager step's while positions cross window, CSA
    and HCA boundaries."""
    torch._dynamo.reset()
    model = randomize_(build_model(sparseek.preset("debug")), 5).eval()
    ids = torch.randint(3, model.args.vocab_size, (batch, 200), generator=torch.Generator().manual_seed(1))
    step = CompiledStep(model.decode_step, "cpu")
    assert step.gemv and step.skip_guards
    _decode_both(model, step, ids, 100, 256)
    assert step._calls == step._warmup  # the rest ran without guards


def _decode_both(model, step, ids, prompt: int, room: int) -> None:
    """Prefill ``prompt`` tokens into two caches, then decode the rest of ``ids`` one token per row
    with the eager step and with ``step``: every step's logits must agree."""
    with torch.inference_mode():
        a, b = model.new_cache(ids.shape[0], room), model.new_cache(ids.shape[0], room)
        model(ids[:, :prompt], a)
        model(ids[:, :prompt], b)
        for i in range(prompt, ids.shape[1]):
            ref = model.decode_step(ids[:, i:i + 1], a)
            got = step(ids[:, i:i + 1], b)
            assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), i
        assert torch.equal(a.pos, b.pos)


def test_compiled_batched_decode_step_runs_the_expert_op_in_graph(monkeypatch):
    """A batch with more (token, expert) pairs than the gathers serve takes the CPU expert op
    (padded bmm) inside the compiled step: no graph break, and every row's logits equal the eager
    step's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = randomize_(build_model(sparseek.preset("debug")), 5).eval()
    # k = 2 experts per token: 6 pairs per expert, past what the gathers take
    B = 3 * model.args.n_routed_experts
    assert B * model.args.num_experts_per_tok > common.CPU_GATHER_SLOTS_PER_EXPERT * model.args.n_routed_experts
    ids = torch.randint(3, model.args.vocab_size, (B, 60), generator=torch.Generator().manual_seed(2))

    splits = []  # the op's eager body asks the cost model at every call
    monkeypatch.setattr(common, "batched_rows", lambda counts: splits.append(max(counts)) or max(counts))
    _decode_both(model, CompiledStep(model.decode_step, "cpu"), ids, 40, 128)
    assert not counters["graph_break"]
    assert len(splits) >= 20 * model.args.num_hidden_layers  # eager and compiled steps both ran it


def test_two_steps_over_one_model_compile_apart():
    """Two engines on one model (batch 1 and batch 2) each compile their own copy of the step:
    neither recompiles the other's entry (dynamo keeps entries per code object; shared, the second
    step's first call would be a recompile, an error here), and both equal the eager step."""
    torch._dynamo.reset()
    model = randomize_(build_model(sparseek.preset("debug")), 5).eval()
    ids = torch.randint(3, model.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    steps = {B: CompiledStep(model.decode_step, "cpu") for B in (1, 2)}
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        caches = {B: (model.new_cache(B, 64), model.new_cache(B, 64)) for B in steps}
        for B, (a, b) in caches.items():
            model(ids[:B, :32], a)
            model(ids[:B, :32], b)
        for i in range(32, 37):  # alternating, past both warm-ups
            for B, step in steps.items():
                a, b = caches[B]
                ref = model.decode_step(ids[:B, i:i + 1], a)
                got = step(ids[:B, i:i + 1], b)
                assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), (B, i)


def test_step_after_warmup_calls_dynamos_code_without_dynamo(monkeypatch):
    """Past warm-up a CPU step runs the bytecode dynamo compiled for it as a plain function (no
    cache lookup, no stance switch: here the stance switch raises), equal to the eager step; after
    torch._dynamo.reset() it compiles again; a function with a graph break keeps dynamo."""
    def no_stance(*a, **k):
        raise AssertionError("dispatched through dynamo")

    torch._dynamo.reset()
    model = randomize_(build_model(sparseek.preset("debug")), 5).eval()
    ids = torch.randint(3, model.args.vocab_size, (2, 48), generator=torch.Generator().manual_seed(5))
    step = CompiledStep(model.decode_step, "cpu")
    assert step.direct
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "set_stance", no_stance)
        _decode_both(model, step, ids, 40, 64)
    assert step._direct is not None and step._direct[1] is not None

    torch._dynamo.reset()  # the entry is gone: the step compiles again
    _decode_both(model, step, ids, 40, 64)
    assert step._calls == step._warmup and step._direct[1] is not None

    def broken(x):
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1
    plain = CompiledStep(broken, "cpu", gemv=False)
    for _ in range(4):
        assert torch.equal(plain(torch.ones(3)), torch.full((3,), 3.0))
    assert plain._direct is not None and plain._direct[1] is None


def test_spans_are_powers_of_two_within_floor_and_cache():
    spans = Spans(128, 4096, "cpu")
    assert [spans.length(n) for n in (1, 128, 129, 256, 257, 3000, 4096, 5000)] == \
        [128, 128, 256, 256, 512, 4096, 4096, 4096]
    assert spans(300) is spans(400) and spans(300).shape == (512,)  # one tensor per length
    assert Spans(128, 128, "cpu")(5) is None  # a cache no longer than the floor is read whole


@pytest.mark.parametrize("skip_guards", [False, True])
def test_compiled_step_with_spans_is_one_graph_over_a_long_cache(skip_guards):
    """A compiled step given spans (as the engine passes them on a CPU) compiles once for every
    span (guarded: no recompile; guards skipped after warm-up: still right), and equals the eager full-buffer step while the
    span doubles twice over a cache many times longer than the context."""
    torch._dynamo.reset()
    model = randomize_(build_model(sparseek.preset("debug")), 5).eval()
    ids = torch.randint(3, model.args.vocab_size, (2, 530), generator=torch.Generator().manual_seed(4))
    spans = Spans(model.span_floor(), 2048, "cpu")
    step = CompiledStep(model.decode_step, "cpu", skip_guards=skip_guards)
    seen = set()
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        a, b = model.new_cache(2, 2048), model.new_cache(2, 2048)
        model(ids[:, :240], a)
        model(ids[:, :240], b)
        for i in range(240, ids.shape[1]):
            span = spans(int(b.pos.max()) + 1)
            seen.add(span.shape[0])
            ref = model.decode_step(ids[:, i:i + 1], a)
            got = step(ids[:, i:i + 1], b, span)
            assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), i
    assert seen == {256, 512, 1024} and step._calls == (step._warmup if skip_guards else 290)

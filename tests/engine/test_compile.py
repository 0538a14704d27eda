"""The compiled decode step: GEMVs as fused reductions on a CPU, guards skipped after warm-up
(the rewrite itself is tested in tests/model/test_fuse.py)."""

from __future__ import annotations

import torch

import sparseek
from sparseek.engine.compile import CompiledStep
from sparseek.model import build_model
from tests.conftest import randomize_


def test_compiled_decode_step_equals_eager_as_the_cache_fills():
    """Batch-1 decode (the GEMV path) with guards skipped after warm-up: every step's logits equal
    the eager step's while positions cross window, CSA and HCA boundaries."""
    torch._dynamo.reset()
    model = randomize_(build_model(sparseek.preset("debug")), 5).eval()
    ids = torch.randint(3, model.args.vocab_size, (1, 200), generator=torch.Generator().manual_seed(1))
    step = CompiledStep(model.decode_step, "cpu")
    assert step.gemv and step.skip_guards
    with torch.inference_mode():
        a, b = model.new_cache(1, 256), model.new_cache(1, 256)
        model(ids[:, :100], a)
        model(ids[:, :100], b)
        for i in range(100, 200):
            ref = model.decode_step(ids[:, i:i + 1], a)
            got = step(ids[:, i:i + 1], b)
            assert (got - ref).abs().max() <= 1e-4 * ref.abs().max(), i
        assert torch.equal(a.pos, b.pos)
    assert step._calls == step._warmup  # the rest ran without guards

"""How the engine compiles its decode step.

Batch-1 decode is a chain of matrix-vector products: its speed is how fast the weights stream
from memory. Two things stand between a compiled step and that limit, and both are fixed here
rather than in the model (which stays plain PyTorch):

* **GEMVs as fused reductions** on a CPU (``sparseek.model.fuse``): ~140 oneDNN calls per step
  of the small preset become a few loops that stream the weights at ~2x the rate. Products of up
  to ``FUSED_ROWS`` rows fuse too (a batch of up to 8 rows, a speculative verify step's k + 1
  tokens): the `small` bf16 step 1.15x faster at batch 4, 1.19x at batch 8, 1.08x at 1 x 3
  tokens than with oneDNN's GEMM there (`benchmarks/fused_rows.py`).
* **Guards.** Dynamo checks every parameter and cache tensor before each call (~0.6 ms a step on
  a CPU, a tenth of the step). The engine calls the step with one cache object of fixed shape
  for its whole life, so after two guarded warm-up calls (a second compile would surface there)
  it skips them, as vLLM does for its compiled model.

On a GPU the step is compiled with CUDA graphs (``mode="reduce-overhead"``); the reduction form is
optional there (``gemv=True``, with coordinate-descent tuning as gpt-fast uses) until it is
measured to beat cuBLAS's GEMV.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

from sparseek.model.fuse import fusing_backend

__all__ = ["CompiledStep", "FUSED_ROWS"]

# the most rows a product may have to run as a fused reduction on a CPU (measured: see the docstring)
FUSED_ROWS = 8


def _own_copy(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps compiled code per code object, so two
    steps over one model's method (two engines of other batch sizes) would share entries: the
    second recompiles the first's, and with guards skipped a call may pick the other's entry."""
    f = getattr(fn, "__func__", fn)
    if not isinstance(f, types.FunctionType):
        return fn
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__, g.__qualname__ = f.__kwdefaults__, f.__qualname__
    owner = getattr(fn, "__self__", None)
    return g if owner is None else types.MethodType(g, owner)


class CompiledStep:
    """``fn`` compiled for calls of one fixed shape; guards run on the first ``warmup`` calls only."""

    def __init__(self, fn: Callable, device: torch.device | str, *, gemv: bool | None = None,
                 fused_rows: int = FUSED_ROWS, skip_guards: bool = True, warmup: int = 2,
                 options: dict | None = None):
        """``gemv``: small products as fused reductions (default: on a CPU), those of up to
        ``fused_rows`` rows; ``options``: extra inductor config (``torch.compile(options=...)``)."""
        fn = _own_copy(fn)
        device = torch.device(device)
        cuda = device.type == "cuda"
        self.gemv = device.type == "cpu" if gemv is None else gemv
        patches = dict(options or {})
        if cuda:
            patches["triton.cudagraphs"] = True  # what mode="reduce-overhead" sets
        if self.gemv:
            if cuda:
                patches.setdefault("coordinate_descent_tuning", True)
            self._fn = torch.compile(fn, dynamic=False, backend=fusing_backend(cuda, fused_rows, **patches))
        else:
            self._fn = torch.compile(fn, dynamic=False, options=patches or None)
        self.skip_guards = skip_guards
        self._warmup = warmup
        self._calls = 0

    def __call__(self, *args):
        if not self.skip_guards or self._calls < self._warmup:
            self._calls += 1
            return self._fn(*args)
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self._fn(*args)
        except RuntimeError as e:  # the compiled code is gone (torch._dynamo.reset()): compile again
            if "skip_guard_eval_unsafe" not in str(e):
                raise
            self._calls = 0
            return self(*args)


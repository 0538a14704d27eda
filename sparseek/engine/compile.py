"""How the engine compiles its decode step.

Batch-1 decode is a chain of matrix-vector products: its speed is how fast the weights stream
from memory. Two things stand between a compiled step and that limit, and both are fixed here
rather than in the model (which stays plain PyTorch):

* **GEMVs as fused reductions** on a CPU (``sparseek.model.fuse``): ~140 oneDNN calls per step
  of the small preset become a few loops that stream the weights at ~2x the rate. Products of up
  to ``FUSED_ROWS`` rows fuse too (a batch of up to 8 rows, a speculative verify step's k + 1
  tokens): the `small` bf16 step 1.15x faster at batch 4, 1.19x at batch 8, 1.08x at 1 x 3
  tokens than with oneDNN's GEMM there (`benchmarks/fused_rows.py`). On CPUs with AMX, bf16 dense
  layers of 2+ rows run the AMX kernel instead (`cpu_kernels.COMPILED_MIN_ROWS`): the `small`
  step 0.73x / 0.63x / 0.55x the fused form's time at batch 2 / 4 / 8
  (`benchmarks/results/cpu-small-bf16-fused-rows-amx.txt`).
* **Spans.** A static step's shapes come from the cache, so by default it scores and attends
  over every compressed entry the cache can hold, filled or not: with ``max_seq_len`` 32,768 the
  `small` bf16 engine decoded a 64-token prompt at 117 tok/s, against 186 with 160. The engine
  passes a span instead (``Spans``: a power of two above the longest row, as a tensor's length
  marked dynamic), and one graph reads only the entries below it: 160 tok/s at 32,768
  (`benchmarks/decode_cache_length.py`, `benchmarks/results/cpu-small-decode-cache-length.txt`).
* **Guards.** Dynamo checks every parameter and cache tensor before each call (~0.6 ms a step on
  a CPU, a tenth of the step). The engine calls the step with one cache object of fixed shape
  for its whole life, so after two guarded warm-up calls (a second compile would surface there)
  it skips them, as vLLM does for its compiled model. On a CPU it then skips dynamo altogether:
  it calls the bytecode dynamo compiled for the step's one cache entry as a plain function (what
  vLLM's dispatcher does), which saves dynamo's cache lookup and stance switch: 0.3 ms of a
  4.7 ms `small` bf16 step, 1.07x (``benchmarks/profile_decode.py --ab-dispatch``: the same
  kernels called both ways, alternating; ``benchmarks/results/cpu-small-bf16-direct-dispatch.txt``).

On a GPU the step is compiled with CUDA graphs (``mode="reduce-overhead"``); the reduction form is
optional there (``gemv=True``, with coordinate-descent tuning as gpt-fast uses) until it is
measured to beat cuBLAS's GEMV.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

from sparseek.model import cpu_kernels
from sparseek.model.fuse import FUSED_ROWS, fusing_backend

__all__ = ["CompiledStep", "FUSED_ROWS", "Spans"]



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
                 options: dict | None = None, direct: bool | None = None):
        """``gemv``: small products as fused reductions (default: on a CPU), those of up to
        ``fused_rows`` rows; ``options``: extra inductor config (``torch.compile(options=...)``);
        ``direct``: once guards are skipped, call the compiled bytecode without dynamo (default: on
        a CPU, where it was measured)."""
        fn = _own_copy(fn)
        device = torch.device(device)
        if device.type == "cpu":
            cpu_kernels.available()  # built before tracing, which only asks whether it was
        self._orig = fn
        self.direct = device.type == "cpu" if direct is None else direct
        self._direct: tuple | None = None  # (dynamo's code object, the function running it)
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
        if self.direct and (run := self._compiled_code()) is not None:
            return run(*args)
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self._fn(*args)
        except RuntimeError as e:  # the compiled code is gone (torch._dynamo.reset()): compile again
            if "skip_guard_eval_unsafe" not in str(e):
                raise
            self._calls = 0
            return self(*args)

    def _compiled_code(self) -> Callable | None:
        """The step's function running the bytecode dynamo made for it (its parameters gathered, the
        compiled graph called), where the step has exactly one cache entry and no graph break;
        None otherwise (recompiled, reset, a torch without the lookup): dynamo then dispatches."""
        f = getattr(self._orig, "__func__", self._orig)
        try:
            entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list(f.__code__)
        except AttributeError:
            return None
        if len(entries) != 1:
            return None
        code = entries[0].code
        if self._direct is None or self._direct[0] is not code:
            run = None
            # a graph break resumes in functions dynamo must compile as they are called: keep dynamo
            if not any(name.startswith("__resume_at") or "resume_in" in name for name in code.co_names):
                g = types.FunctionType(code, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
                owner = getattr(self._orig, "__self__", None)
                run = g if owner is None else types.MethodType(g, owner)
            self._direct = (code, run)
        return self._direct[1]


class Spans:
    """The ``span_L`` tensors a static step (``decode_step``, ``verify_step``) is called with:
    length a power of two at least the positions a step needs, clamped to [``floor``,
    ``max_seq_len``], values unused. Their length is marked dynamic over that whole range, so one
    compiled graph serves every span; ``floor`` (the model's ``span_floor()``) keeps every span
    on the same branches of the step (each indexer picks from more than its top-k). A cache no
    longer than ``floor`` is read whole (``__call__`` gives None: the step's fixed shapes)."""

    def __init__(self, floor: int, max_seq_len: int, device: torch.device | str):
        # a length-1 span would be a size-1 dimension, which a compiled graph specializes on
        self.floor, self.max_seq_len, self.device = max(floor, 2), max_seq_len, torch.device(device)
        self._made: dict[int, torch.Tensor] = {}

    def length(self, need: int) -> int | None:
        """The span for a step whose rows' new positions all lie below ``need``."""
        if self.max_seq_len <= self.floor:
            return None
        return min(self.max_seq_len, max(self.floor, 1 << max(need - 1, 0).bit_length()))

    def __call__(self, need: int) -> torch.Tensor | None:
        L = self.length(need)
        if L is None:
            return None
        if L not in self._made:
            t = torch.empty(L, dtype=torch.uint8, device=self.device)
            torch._dynamo.maybe_mark_dynamic(t, 0)
            self._made[L] = t
        return self._made[L]

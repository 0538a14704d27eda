"""Would int8 weight-only quantization speed up CPU decode? The compiled decode step runs its
matrix-vector products as inductor reductions (``sparseek.model.fuse``); this times one such
product with an fp32 weight and with an int8 weight + per-row scale dequantized inside the same
reduction (gpt-fast's form), on the LM head's shape of the ``small`` preset and on a gathered
top-4 of its routed experts.

    python benchmarks/int8_gemv.py

Also timed: ``torch.ops.aten._weight_int8pack_mm``, ATen's int8 weight-only CPU kernel (what
torchao uses). If an int8 form streamed its weights at the fp32 form's bytes/s it would run ~4x
faster; on torch 2.13 here neither does, which is why sparseek has no int8 inference path yet.
The generated loop (``TORCH_LOGS=output_code``) loads the int8 weight 8 elements at a time
through a partial vector load (``Vectorized<int8_t>::loadu(p, 8)``): the likely cause, not
measured apart.
"""

from __future__ import annotations

import time

import torch

from sparseek.model.fuse import fusing_backend


def _time(f, *args, n: int) -> float:
    for _ in range(10):
        f(*args)
    t0 = time.perf_counter()
    for _ in range(n):
        f(*args)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    torch.manual_seed(0)
    backend = fusing_backend(False, 8)
    compile_ = lambda f: torch.compile(f, backend=backend, dynamic=False)  # noqa: E731
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}; best of 3 rounds")
    N, K = 32768, 512
    w = torch.randn(N, K)
    s = w.abs().amax(1) / 127
    wq = (w / s[:, None]).round().to(torch.int8)
    x = torch.randn(1, K)
    f32 = compile_(lambda x, w: torch.nn.functional.linear(x, w))
    i8 = compile_(lambda x, wq, s: torch.nn.functional.linear(x, wq.to(x.dtype)) * s)
    a = min(_time(f32, x, w, n=100) for _ in range(3))
    b = min(_time(i8, x, wq, s, n=100) for _ in range(3))
    c = min(_time(torch.ops.aten._weight_int8pack_mm, x, wq, s, n=20) for _ in range(3))
    print(f"LM head {N} x {K}, 1 row: fp32 {a:.0f} us ({N * K * 4 / a / 1e3:.1f} GB/s), "
          f"int8 {b:.0f} us ({N * K / b / 1e3:.1f} GB/s): int8 {a / b:.2f}x the speed of fp32; "
          f"_weight_int8pack_mm {c:.0f} us ({N * K / c / 1e3:.1f} GB/s)")
    E, I, D = 32, 256, 512
    w1 = torch.randn(E, I, D)
    s1 = w1.abs().amax(2) / 127
    q1 = (w1 / s1[..., None]).round().to(torch.int8)
    e, xe = torch.tensor([3, 7, 11, 30]), torch.randn(4, D)
    g32 = compile_(lambda x, e, w: torch.einsum("nd,nid->ni", x, w[e]))
    g8 = compile_(lambda x, e, q, s: torch.einsum("nd,nid->ni", x, q[e].to(x.dtype)) * s[e])
    a = min(_time(g32, xe, e, w1, n=1000) for _ in range(3))
    b = min(_time(g8, xe, e, q1, s1, n=1000) for _ in range(3))
    print(f"4 gathered experts {I} x {D}: fp32 {a:.1f} us, int8 {b:.1f} us: int8 {a / b:.2f}x the speed of fp32")


if __name__ == "__main__":
    main()

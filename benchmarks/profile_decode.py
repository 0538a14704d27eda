"""Where one compiled decode step (or one prefill) spends its time, and how fast a lone GEMV streams.

    python benchmarks/profile_decode.py --preset small --dtype bfloat16            # the engine's decode step
    python benchmarks/profile_decode.py --preset small --dtype bfloat16 --context 520 --max-seq-len 640  # CSA picking
    python benchmarks/profile_decode.py --preset small --dtype bfloat16 --plain    # plain inductor, guarded
    python benchmarks/profile_decode.py --preset small --dtype bfloat16 --prefill 512 --hot-paths
    python benchmarks/profile_decode.py --preset small --dtype bfloat16 --prefill 128 256 512 --hot-paths --breakdown
    python benchmarks/profile_decode.py --preset small --dtype bfloat16 --prefill 128 256 512 --hot-paths --breakdown --ab-gate-up
    python benchmarks/profile_decode.py --preset small --dtype bfloat16 --expert-costs  # CPU expert op's cost model
    python benchmarks/profile_decode.py --preset small --dtype bfloat16 --batch 32 --ab-experts  # the decode step's experts four ways
    python benchmarks/profile_decode.py --inductor '{"cpp_wrapper": true}'         # extra inductor options
    python benchmarks/profile_decode.py --preset small --dtype bfloat16 --ab-dispatch  # dynamo vs direct call
    python benchmarks/profile_decode.py --preset small --dtype bfloat16 --quantize fp8  # weights kept FP8

Prints ms per token, the torch profiler's top operators grouped by input shape (inductor kernels
named), the weight-streaming rate of one token's routed experts in the decode step's form and
in the one-contraction form it replaced, and that of the LM-head GEMV alone, as a library call and
as the fused reduction the compiled step uses (``sparseek.model.fuse``) -- the practical ceiling of
batch-1 decode on a CPU, lower than the copy bandwidth bench_engine.py uses for its roofline.

``--breakdown`` (prefill) replaces the operator table with wall time per model part (attention and
its pieces, mHC, routed experts, shared expert, router) at each prompt length, and times the
routed experts' GEMM as the prefill runs it (one library call per expert, ``torch._grouped_mm``)
against one batched call over all experts (``bmm``, which needs equal row counts) at 8-128 rows
per expert: what a short prompt's prefill costs where it has few rows per expert. It also prints
the fewest and most rows any expert gets, and with ``--ab-gate-up`` times each prefill with the
experts' gate and up projections as one GEMM and as two (``gate_up_view``), alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import sparseek
from sparseek.engine.compile import CompiledStep
from sparseek.model.fuse import FUSED_ROWS, fusing_backend


def per_call(fn, n: int) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def _experts_one_contraction(ex, x_ND, weights_NK, idx_NK):
    """The decode step's experts as one contraction over all top-k slots (the form
    ``Experts.forward_static`` replaced), for comparison."""
    from sparseek.model.common import swiglu

    gate = torch.einsum("nd,nkid->nki", x_ND, ex.w1[idx_NK])
    up = torch.einsum("nd,nkid->nki", x_ND, ex.w3[idx_NK])
    h = swiglu(gate, up, ex.limit, weights_NK[..., None], x_ND.dtype)
    return torch.einsum("nki,nkdi->nd", h, ex.w2[idx_NK])


def expert_rates(model, dtype):
    """Weight-streaming rate of one token's routed experts, compiled as in the decode step: one
    top-k slot at a time (``Experts.forward_static``) vs one contraction over the slots. Every
    layer's experts are run in turn so the weights do not stay in cache."""
    layers = [b.ffn.experts for b in model.layers]
    k, D = model.args.num_experts_per_tok, model.args.hidden_size
    x = torch.randn(1, D, dtype=dtype)
    w = torch.rand(1, k)
    idx = torch.randperm(layers[0].n)[:k][None]
    read = len(layers) * 3 * k * layers[0].w1[0].numel() * layers[0].w1.element_size()
    forms = [("per slot (decode step)", lambda ex: ex.forward_static(x, w, idx)),
             ("one contraction", lambda ex: _experts_one_contraction(ex, x, w, idx))]
    if layers[0].w1.dtype == torch.uint8:  # kept quantized: the step's own form (all slots by words) only
        forms = [("decode step", forms[0][1])]
    for name, f in forms:
        fn = torch.compile(lambda: [f(ex) for ex in layers], dynamic=False, backend=fusing_backend())
        dt = per_call(fn, 30)
        print(f"routed experts of one token, {name}: {dt / len(layers) * 1e6:.0f} us/layer, "
              f"{read / dt / 1e9:.1f} GB/s of weights streamed")


# (owner, attribute, label): the parts ``prefill_breakdown`` times; indented labels lie inside the
# one above them. Only functions called from eager code (a timer traced by dynamo would break the
# graph: the wrapper steps aside while compiling).
def _parts():
    from sparseek.model import common, v4

    return ((v4.Attention, "forward", "attention"), (v4.Attention, "project", "  q/kv projections, norms, rope"),
            (v4.Compressor, "chunk", "  compressors (projections, pooling)"),
            (v4, "attend_lse", "  sparse attention core"),
            (v4.Attention, "output", "  output projection"),
            (v4.Block, "attn_input", "mHC before attention (mix, Sinkhorn, norm)"),
            (v4.Block, "attn_input_op", "mHC before attention (mix, Sinkhorn, norm)"),
            (v4.Block, "ffn_input", "mHC between attention and FFN"),
            (v4.Block, "ffn_input_op", "mHC between attention and FFN"),
            (v4, "hc_post", "mHC output side (hc_post, where called from eager code)"),
            (v4.Block, "output_op", "mHC output side (hc_post, where called from eager code)"),
            (common.MoE, "forward", "MoE"),
            (common.Gate, "forward", "  router"), (common.Experts, "forward", "  routed experts"),
            (common.MLP, "forward", "  shared expert"))


def prefill_breakdown(run, n: int = 5) -> list[tuple[str, float, int]]:
    """(label, ms per prefill, calls per prefill) of each part in ``_parts`` and the total."""
    acc, calls, saved = {}, {}, []
    for owner, name, label in _parts():
        f = getattr(owner, name)
        saved.append((owner, name, f))

        def timed(*a, _f=f, _label=label, **k):
            if torch.compiler.is_compiling():
                return _f(*a, **k)
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                acc[_label] = acc.get(_label, 0.0) + time.perf_counter() - t
                calls[_label] = calls.get(_label, 0) + 1
        setattr(owner, name, timed)
    try:
        for _ in range(2):
            run()
        acc.clear()
        calls.clear()
        total = per_call(run, n)  # its 3 warm-up calls count too: divide by n + 3
    finally:
        for owner, name, f in saved:
            setattr(owner, name, f)
    rows = [("total", total * 1e3, 1)]
    labels = dict.fromkeys(label for _, _, label in _parts())  # a part's eager and op forms share a row
    return rows + [(label, acc.get(label, 0.0) / (n + 3) * 1e3, calls.get(label, 0) // (n + 3)) for label in labels]


def rows_per_expert(model, run) -> tuple[int, int]:
    """Fewest and most (token, slot) rows any routed expert of any layer gets in one ``run``."""
    from sparseek.model import common

    seen, forward = [], common.Experts.forward

    def spy(self, x_ND, weights_NK, idx_NK, *args, **kwargs):
        seen.append(torch.bincount(idx_NK.reshape(-1), minlength=self.n))
        return forward(self, x_ND, weights_NK, idx_NK, *args, **kwargs)
    common.Experts.forward = spy
    try:
        run()
    finally:
        common.Experts.forward = forward
    counts = torch.stack(seen)
    return int(counts.min()), int(counts.max())


def gate_up_ab(run, rounds: int = 5) -> dict[str, list[float]]:
    """Seconds per prefill with the routed experts' gate and up projections as one grouped GEMM
    (``gate_up_view``) and as two, in alternating rounds of one process (this VM drifts by more
    than the difference between processes)."""
    from sparseek.model import common

    fused, res = common.gate_up_view, {"gate|up one GEMM": [], "gate, up two GEMMs": []}
    try:
        for _ in range(rounds):
            for name, view in zip(res, (fused, lambda w1, w3: None)):
                common.gate_up_view = view  # Experts.forward looks it up at each call
                res[name].append(min(per_call(run, 1) for _ in range(2)))
    finally:
        common.gate_up_view = fused
    return res


def expert_gemm_rates(model, dtype, rows=(8, 16, 32, 64, 128)):
    """One routed-expert matrix (w1 of layer 0) for every expert, as the prefill multiplies it:
    a library GEMM per expert (``torch._grouped_mm`` on a CPU) vs one batched call (``bmm``, equal
    rows per expert). us per expert and GFLOP/s."""
    w = model.layers[0].ffn.experts.w1.detach().contiguous()  # a view of the gate|up buffer: bmm would copy it
    E, out_f, in_f = w.shape
    print(f"routed-expert GEMM, [M, {in_f}] x [{in_f}, {out_f}] {str(dtype).split('.')[-1]} for each of {E} experts:")
    for M in rows:
        x = torch.randn(E * M, in_f, dtype=dtype)
        offs = torch.arange(1, E + 1, dtype=torch.int32) * M
        flop = 2 * M * in_f * out_f
        line = []
        for name, fn in (("one call per expert", lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs)),
                         ("one batched call", lambda: torch.bmm(x.view(E, M, in_f), w.transpose(1, 2)))):
            dt = min(per_call(fn, 10) for _ in range(3)) / E
            line.append(f"{name} {dt * 1e6:6.1f} us ({flop / dt / 1e9:4.0f} GFLOP/s)")
        print(f"  M={M:4d}: " + ";  ".join(line))


def expert_op_costs(model, rows=(1, 4, 8, 16, 24, 32, 48, 64, 96, 128)):
    """What the cost model of ``sparseek.model.common.batched_rows`` rests on: us per routed expert
    for its gate|up and down products at M rows each, as one library GEMM call per expert
    (``torch._grouped_mm``) and as its slice of one ``bmm`` over all experts, in both orientations
    ``experts_batched`` runs (x @ W^T at few rows, the transposed W @ x^T at more). Each call takes
    the next layer's experts, so the weights come from memory as in a forward, not from cache.
    Last, the op itself with every row in its padded bmm (``batched_rows`` held at M): what it costs
    beyond its bmm is the copies and the SwiGLU around it."""
    from sparseek.model import common
    from sparseek.model.common import Experts, gate_up_view

    with torch.no_grad():
        mats = [(gate_up_view(m.w1, m.w3), m.w2) for m in model.modules() if isinstance(m, Experts)]
    E, two_i, D = mats[0][0].shape
    print(f"routed experts' gate|up [{two_i}, {D}] and down [{D}, {two_i // 2}] products, us per expert, "
          f"cycling over {len(mats)} layers' weights:")
    for M in rows:
        x, h = torch.randn(E * M, D, dtype=mats[0][0].dtype), torch.randn(E * M, two_i // 2, dtype=mats[0][0].dtype)
        xT, hT = x.view(E, M, D).transpose(1, 2).contiguous(), h.view(E, M, -1).transpose(1, 2).contiguous()
        offs = torch.arange(1, E + 1, dtype=torch.int32) * M
        expert, scale = torch.arange(E).repeat_interleave(M), torch.rand(E * M)
        it = iter(range(1 << 30))

        def calls():
            w13, w2 = mats[next(it) % len(mats)]
            torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)
            torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)

        def bmm_wx():
            w13, w2 = mats[next(it) % len(mats)]
            torch.bmm(w13, xT)
            torch.bmm(w2, hT)

        def bmm_xw():
            w13, w2 = mats[next(it) % len(mats)]
            torch.bmm(x.view(E, M, D), w13.transpose(1, 2))
            torch.bmm(h.view(E, M, -1), w2.transpose(1, 2))

        def op_padded():  # the whole op, every expert's M rows padded into its bmm: what a slot adds
            w13, w2 = mats[next(it) % len(mats)]
            torch.ops.sparseek.experts_batched(x, expert, [w13], w2, scale, None)
        ways = {"one call per expert": calls, "bmm x @ W^T": bmm_xw, "bmm W @ x^T": bmm_wx,
                "the op, all in its bmm": op_padded}
        us = {name: [] for name in ways}
        picker = common.batched_rows
        common.batched_rows = lambda counts: M
        try:
            for _ in range(3):  # alternating rounds, the median of each
                for name, fn in ways.items():
                    us[name].append(per_call(fn, 2 * len(mats)) / E * 1e6)
        finally:
            common.batched_rows = picker
        print(f"  M={M:4d}: " + ";  ".join(f"{name} {sorted(v)[1]:6.1f} us" for name, v in us.items()))


def experts_op_ab(model, batch: int, rounds: int = 5) -> None:
    """The compiled decode step at ``batch`` rows, its routed experts run four ways, in alternating
    rounds of one process, logits compared: the CPU expert op (``experts_batched``); the op with
    its padded bmm held to the transposed W @ x^T (its only form before the twelfth session; the op
    runs eagerly inside the graph, so the same compiled step serves both); the grouped GEMMs it
    replaced; and inductor's fused gather + GEMV per (token, expert) slot, which the step uses up
    to ``CPU_GATHER_SLOTS_PER_EXPERT`` slots per expert. Settings of ``sparseek.model.common`` are
    read while a step traces (its first calls); the compiled step has no guards after that."""
    from sparseek.model import common

    op = {"CPU_GATHER_SLOTS_PER_EXPERT": 0}
    setups = {"expert op": (op, {}), "expert op, W @ x^T": (op, {"_x_first": lambda L: False}),
              "grouped GEMMs": ({**op, "CPU_BATCHED_EXPERTS": False}, {}),
              "fused gathers": ({"CPU_GATHER_SLOTS_PER_EXPERT": 1 << 30}, {})}
    V = model.args.vocab_size
    cache = model.new_cache(batch, 512)
    model(torch.randint(10, V, (batch, 64), generator=torch.Generator().manual_seed(0)), cache)
    pos0, tok = cache.pos.clone(), torch.randint(10, V, (batch, 1), generator=torch.Generator().manual_seed(1))

    def patched(settings: dict, fn):
        saved = {k: getattr(common, k) for k in settings}
        for k, v in settings.items():
            setattr(common, k, v)
        try:
            cache.pos.copy_(pos0)
            return fn()
        finally:
            for k, v in saved.items():
                setattr(common, k, v)
    compiled = {}  # one step per distinct set of traced settings
    for traced, _ in setups.values():
        key = tuple(sorted(traced.items()))
        if key not in compiled:
            compiled[key] = step = CompiledStep(model.decode_step, "cpu")
            for _ in range(3):
                patched(traced, lambda: step(tok, cache))
    steps = {name: compiled[tuple(sorted(traced.items()))] for name, (traced, _) in setups.items()}

    def run(name):
        return patched(setups[name][1], lambda: steps[name](tok, cache))
    logits = {name: [run(name) for _ in range(3)][-1] for name in setups}
    ref_name, ref = next(iter(logits.items()))
    for name, b in list(logits.items())[1:]:
        print(f"batch {batch}, {ref_name} vs {name}: max |logits difference| "
              f"{(ref.float() - b.float()).abs().max().item():.3g}, "
              f"same argmax {(ref.argmax(-1) == b.argmax(-1)).float().mean().item():.0%}")
    res = {name: [] for name in setups}
    for _ in range(rounds):
        for name in setups:
            res[name].append(per_call(lambda: run(name), 10))
    med = {name: sorted(v)[len(v) // 2] for name, v in res.items()}
    for name, dt in med.items():
        print(f"  {name:20s}: {dt * 1e3:6.1f} ms/step, {batch / dt:6.0f} tok/s, "
              f"{dt / med[ref_name]:.2f}x the expert op's time (median of {rounds} alternating rounds)")


def dispatch_ab(step, run, rounds: int = 21, n: int = 20) -> None:
    """The same compiled step (same kernels) called through dynamo with guards skipped and as
    dynamo's bytecode called directly (``CompiledStep.direct``), in alternating rounds."""
    out = {}
    for direct in (False, True):
        step.direct = direct
        out[direct] = run()
    print(f"same logits both ways: {torch.equal(out[False], out[True])}")
    res = {False: [], True: []}
    for _ in range(rounds):
        for direct in res:
            step.direct = direct
            res[direct].append(per_call(run, n))
    base = sorted(res[False])[rounds // 2]
    for direct, v in res.items():
        med = sorted(v)[rounds // 2]
        name = "dynamo's bytecode called directly" if direct else "through dynamo, guards skipped"
        print(f"  {name:34s} median {med * 1e3:.3f} ms/step  best {min(v) * 1e3:.3f}  {base / med:.3f}x "
              f"(median of {rounds} alternating rounds of {n} steps)")


def step_ab(model, step, tok, cache, pos0, opts, b_name: str, attr: str, value, a_name: str,
            rounds: int = 11, n: int = 20) -> None:
    """The compiled decode step as built (``step``, B) against a second step compiled while
    ``cpu_kernels.<attr>`` was ``value`` (A), in alternating rounds (settings are read while a step
    traces; the steps have no guards after their warm-up)."""
    from sparseek.model import cpu_kernels

    real = getattr(cpu_kernels, attr)
    setattr(cpu_kernels, attr, value)
    try:
        other = CompiledStep(model.decode_step, "cpu", options=opts)
        for _ in range(4):  # compiled (and past its warm-up) under A's setting
            cache.pos.copy_(pos0)
            other(tok, cache)
    finally:
        setattr(cpu_kernels, attr, real)
    steps = {a_name: other, b_name: step}

    def runner(st):
        def run():
            cache.pos.copy_(pos0)
            return st(tok, cache)
        return run
    out = [runner(st)() for st in steps.values()]
    print(f"max |logits A - B|: {(out[0] - out[1]).abs().max().item():.3g}")
    res = {k: [] for k in steps}
    for _ in range(rounds):
        for k, st in steps.items():
            res[k].append(per_call(runner(st), n))
    base = sorted(res[a_name])[rounds // 2]
    for k, v in res.items():
        med = sorted(v)[rounds // 2]
        print(f"  {k:44s} median {med * 1e3:.3f} ms/step  {med / base:.3f}x (median of {rounds} alternating "
              f"rounds of {n} steps)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefill", type=int, nargs="+", default=[0],
                    help="profile one prefill of this many tokens instead (several with --breakdown)")
    ap.add_argument("--breakdown", action="store_true",
                    help="prefill: wall time per model part at each length, and the experts' GEMM by rows per expert")
    ap.add_argument("--ab-gate-up", action="store_true",
                    help="with --breakdown: each prefill with the experts' gate and up as one GEMM and as two, alternating")
    ap.add_argument("--expert-costs", action="store_true",
                    help="us per routed expert as library GEMM calls vs one bmm, by rows per expert (the "
                         "cost model of the CPU expert op)")
    ap.add_argument("--batch", type=int, default=1, help="decode: rows per step")
    ap.add_argument("--context", type=int, default=64, help="decode: tokens already in the cache")
    ap.add_argument("--max-seq-len", type=int, default=512, help="decode: the cache's length")
    ap.add_argument("--ab-experts", action="store_true",
                    help="decode: the step's routed experts as the CPU expert op (x @ W^T, W @ x^T), grouped GEMMs "
                         "and fused gathers, alternating")
    ap.add_argument("--ab-softmax", action="store_true",
                    help="decode: the step with the attention softmax as the CPU op and as inductor's code, alternating")
    ap.add_argument("--ab-fused-rows", action="store_true",
                    help="decode: bf16 products of 2-8 rows through the AMX kernel and as fused reductions, alternating")
    ap.add_argument("--ab-dispatch", action="store_true",
                    help="decode: the compiled step called through dynamo (guards skipped) and directly, alternating")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--inductor", default="{}",
                    help='extra inductor options for the decode step as JSON, e.g. \'{"cpp_wrapper": true}\'')
    ap.add_argument("--plain", action="store_true",
                    help="plain torch.compile of the step (library GEMVs, guards on every call) for comparison")
    ap.add_argument("--hot-paths", action="store_true", help="prefill with compile_hot_paths() (LLM(compile=True))")
    ap.add_argument("--quantize", choices=["fp8", "fp4"],
                    help="keep the routed experts in this format, the other linear layers in FP8 (quantize_model_)")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))
    dtype = getattr(torch, a.dtype)
    import torch._inductor.config as inductor

    inductor.cpp.enable_kernel_profile = True  # name inductor's kernels in the profile
    model, _ = sparseek.load(a.preset, dtype=dtype, tokenizer=False)
    if a.quantize:
        from sparseek.quant import quantize_model_

        quantize_model_(model, experts=a.quantize, linears="fp8")
    V = model.args.vocab_size
    if a.expert_costs:
        with torch.inference_mode():
            expert_op_costs(model)
        return
    if a.ab_experts:
        with torch.inference_mode():
            experts_op_ab(model, a.batch)
        return
    with torch.inference_mode():
        if a.prefill[0] and a.hot_paths:
            from sparseek.model.v4 import compile_hot_paths

            compile_hot_paths()
        if a.breakdown:
            if not a.prefill[0]:
                ap.error("--breakdown profiles a prefill: give --prefill N [N ...]")
            tables, spread, ab = {}, {}, {}
            for T in a.prefill:
                ids = torch.randint(10, V, (1, T))

                def run():
                    return model(ids, model.new_cache(1, T + 1), last_n=1)
                tables[T] = prefill_breakdown(run)
                spread[T] = rows_per_expert(model, run)
                if a.ab_gate_up:
                    ab[T] = gate_up_ab(run)
            print("ms per prefill (calls) | " + " | ".join(f"{T} tokens" for T in a.prefill))
            for i, (label, _, _) in enumerate(tables[a.prefill[0]]):
                print(f"{label:34s} | " + " | ".join(f"{tables[T][i][1]:7.1f} ({tables[T][i][2]:2d})" for T in a.prefill))
            print("tokens/s".ljust(34) + " | " + " | ".join(f"{T / tables[T][0][1] * 1e3:12,.0f}" for T in a.prefill))
            print("rows per routed expert (min-max)   | " + " | ".join(f"{lo:5d}-{hi:<6d}" for lo, hi in spread.values()))
            for name in next(iter(ab.values()), {}):
                print(f"{name + ', ms best/median':34s} | " + " | ".join(
                    f"{min(v[name]) * 1e3:5.1f}/{sorted(v[name])[len(v[name]) // 2] * 1e3:5.1f}" for v in ab.values()))
            expert_gemm_rates(model, dtype)
            return
        if a.prefill[0]:
            T = a.prefill[0]
            ids = torch.randint(10, V, (1, T))

            def run():
                return model(ids, model.new_cache(1, T + 1), last_n=1)
            dt = per_call(run, 3)
            print(f"prefill {T}: {dt * 1e3:.1f} ms ({T / dt:,.0f} tok/s)")
        else:
            cache = model.new_cache(a.batch, a.max_seq_len)
            model(torch.randint(10, V, (a.batch, a.context)), cache)
            opts = json.loads(a.inductor)
            if a.plain:
                step = torch.compile(model.decode_step, dynamic=False, options=opts or None)
            else:
                step = CompiledStep(model.decode_step, "cpu", options=opts)
            tok, pos0 = torch.randint(10, V, (a.batch, 1)), cache.pos.clone()

            def run():
                cache.pos.copy_(pos0)  # every step at the same position: room in the cache however many run
                return step(tok, cache)
            dt = per_call(run, 30)
            print(f"compiled decode step, batch {a.batch}: {dt * 1e3:.2f} ms/step ({a.batch / dt:.1f} tok/s)")
            if a.ab_dispatch:
                if a.plain:
                    ap.error("--ab-dispatch times the engine's CompiledStep, not --plain")
                dispatch_ab(step, run)
                return
            if a.ab_softmax:
                step_ab(model, step, tok, cache, pos0, opts, "attention softmax as the CPU op",
                        "attn_softmax_fits", lambda *args: False, "torch's softmax (inductor)")
                return
            if a.ab_fused_rows:
                step_ab(model, step, tok, cache, pos0, opts, "2+ row bf16 products through the AMX kernel",
                        "COMPILED_MIN_ROWS", FUSED_ROWS + 1, f"products of up to {FUSED_ROWS} rows fused")
                return
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            for _ in range(1 if a.prefill[0] else 10):
                run()
        print(p.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=60, max_shapes_column_width=60))
        expert_rates(model, dtype)
        W, x = model.head.weight, torch.randn(1, model.args.hidden_size, dtype=dtype)
        fused = torch.compile(F.linear, dynamic=False, backend=fusing_backend())
        for name, fn in (("library call", F.linear), ("fused reduction", fused)):
            dt = per_call(lambda: fn(x, W), 30)
            print(f"LM-head GEMV {tuple(W.shape)} {a.dtype}, {name}: {dt * 1e3:.2f} ms, "
                  f"{W.numel() * W.element_size() / dt / 1e9:.1f} GB/s of weights streamed")


if __name__ == "__main__":
    main()

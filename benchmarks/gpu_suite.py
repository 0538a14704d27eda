"""Everything the engine and training issues measure on one GPU, in one run (one device lease).

    python3 benchmarks/gpu_suite.py --out benchmarks/results/h200            # on the H200
    python benchmarks/gpu_suite.py --smoke --out /tmp/smoke                  # the same code paths on a CPU, tiny

The model is the anchors' (§2) transformers baseline: DeepSeek-V4 with V4-Flash dimensions, 6 layers,
64 routed experts, bf16, random weights. Sections, each timed, each written to ``OUT.jsonl`` as it
finishes (a run cut short keeps what it measured), then summarized in ``OUT.md``:

1. ceilings: copy bandwidth and bf16 matmul rate, measured now;
2. prefill of 16K / 64K / 128K tokens (chunked; peak memory; the lightning indexer's share, timed
   by running the 64K prefill again with the indexer's scoring replaced by a free stand-in);
3. decode at batch 1 and 32 with short prompts, eager and compiled (CUDA graphs), with the
   roofline (active weight bytes + cache bytes read per step / measured bandwidth);
4. batch-1 decode with 128K and 1M tokens of context, from caches filled with synthetic entries
   (the cost of a step does not depend on the values);
5. training steps (forward + MTP + backward + Muon/AdamW, bf16 autocast) of ``small`` (also with
   the lightning indexers' KL loss, as ``sparseek train`` runs by default) and of the
   6-layer model's forward+backward, tokens/s and MFU on active-parameter FLOPs (the latter also
   with plain autograd through the attention instead of its recomputing backward, and last once
   more with the hot paths compiled, as ``sparseek train --compile`` runs);
6. ``speculative``: eager decoding with MTP speculation (k = 1, 2, 3 drafts, right 80% of the time)
   against plain eager decoding at batch 1 and 32; ``speculative-compiled``: the same with k = 2,
   both sides ``LLM(compile=True)`` (decode, verify and MTP steps compiled as CUDA graphs);
8. ``cpu-moe``: the routed experts in host memory beside the GPU (``--cpu-moe``): logits against the
   all-GPU model, eager batch-1 decode, prefill with the experts streamed to the GPU or run on the CPU.
7. ``profile``: torch.profiler tables of one training step, one 16K prefill and eager decode steps
   (``OUT-profile-*.txt``), to see what to fix next without another lease.

``--only SECTION...`` reruns a subset (section names: see ``--help``).

transformers' numbers for the same model on the same kind of machine are in anchors §2
(prefill 2K 17,606 tok/s, OOM at 16K; decode bs1 25.8, bs32 556 tok/s; train 8,163 tok/s);
``--with-transformers`` also runs its prefill 2K and decode bs1 here (needs DeepseekV4 in transformers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import sparseek  # noqa: E402
from sparseek.model import build_model  # noqa: E402
from sparseek.model.cache import cache_bytes  # noqa: E402
from bench_engine import bandwidth_gbs  # noqa: E402

T0 = time.perf_counter()


def flash6(smoke: bool, **switches):
    """``switches``: config switches such as DeepSeek's runtime rounding (kv_fp8, index_fp4)."""
    if smoke:
        return sparseek.preset("debug", **switches)
    a = sparseek.preset("v4-flash")
    n = 6
    return sparseek.preset("v4-flash", num_hidden_layers=n, n_routed_experts=64,
                           compress_ratios=a.compress_ratios[:n] + [0], **switches)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_gb(dev) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


class Report:
    def __init__(self, out: str, budget: float):
        self.out, self.budget, self.rows = out, budget, []
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        open(out + ".jsonl", "w").close()

    def left(self) -> float:
        return self.budget - (time.perf_counter() - T0)

    def add(self, section: str, **kw):
        row = {"section": section, "t": round(time.perf_counter() - T0, 1), **kw}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        with open(self.out + ".jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        summarize(self)  # after every row: a run cut off by its time limit keeps a readable table

    def run(self, section: str, fn, *a, need: float = 0.0, **kw):
        if self.left() < need:
            self.add(section, skipped=f"time budget: {self.left():.0f}s left, needs ~{need:.0f}s")
            return None
        try:
            return fn(*a, **kw)
        except Exception as e:  # one failure must not cost the rest of the lease
            self.add(section, error=f"{type(e).__name__}: {str(e)[:400]}")
            if "out of memory" in str(e).lower() and torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None


# ---------------------------------------------------------------------------- 1. ceilings
def ceilings(rep: Report, dev, smoke: bool):
    bw = bandwidth_gbs(dev.type) * 1e9
    m = 1024 if smoke else 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device=dev)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=dev)
    a @ b
    sync(dev)
    t, k = time.perf_counter(), 0
    while time.perf_counter() - t < 1.0:
        a @ b
        k += 1
    sync(dev)
    flops = 2 * m ** 3 * k / (time.perf_counter() - t)
    rep.add("ceilings", copy_gbs=bw / 1e9, bf16_tflops=flops / 1e12, torch=torch.__version__,
            device=torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor())
    return bw, flops


# ---------------------------------------------------------------------------- 2. prefill
def prefill(rep: Report, model, dev, T: int, chunk: int, tag: str = ""):
    ids = torch.randint(10, model.args.vocab_size, (1, T), device=dev)
    reset_peak(dev)
    base = torch.cuda.memory_allocated() / 2**30 if dev.type == "cuda" else None
    with torch.inference_mode():
        cache = model.new_cache(1, T + 16)
        sync(dev)
        t = time.perf_counter()
        for s in range(0, T, chunk):
            model(ids[:, s:s + chunk], cache, last_n=1)
        sync(dev)
        dt = time.perf_counter() - t
    flops, idx_flops = prefill_flops(model.args, T)
    rep.add("prefill" + tag, impl="sparseek", tokens=T, chunk=chunk, seconds=dt, tokens_per_s=T / dt,
            peak_gb=peak_gb(dev), weights_gb=base, cache_gb=cache.nbytes() / 2**30,
            tflop=flops / 1e12, tflops=flops / dt / 1e12, indexer_flop_share=idx_flops / flops)
    del cache
    return dt


def prefill_flops(args, T: int) -> tuple[float, float]:
    """Analytic forward FLOPs of a T-token prefill (a third of the trainer's fwd+bwd count) and the
    lightning indexer's part of it: 2 x heads x dim per (query, visible compressed key) pair, so
    quadratic in T with a small constant."""
    from sparseek.config import CSA_RATIO
    from sparseek.train.trainer import training_flops_per_token

    idx = sum(args.index_n_heads * args.index_head_dim * T * T / CSA_RATIO
              for i in range(args.num_hidden_layers) if args.compress_ratio(i) == CSA_RATIO)
    return training_flops_per_token(args, T) / 3 * T, idx


def indexer_share(rep: Report, model, dev, T: int, chunk: int, full_s: float):
    """Run the prefill again with the indexer's O(T^2) scoring replaced by a free pick (the first
    entries): the difference is what the lightning indexer costs."""
    from sparseek.model import v4

    orig = v4.Indexer.select

    def free(self, q, w, keys, n_vis):
        k = min(self.topk, keys.shape[1])
        idx = torch.arange(k, device=q.device).expand(*q.shape[:2], k)
        return torch.where(idx < n_vis[..., None], idx, -1)

    v4.Indexer.select = free
    try:
        without = prefill(rep, model, dev, T, chunk, tag=" (indexer stubbed)")
    finally:
        v4.Indexer.select = orig
    from sparseek.model import kernels

    fused = kernels.usable(torch.zeros(1, device=dev))
    rep.add("indexer share", tokens=T, indexer_seconds=full_s - without, share=(full_s - without) / full_s,
            triton_kernel=fused)
    if fused:  # and the same prefill with the indexer in plain PyTorch: what the kernel buys
        kernels.enabled = False
        try:
            plain = prefill(rep, model, dev, T, chunk, tag=" (indexer in PyTorch, no Triton)")
        finally:
            kernels.enabled = True
        rep.add("indexer share", tokens=T, impl="PyTorch einsums", indexer_seconds=plain - without,
                share=(plain - without) / plain)


# ---------------------------------------------------------------------------- 3./4. decode
def active_bytes(model) -> float:
    c = model.param_counts()
    a = model.args
    return (c["active"] + a.hidden_size * a.vocab_size) * 2  # bf16 weights read per step (head included)


def decode_short(rep: Report, model, dev, batch: int, compiled: bool, bw: float, prompt: int = 128, new: int = 64,
                 gemv: bool = False, tag: str = ""):
    """``gemv=True``: the compiled step with its matrix-vector products as Triton reductions under
    coordinate-descent tuning (``sparseek.model.fuse``, the CPU default) instead of cuBLAS."""
    from sparseek.engine import LLM, SamplingParams
    from sparseek.engine.compile import CompiledStep

    llm = LLM(model, None, max_batch_size=batch, max_seq_len=prompt + new + 32, compile=compiled)
    if gemv:
        llm._decode_fn = CompiledStep(model.decode_step, dev, gemv=True)
    prompts = [torch.randint(10, model.args.vocab_size, (prompt,)).tolist() for _ in range(batch)]

    def gen(n):
        return llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

    gen(4)  # warm-up (and compilation / graph capture)
    sync(dev)
    t0 = time.perf_counter()
    gen(1)
    sync(dev)
    t1 = time.perf_counter()
    gen(new)
    sync(dev)
    t2 = time.perf_counter()
    rate = batch * (new - 1) / max((t2 - t1) - (t1 - t0), 1e-9)
    per_step = active_bytes(model) + batch * cache_bytes(model.args, prompt + new, torch.bfloat16)["total_bytes"]
    roof = batch * bw / per_step
    rep.add("decode" + tag, impl="sparseek", batch=batch, compiled="gemv" if gemv else compiled, context=prompt, tokens_per_s=rate,
            roofline_tokens_per_s=roof, roofline_fraction=rate / roof)


def decode_speculative(rep: Report, model, dev, batch: int, ks=(1, 2, 3), accept: float = 0.8, prompt: int = 128,
                       new: int = 64, compiled: bool = False):
    """Decoding with MTP speculation against plain decoding, both eager or both compiled
    (``LLM(compile=True)``: the decode, verify and MTP steps as CUDA graphs), end to end (prompts
    of ``prompt`` tokens, ``new`` generated): the drafts come from an oracle right with probability
    ``accept`` (random weights' own MTP block agrees with their head almost never)."""
    from sparseek.engine import LLM, SamplingParams
    from engine_speculative import oracle_drafter

    prompts = [torch.randint(10, model.args.vocab_size, (prompt,)).tolist() for _ in range(batch)]
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    plain = LLM(model, None, max_batch_size=batch, max_seq_len=prompt + new + 32, compile=compiled)
    refs = [o.token_ids for o in plain.generate(prompts, params)]  # compiled: also the warm-up

    def timed(llm):
        sync(dev)
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        sync(dev)
        return outs, time.perf_counter() - t

    _, base = timed(plain)
    propose = LLM._propose
    LLM._propose = oracle_drafter(refs, accept, model.args.vocab_size)
    try:
        for k in ks:
            llm = LLM(model, None, max_batch_size=batch, max_seq_len=prompt + new + 32, speculative_tokens=k,
                      compile=compiled)
            llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))  # warm-up
            outs, dt = timed(llm)
            drafted = sum(o.drafted for o in outs)
            rep.add("decode speculative", batch=batch, k=k, compiled=compiled, oracle_accept=accept, tokens_per_s=batch * new / dt,
                    plain_tokens_per_s=batch * new / base, speedup=base / dt,
                    acceptance=sum(o.accepted for o in outs) / max(drafted, 1),
                    same_as_plain=sum(o.token_ids == r for o, r in zip(outs, refs)))
    finally:
        LLM._propose = propose


def cpu_moe(rep: Report, model, dev, bw: float, prompt: int = 64, prefill_T: int = 2048):
    """``--cpu-moe`` (``sparseek.parallel.offload``): the routed experts in pinned host memory, the
    rest on the GPU. Rows: the logits' agreement with the all-GPU model (the CPU's bf16 products
    round differently: max difference and top-1 agreement), eager batch-1 decode with the CPU
    running the picked experts (against the same eager decode all on the GPU, measured first),
    and a prefill whose forwards copy each layer's experts to the GPU against one whose CPU
    computes them. The experts go back to the GPU afterwards. On a CPU (``--smoke``) the split path
    is forced with same-device copies."""
    from sparseek.model import common
    from sparseek.parallel.offload import offload_experts_

    ids = torch.randint(10, model.args.vocab_size, (1, prompt), device=dev)
    with torch.inference_mode():
        want = model(ids).float()
    rep.run("cpu-moe", decode_short, rep, model, dev, 1, False, bw, new=32, tag=" (all on the GPU)", need=20)
    forced, elsewhere = dev.type != "cuda", common.MoE._experts_elsewhere
    if forced:
        common.MoE._experts_elsewhere = lambda self, x: True
    try:
        t = time.perf_counter()
        offload_experts_(model, dev)
        moved_s = time.perf_counter() - t
        host_gb = sum(p.numel() * p.element_size() for m in model.modules() if isinstance(m, common.MoE)
                      for p in m.experts.parameters()) / 2**30
        def stream(tokens):  # offload_experts_ set each block's own threshold
            for m in model.modules():
                if isinstance(m, common.MoE):
                    m.stream_tokens = tokens

        with torch.inference_mode():
            for tokens in (None, 32):  # the CPU computes every row / prompt >= 32 tokens: the GPU
                stream(tokens)
                got = model(ids).float()
                rep.add("cpu-moe", what="logits vs all-GPU", experts="streamed to GPU" if tokens else "on the CPU",
                        max_abs_diff=float((got - want).abs().max()),
                        top1_agree=float((got.argmax(-1) == want.argmax(-1)).float().mean()),
                        host_experts_gb=host_gb, offload_s=moved_s, peak_gb=peak_gb(dev))
        rep.run("cpu-moe", decode_short, rep, model, dev, 1, False, bw, new=32, tag=" (experts on the CPU)", need=30)
        for tokens, T in ((32, prefill_T), (None, min(prefill_T, 512))):
            stream(tokens)
            rep.run("cpu-moe", prefill, rep, model, dev, T, T,
                    " (cpu-moe: experts " + ("streamed to the GPU)" if tokens else "computed on the CPU)"), need=30)
    finally:
        common.MoE._experts_elsewhere = elsewhere
        for m in model.modules():
            if isinstance(m, common.MoE):
                m.__dict__.pop("stream_tokens", None)  # back to the class default
        model.to(dev)
        for m in model.modules():
            if isinstance(m, common.Experts):
                m.fuse_gate_up_()


def prefix_sharing(rep: Report, model, dev, preamble: int, rest: int, n: int):
    """``n`` prompts behind one ``preamble``-token beginning (a long system prompt or few-shot
    block), each with ``rest`` tokens of its own, to their first tokens: a fresh engine without
    and with prefix caching (the beginning read once, its cache row snapshotted into each row)."""
    from sparseek.engine import LLM, SamplingParams

    g = torch.Generator().manual_seed(0)
    common = torch.randint(10, model.args.vocab_size, (preamble,), generator=g).tolist()
    prompts = [common + torch.randint(10, model.args.vocab_size, (rest,), generator=g).tolist() for _ in range(n)]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    seconds, firsts = {}, {}
    for name, budget in (("off", 0), ("on", 1 << 32), ("off", 0), ("on", 1 << 32)):  # the first pair warms up
        llm = LLM(model, None, max_batch_size=n, max_seq_len=preamble + rest + 64, prefill_chunk=8192,
                  prefix_cache_bytes=budget)
        sync(dev)
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        sync(dev)
        seconds[name], firsts[name] = time.perf_counter() - t, [o.token_ids for o in outs]
    rep.add("prefix cache", prompts=n, preamble=preamble, rest=rest, seconds_off=seconds["off"],
            seconds_on=seconds["on"], speedup=seconds["off"] / seconds["on"],
            same_first_tokens=sum(a == b for a, b in zip(firsts["off"], firsts["on"])))


def decode_long(rep: Report, model, dev, context: int, bw: float, steps: int = 32):
    """Batch-1 decode after ``context`` tokens: a cache of that length with synthetic entries."""
    from sparseek.engine.compile import CompiledStep

    with torch.inference_mode():
        cache = model.new_cache(1, context + steps + 16)
        g = torch.Generator(device=dev).manual_seed(0)
        for lc in cache.layers:
            for t in lc.tensors():
                if t.is_floating_point():
                    t.copy_(torch.randn(t.shape, generator=g, device=dev, dtype=t.dtype) * 0.5)
        cache.pos.fill_(context)
        cache.mtp_pos.fill_(context)
        if dev.type == "cuda":
            cache.mark_static()
        step = CompiledStep(model.decode_step, dev)  # what LLM(compile=True) runs
        tok = torch.randint(10, model.args.vocab_size, (1, 1), device=dev)
        for _ in range(3):
            step(tok, cache)
        sync(dev)
        t = time.perf_counter()
        for _ in range(steps):
            step(tok, cache)
        sync(dev)
        dt = (time.perf_counter() - t) / steps
    # the static step reads every compressed buffer in full (masked): count what it reads
    read = active_bytes(model) + cache.nbytes()
    rep.add("decode long context", impl="sparseek", batch=1, context=context, tokens_per_s=1 / dt, ms_per_token=dt * 1e3,
            cache_gb=cache.nbytes() / 2**30, roofline_tokens_per_s=bw / read, roofline_fraction=(1 / dt) / (bw / read),
            peak_gb=peak_gb(dev))
    del cache


# ---------------------------------------------------------------------------- 5. training
def train_speed(rep: Report, args, dev, batch: int, seq: int, steps: int, peak_flops: float, name: str,
                optimizer: str | None = "muon", mtp: bool = True, model=None, indexer_loss: bool = False,
                fused_loss: bool = True):
    """Tokens/s and MFU of training steps. ``optimizer=None`` times forward + backward only (bf16
    weights: an 11.6B model's fp32 optimizer state does not fit), which is what transformers'
    baseline row measures; ``model`` reuses an already-built one (its weights are left as found).
    ``fused_loss=False``: the loss from materialized fp32 logits (before ``model/loss.py``)."""
    from sparseek.train.optim import build_optimizer
    from sparseek.train.trainer import training_flops_per_token

    own = model is None
    if own:
        torch.manual_seed(0)
        with torch.device(dev):
            model = build_model(args, dtype=None if optimizer else torch.bfloat16)
        model.init_weights(seed=0)
    opt = build_optimizer(model, optimizer) if optimizer else None
    one = train_step_fn(model, args, dev, batch, seq, opt, mtp, indexer_loss, fused_loss)
    with training(model):
        tps, retries = _time_steps(one, dev, batch * seq, steps)
    mfu = tps * training_flops_per_token(args, seq) / peak_flops
    rep.add("train", impl="sparseek", model=name, batch=batch, seq_len=seq,
            optimizer=optimizer or "none (fwd+bwd)", mtp=bool(mtp and len(model.mtp)), indexer_loss=indexer_loss,
            loss="fused" if fused_loss else "logits", tokens_per_s=tps, mfu=mfu, peak_gb=peak_gb(dev),
            alloc_retries=retries)
    if own:
        del model, opt


@contextlib.contextmanager
def training(model):
    """Train mode for a timing, then back to eval with no gradients held (the model is shared)."""
    model.train()
    try:
        yield
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)


def train_step_fn(model, args, dev, batch: int, seq: int, opt=None, mtp: bool = True, indexer_loss: bool = False,
                  fused_loss: bool = True):
    """One training step on random tokens: forward (+ MTP) + backward (+ optimizer step), with the
    lightning indexers' KL loss if asked (as ``sparseek train`` runs by default)."""
    ce = torch.nn.functional.cross_entropy
    from sparseek.model.v4 import indexer_learners

    learners = indexer_learners(model)

    def one():
        x = torch.randint(0, args.vocab_size, (batch, seq + 1), device=dev)
        x, y = x[:, :-1], x[:, 1:]
        for a in learners:
            a.learn_indexer, a.indexer_loss = indexer_loss, None
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            if fused_loss:  # what the trainer runs: heads and losses fused, no logits tensor
                loss, h = model(x, return_hidden=True, targets=y)
                if mtp and len(model.mtp):
                    loss = loss + 0.3 * model.forward_mtp(h[:, :-1], x[:, 1:], targets=y[:, 1:])
            else:
                logits, h = model(x, return_hidden=True)
                loss = ce(logits.flatten(0, 1).float(), y.flatten())
                if mtp and len(model.mtp):
                    loss = loss + 0.3 * ce(model.forward_mtp(h[:, :-1], x[:, 1:]).flatten(0, 1).float(),
                                           y[:, 1:].flatten())
        loss = loss + sum(a.indexer_loss for a in learners if a.indexer_loss is not None)
        for a in learners:
            a.learn_indexer, a.indexer_loss = False, None
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    return one


# ---------------------------------------------------------------------------- 6. where the time goes
def profile_ops(rep: Report, model, args, dev, train_shape: tuple[int, int], prefill_T: int):
    """torch.profiler tables (top ops by self device time) of one training step, one prefill and
    a few eager decode steps: what to fix next, from the same lease."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    one = train_step_fn(model, args, dev, *train_shape, mtp=False)
    ids = torch.randint(10, args.vocab_size, (1, prefill_T), device=dev)

    def train():
        with training(model):
            one()

    def prefill():
        with torch.inference_mode():
            model(ids, model.new_cache(1, prefill_T + 8), last_n=1)

    def decode():
        with torch.inference_mode():
            cache = model.new_cache(1, 4096)
            model(ids[:, :128], cache, last_n=1)
            for _ in range(4):
                model.decode_step(ids[:, :1], cache)

    for name, fn in (("train", train), ("prefill", prefill), ("decode", decode)):
        fn()  # warm
        sync(dev)
        t = time.perf_counter()
        with profile(activities=acts) as prof:
            fn()
            sync(dev)
        wall = time.perf_counter() - t
        avg = prof.key_averages()
        with open(f"{rep.out}-profile-{name}.txt", "w") as f:
            f.write(avg.table(sort_by=key, row_limit=40))
        top = sorted(avg, key=lambda e: getattr(e, key), reverse=True)[:8]
        rep.add("profile", what=name, wall_ms=wall * 1e3,
                top_ms={e.key[:60]: round(getattr(e, key) / 1e3, 2) for e in top})


def alloc_retries(dev) -> int | None:
    """The CUDA caching allocator's retries so far: each one, at a failed allocation, synchronizes
    the device, frees every cached block and allocates again (a training step near the card's
    capacity can pay this many times)."""
    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if dev.type == "cuda" else None


def _time_steps(one, dev, tokens_per_step: int, steps: int) -> tuple[float, int | None]:
    """-> (tokens/s, allocator retries during the timed steps)."""
    reset_peak(dev)
    for _ in range(2):
        one()
    sync(dev)
    r0 = alloc_retries(dev)
    t = time.perf_counter()
    for _ in range(steps):
        one()
    sync(dev)
    tps = tokens_per_step * steps / (time.perf_counter() - t)
    return tps, None if r0 is None else alloc_retries(dev) - r0


# ---------------------------------------------------------------------------- transformers
def hf_model(args, dev):
    """transformers' DeepseekV4ForCausalLM of the same config, randomly initialized on the device
    (timings do not depend on the values; writing 23 GB of weights to disk and back would cost
    minutes of the lease)."""
    import tempfile

    import transformers

    if not hasattr(transformers, "DeepseekV4ForCausalLM"):
        raise RuntimeError(f"transformers {transformers.__version__} has no DeepseekV4ForCausalLM")
    with tempfile.TemporaryDirectory() as d:
        args.save(d)
        cfg = transformers.AutoConfig.from_pretrained(d)
    with torch.device(dev):
        return transformers.DeepseekV4ForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()


def hf_inference(rep: Report, theirs, dev, vocab: int):
    import transformers

    v = transformers.__version__
    T = 2048
    ids = torch.randint(10, vocab, (1, T), device=dev)
    with torch.inference_mode():
        theirs(ids, logits_to_keep=1)
        sync(dev)
        t = time.perf_counter()
        theirs(ids, logits_to_keep=1)
        sync(dev)
        rep.add("prefill", impl=f"transformers {v}", tokens=T, tokens_per_s=T / (time.perf_counter() - t),
                peak_gb=peak_gb(dev))
        theirs.generation_config.pad_token_id = 0
        for batch in (1, 32):
            short = torch.randint(10, vocab, (batch, 128), device=dev)
            theirs.generate(short, max_new_tokens=2, min_new_tokens=2, do_sample=False)
            sync(dev)
            t = time.perf_counter()
            theirs.generate(short, max_new_tokens=33, min_new_tokens=33, do_sample=False)
            sync(dev)
            rep.add("decode", impl=f"transformers {v}", batch=batch, context=128,
                    tokens_per_s=batch * 32 / (time.perf_counter() - t))


def hf_train(rep: Report, theirs, args, dev, batch: int, seq: int, steps: int, peak_flops: float, name: str):
    import transformers

    from sparseek.train.trainer import training_flops_per_token

    def one():
        x = torch.randint(0, args.vocab_size, (batch, seq), device=dev)
        theirs(input_ids=x, labels=x).loss.backward()
        theirs.zero_grad(set_to_none=True)

    with training(theirs):
        tps, retries = _time_steps(one, dev, batch * seq, steps)
    rep.add("train", impl=f"transformers {transformers.__version__}", model=name, batch=batch, seq_len=seq,
            optimizer="none (fwd+bwd)", mtp=False, tokens_per_s=tps,
            mfu=tps * training_flops_per_token(args, seq) / peak_flops, peak_gb=peak_gb(dev), alloc_retries=retries)


def transformers_side(rep: Report, args, dev, peak_flops: float, name: str, inference: bool,
                      train_batch: int, train_seq: int, train_steps: int):
    theirs = rep.run("transformers", hf_model, args, dev, need=30)
    if theirs is None:
        return
    if inference:
        rep.run("transformers", hf_inference, rep, theirs, dev, args.vocab_size, need=30)
    rep.run("transformers", hf_train, rep, theirs, args, dev, train_batch, train_seq, train_steps,
            peak_flops, name, need=30)
    del theirs
    if dev.type == "cuda":
        torch.cuda.empty_cache()


SECTIONS = ["prefill", "decode", "train", "decode-compiled", "decode-long", "indexer", "profile", "speculative",
            "speculative-compiled", "prefix", "cpu-moe"]
KEYS = ("model", "tokens", "batch", "context", "compiled", "chunk", "seq_len", "optimizer")


def summarize(rep: Report):
    lines = [f"# GPU suite: {sys.argv[0]} {' '.join(sys.argv[1:])}", "",
             "One row per measurement, in the order run (JSON lines beside this file).", "",
             "| section | impl | what | tokens/s | other |", "|---|---|---|---|---|"]
    for r in rep.rows:
        what = ", ".join(f"{k}={r[k]}" for k in KEYS if k in r)
        other = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                          if k not in ("section", "t", "tokens_per_s", "impl") + KEYS)
        tps = f"{r['tokens_per_s']:,.1f}" if "tokens_per_s" in r else ""
        lines.append(f"| {r['section']} | {r.get('impl', '')} | {what} | {tps} | {other} |")
    with open(rep.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/h200")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device (checks the code paths)")
    ap.add_argument("--budget", type=float, default=540, help="seconds; later sections are skipped past it")
    ap.add_argument("--with-transformers", action="store_true")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=SECTIONS,
                    help="run only these sections (a short rerun after a change)")
    ap.add_argument("--runtime-rounding", action="store_true",
                    help="the model with DeepSeek's runtime rounding and cache layout: FP8 KV (583-byte entries) "
                         "and the FP4 indexer (68-byte keys): e.g. --only decode-long for the 1M-token row")
    a = ap.parse_args()
    want = set(a.only)
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    rep = Report(a.out, a.budget)
    bw, flops = ceilings(rep, dev, a.smoke)
    args = flash6(a.smoke, **({"kv_fp8": True, "index_fp4": True} if a.runtime_rounding else {}))
    name = ("debug" if a.smoke else "v4-flash-dims 6 layers") + (" (FP8 KV, FP4 indexer)" if a.runtime_rounding else "")
    dtype = torch.bfloat16
    with torch.device(dev):
        model = build_model(args, dtype=dtype)
    model.init_weights(seed=0)
    model.eval()
    c = model.param_counts()
    rep.add("model", params_total=c["total"], params_active=c["active"], layers=args.num_hidden_layers,
            experts=args.n_routed_experts, dtype=str(dtype), kv_fp8=args.kv_fp8, index_fp4=args.index_fp4)
    # sections in order of what the issues need most, so a run cut short by the lease loses the least
    short_T, lengths, chunk = (256, (512, 2048), 256) if a.smoke else (2048, (16384, 131072, 65536), 16384)
    tb, ts = (2, 128) if a.smoke else (4, 2048)
    times = {}
    with torch.inference_mode():  # warm-up: kernel loading and library handles stay out of the timings
        model(torch.randint(10, args.vocab_size, (1, 256), device=dev), last_n=1)
    if "prefill" in want:
        rep.run("prefill", prefill, rep, model, dev, short_T, short_T, need=10)
        for T in lengths[:2]:
            times[T] = rep.run("prefill", prefill, rep, model, dev, T, chunk, need=30)
    batches = (1, 4) if a.smoke else (1, 32)
    for batch in batches if "decode" in want else ():
        rep.run("decode", decode_short, rep, model, dev, batch, False, bw, need=20)
    if a.with_transformers:
        transformers_side(rep, args, dev, flops, name, True, tb, ts, 2 if a.smoke else 3)
    small = sparseek.preset("debug" if a.smoke else "small")
    sb, ss = (2, 128) if a.smoke else (16, 2048)
    if "train" in want:
        rep.run("train", train_speed, rep, args, dev, tb, ts, 2 if a.smoke else 5, flops, name,
                optimizer=None, mtp=False, model=model, need=40)
        # the same with plain autograd through the attention: what recomputing its probabilities
        # in backward saves in memory (~20 GB expected here) and costs or gains in speed
        from sparseek.model import v4

        v4.recompute_attention = False
        rep.run("train", train_speed, rep, args, dev, tb, ts, 2 if a.smoke else 5, flops, name + " (plain autograd attention)",
                optimizer=None, mtp=False, model=model, need=60)
        v4.recompute_attention = True
        # the loss from materialized fp32 logits (129,280 x 8,192 here): what the fused loss saves
        rep.run("train", train_speed, rep, args, dev, tb, ts, 2 if a.smoke else 5, flops, name + " (logits loss)",
                optimizer=None, mtp=False, model=model, fused_loss=False, need=60)
        # SwiGLU, RMSNorm and mHC's two sides through plain autograd: what keeping only their inputs
        # saves (~half the activations by benchmarks/results/cpu-flash-train-saved.txt) and costs
        from sparseek.model import common

        common.recompute_pointwise = False
        rep.run("train", train_speed, rep, args, dev, tb, ts, 2 if a.smoke else 5, flops,
                name + " (plain autograd pointwise)", optimizer=None, mtp=False, model=model, need=60)
        common.recompute_pointwise = True
        # twice the batch, which the memory saved above should make room for (bigger GEMMs: MFU)
        rep.run("train", train_speed, rep, args, dev, 2 * tb, ts, 2 if a.smoke else 4, flops, name,
                optimizer=None, mtp=False, model=model, need=60)
        rep.run("train", train_speed, rep, small, dev, sb, ss, 3 if a.smoke else 10, flops, "small", need=30)
        # what `sparseek train` runs by default: the indexers' KL loss on top
        rep.run("train", train_speed, rep, small, dev, sb, ss, 3 if a.smoke else 10, flops, "small",
                indexer_loss=True, need=30)
        rep.run("train", train_speed, rep, small, dev, sb, ss, 3 if a.smoke else 10, flops, "small",
                optimizer=None, mtp=False, need=30)
    if a.with_transformers:
        transformers_side(rep, small, dev, flops, "small", False, sb, ss, 3 if a.smoke else 10)
    if "profile" in want:  # before the compiled sections, whose CUDA-graph pools hold memory
        rep.run("profile", profile_ops, rep, model, args, dev, (tb, ts), short_T if a.smoke else 16384, need=60)
    if "indexer" in want:
        mid = lengths[2] if len(lengths) > 2 else lengths[0]
        times[mid] = times.get(mid) or rep.run("prefill", prefill, rep, model, dev, mid, chunk, need=60)
        if times.get(mid):
            rep.run("indexer share", indexer_share, rep, model, dev, mid, chunk, times[mid], need=60)
    for batch in batches if "decode-compiled" in want else ():
        rep.run("decode", decode_short, rep, model, dev, batch, True, bw, need=90)
    if "decode-compiled" in want and 1 in batches:  # the CPU's GEMV-as-reduction step, on the GPU
        rep.run("decode", decode_short, rep, model, dev, 1, True, bw, gemv=True, need=120)
    if "prefill" in want and "decode-compiled" in want:  # LLM(compile=True) left the hot paths compiled
        for tag in (" (compiled hot paths, first: compiles)", " (compiled hot paths)"):
            rep.run("prefill", prefill, rep, model, dev, short_T, short_T, tag, need=60)
        # a second length recompiles once (dynamo's automatic dynamic shapes), then no more: untimed
        for tag in (" (compiled hot paths, first at this length: recompiles)", " (compiled hot paths)"):
            rep.run("prefill", prefill, rep, model, dev, lengths[0], chunk, tag, need=60)
    for batch in batches if "speculative" in want else ():
        rep.run("decode speculative", decode_speculative, rep, model, dev, batch, need=60)
    for batch in batches if "speculative-compiled" in want else ():  # k = 2: three compiled steps
        rep.run("decode speculative", decode_speculative, rep, model, dev, batch, (2,), compiled=True, need=120)
    for ctx in ((4096,) if a.smoke else (1 << 20, 131072)) if "decode-long" in want else ():
        rep.run("decode long context", decode_long, rep, model, dev, ctx, bw, need=90)
    if "prefix" in want:  # no issue target: after those; 8 prompts behind a 16K-token preamble: 131K tokens read without caching
        pre, rest, n = (300, 20, 4) if a.smoke else (16384, 256, 8)
        rep.run("prefix cache", prefix_sharing, rep, model, dev, pre, rest, n, need=60)
    if "cpu-moe" in want:  # no issue target (anchors §5 item 7): after those
        rep.run("cpu-moe", cpu_moe, rep, model, dev, bw, need=90)
    torch._dynamo.reset()  # drop the compiled steps and their graph pools before training again
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if "train" in want:  # last: swaps in the compiled mHC / Sinkhorn for the rest of the process
        from sparseek.model.v4 import compile_hot_paths

        compile_hot_paths()  # what `sparseek train --compile` does
        rep.run("train", train_speed, rep, args, dev, tb, ts, 2 if a.smoke else 5, flops, name + " (--compile)",
                optimizer=None, mtp=False, model=model, need=90)

if __name__ == "__main__":
    main()

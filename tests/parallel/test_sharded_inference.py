"""Expert-sharded inference on two CPU processes (gloo): each rank keeps half of every layer's
routed experts (plain, or kept FP4), and both give the single-process logits and tokens (greedy
and seeded sampling, continuous batching, the fixed-shape decode path); the CLI's generate runs
under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

PROMPTS = [[5, 9, 17, 33, 2, 71], [40, 41, 42], list(range(100, 140))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(quantized: bool = False):
    import sparseek
    from sparseek.model import build_model
    from sparseek.quant import quantize_model_
    from tests.conftest import randomize_

    model = randomize_(build_model(sparseek.preset("debug")), 21).eval()
    return quantize_model_(model, experts="fp4", linears=None) if quantized else model


def _run(model, compile: bool = False):
    """What both set-ups must agree on."""
    from sparseek.engine import LLM, SamplingParams
    from sparseek.tokenizer import default_tokenizer

    llm = LLM(model, default_tokenizer(512), max_batch_size=2, max_seq_len=256)  # 3 prompts: one waits
    if compile:  # the compiled decode step, its all-reduces inside: the eager single process's tokens
        fast = LLM(model, default_tokenizer(512), max_batch_size=2, max_seq_len=256, compile=True)
        return {"greedy": [o.token_ids for o in fast.generate(PROMPTS[:2], SamplingParams(
            max_tokens=8, temperature=0, ignore_eos=True))]}
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    sampled = llm.generate(PROMPTS, [SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True)
                                     for s in range(3)])
    with torch.no_grad():
        ids = torch.tensor([PROMPTS[2][:24], PROMPTS[2][16:]])
        logits = model(ids)
        from sparseek.model.common import MoE

        moe = [m for m in model.modules() if isinstance(m, MoE)][-1]  # not a hash-routed layer
        x = torch.randn(5, model.args.hidden_size, generator=torch.Generator().manual_seed(0))
        w, idx, _ = moe.gate(x)
        static = moe.experts.forward_static(x, w, idx)  # the compiled decode step's expert path
    return {"greedy": [o.token_ids for o in greedy], "sampled": [o.token_ids for o in sampled],
            "logits": logits.flatten().tolist(), "static": static.flatten().tolist()}


def _worker(rank, world, port, out, quantized, compile=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from sparseek.parallel import ShardedExperts, ShardedQuantExperts, init_distributed, shard_experts_

    init_distributed()
    model = shard_experts_(_model(quantized))
    kind = ShardedQuantExperts if quantized else ShardedExperts
    sharded = [m for m in model.modules() if isinstance(m, kind)]
    res = _run(model, compile)
    res["experts"] = [(m.first, m.n, m.total, tuple(m.w1.shape)) for m in sharded]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("quantized", [False, True])
def test_two_ranks_with_half_the_experts_each_give_one_rank_s_tokens(tmp_path, quantized):
    torch.set_num_threads(1)
    ref = _run(_model(quantized))
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), quantized), nprocs=2, join=True,
                       start_method="spawn")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    n = _model().args.n_routed_experts
    for r, g in enumerate(got):
        assert g["experts"] and all(e[:3] == [r * n // 2, n // 2, n] and e[3][0] == n // 2 for e in g["experts"])
        assert g["greedy"] == ref["greedy"] and g["sampled"] == ref["sampled"]
        for key in ("logits", "static"):
            a, b = torch.tensor(g[key]), torch.tensor(ref[key])
            assert (a - b).abs().max() <= 1e-4 * b.abs().max(), key
    assert got[0]["logits"] == got[1]["logits"]  # bit for bit: one all-reduce result on both ranks


IDS = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 327, 95, 28, 84, 197, 169]]


def _load_worker(rank, world, port, out, dirs):
    """Each rank loads the checkpoints with ``prepare=shard_experts_`` and records which experts'
    tensors it read."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import re

    import torch.distributed as dist

    import sparseek
    from sparseek.checkpoint import io
    from sparseek.parallel import init_distributed, shard_experts_

    init_distributed()
    reads = []
    plain_get = io._Reader.get
    io._Reader.get = lambda self, name: reads.append(name) or plain_get(self, name)
    res = {}
    for key, (path, quantize) in dirs.items():
        reads.clear()
        model, _ = sparseek.load(path, dtype="float32", quantize=quantize, tokenizer=False, prepare=shard_experts_)
        with torch.no_grad():
            logits = model(torch.tensor(IDS))
        res[key] = {"read": sorted({int(m.group(1)) for n in reads if (m := re.search(r"experts\.(\d+)\.", n))}),
                    "logits": logits.flatten().tolist()}
    with open(os.path.join(out, f"load{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def test_each_rank_reads_only_its_experts_from_a_checkpoint(tmp_path):
    """``sparseek.load(..., prepare=shard_experts_)`` (what torchrun's generate / chat / eval use)
    reads a rank's own experts and no other's, in DeepSeek's per-expert layout, kept FP4 as stored,
    and in transformers' fused layout; each gives the single process's logits."""
    import sparseek
    from sparseek.quant import quantize_model_

    torch.set_num_threads(1)
    model = _model()
    sparseek.save(model, tmp_path / "ours")
    sparseek.save(quantize_model_(_model(), experts="fp4", linears=None), tmp_path / "fp4")
    dirs = {"ours": (str(tmp_path / "ours"), None), "fp4": (str(tmp_path / "fp4"), "stored")}
    try:
        import transformers
        from safetensors.torch import save_file

        hf = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
        os.makedirs(tmp_path / "hf")
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "hf" / "model.safetensors"))
        (tmp_path / "hf" / "config.json").write_text((tmp_path / "ours" / "config.json").read_text())
        dirs["hf"] = (str(tmp_path / "hf"), None)
    except ImportError:
        pass
    ref = {}
    for key, (path, quantize) in dirs.items():
        one, _ = sparseek.load(path, dtype="float32", quantize=quantize, tokenizer=False)
        with torch.no_grad():
            ref[key] = one(torch.tensor(IDS)).flatten()
    mp.start_processes(_load_worker, args=(2, _free_port(), str(tmp_path), dirs), nprocs=2, join=True,
                       start_method="spawn")
    n = model.args.n_routed_experts
    for r in range(2):
        got = json.loads((tmp_path / f"load{r}.json").read_text())
        for key in dirs:
            if key != "hf":  # its experts are one fused tensor per layer, read by slice
                assert got[key]["read"] == list(range(r * n // 2, (r + 1) * n // 2)), (r, key)
            a = torch.tensor(got[key]["logits"])
            assert (a - ref[key]).abs().max() <= 1e-4 * ref[key].abs().max(), (r, key)


@pytest.mark.slow  # ~2.5 min of compiling
def test_compiled_decode_step_with_sharded_experts(tmp_path):
    torch.set_num_threads(1)
    ref = _run(_model())
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), False, True), nprocs=2, join=True,
                       start_method="spawn")
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["greedy"] == [t[:8] for t in ref["greedy"][:2]]


def test_sharding_refuses_what_it_cannot_split(tmp_path):
    """LoRA experts are refused by name; the CLI's generate under torchrun prints once (rank 0)
    what one process prints."""
    import torch.distributed as dist

    from sparseek.parallel import shard_experts_
    from sparseek.model.lora import add_lora

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = add_lora(_model(), rank=2)
        with pytest.raises(ValueError, match="LoRAExperts"):
            shard_experts_(model)
    finally:
        dist.destroy_process_group()
    cmd = ["generate", "--model", "debug", "--prompt", "x = 1", "--max-tokens", "6", "--temperature", "0"]
    one = subprocess.run([sys.executable, "-m", "sparseek.cli", *cmd], capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          f"--master-port={_free_port()}", "-m", "sparseek.cli", *cmd],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and one.stdout.startswith("x = 1")


def _lora_run(model, dirs):
    """Greedy tokens of three prompts, each under another adapter (or none), in one batch."""
    from sparseek.engine import LLM, SamplingParams
    from sparseek.tokenizer import default_tokenizer

    llm = LLM(model, default_tokenizer(512), max_batch_size=3, max_seq_len=256, lora_modules=dirs or None)
    names = ("a", None, "b") if dirs else (None,) * 3
    sp = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, lora=name) for name in names]
    return [o.token_ids for o in llm.generate(PROMPTS, sp)]


def _lora_worker(rank, world, port, out, dirs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from sparseek.parallel import ShardedMultiLoRAExperts, init_distributed, shard_experts_

    init_distributed()
    model = shard_experts_(_model())
    tokens = _lora_run(model, dirs)
    adapted = [(m.first, m.n, tuple(m.A_w1.shape)) for m in model.modules() if isinstance(m, ShardedMultiLoRAExperts)]
    with open(os.path.join(out, f"lora{rank}.json"), "w") as f:
        json.dump({"tokens": tokens, "adapted": adapted}, f)
    dist.destroy_process_group()


def test_lora_adapters_per_request_on_expert_sharded_ranks(tmp_path):
    """Per-request LoRA adapters (on attention and routed experts) served from two ranks that each
    keep half of the experts: each rank holds its experts' share of every adapter, and both give the
    single process's tokens for a batch mixing two adapters and the base model."""
    from tests.model.test_multi_lora import _adapters

    torch.set_num_threads(1)
    dirs = _adapters(_model(), tmp_path, [("a", 4, ("wq_a", "wo_b", "experts")), ("b", 2, ("experts",))])
    ref = _lora_run(_model(), dirs)
    base = _lora_run(_model(), {})
    assert ref[1] == base[1] and ref[0] != base[0] and ref[2] != base[2]  # the adapters change their rows
    mp.start_processes(_lora_worker, args=(2, _free_port(), str(tmp_path), dirs), nprocs=2, join=True,
                       start_method="spawn")
    n = _model().args.n_routed_experts
    for r in range(2):
        got = json.loads((tmp_path / f"lora{r}.json").read_text())
        assert got["tokens"] == ref
        # 3 slots (none, a, b) x this rank's n / 2 experts
        assert got["adapted"] and all(a[:2] == [r * n // 2, n // 2] and a[2][:2] == [3, n // 2] for a in got["adapted"])

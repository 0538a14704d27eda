"""Pretraining loop for V4-style MoE models: one process or many (``torchrun``), exact resume.

Per step: forward (main next-token loss + MTP loss + sequence-wise balance loss), backward,
gradient clipping, Muon/AdamW step, then the aux-loss-free balancing update of every router's
correction bias (outside ``forward``, as DeepSeek does). Logged per step to ``DIR/log.jsonl``:
loss, lr, tokens/s, MFU, MaxVio and per-layer expert load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from sparseek.config import preset
from sparseek.model import build_model
from sparseek.model.common import MoE
from sparseek.model.v4 import indexer_learners
from sparseek.train import checkpoint as ckpt
from sparseek.train.data import STDLIB, TokenDataset, prepare
from sparseek.train.optim import apply_lr, build_optimizer, lr_schedule
from sparseek.utils import peak_memory_bytes

log = logging.getLogger("sparseek")


@dataclass
class TrainConfig:
    preset: str = "nano"
    data: list[str] = field(default_factory=lambda: [STDLIB])
    data_dir: str | None = None  # prepared tokens (default: <out>/data)
    tokenizer: str | None = None  # an existing tokenizer.json to reuse instead of training one
    out: str = "runs/nano"
    overrides: dict = field(default_factory=dict)  # ModelArgs fields changed from the preset
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch (per rank)
    grad_accum: int = 1
    max_steps: int = 150  # the default nano run: ~13 minutes on 2 CPU cores
    optimizer: str = "muon"
    lr: float = 2e-3
    final_lr_ratio: float = 0.1
    warmup: int = 30
    decay_start: float = 0.5  # fraction of max_steps at which the cosine decay begins
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_weight: float = 0.3  # 0.3, then 0.1 once the learning rate decays (DeepSeek-V4 §4.2.2)
    mtp_weight_decayed: float = 0.1
    balance: str = "aux_free"  # "aux_free" (bias update + tiny sequence-wise loss), "aux_loss", "none"
    bias_update_speed: float = 0.01  # gamma (DeepSeek: 0.001 over ~10^5 steps; short runs need faster)
    seq_aux_alpha: float = 0.0001  # alpha of the sequence-wise balance loss
    aux_loss_alpha: float = 0.01  # the classic batch-level balance loss (balance="aux_loss")
    eval_every: int = 50
    eval_batches: int = 16
    ckpt_every: int = 50
    keep_last: int = 2
    log_load_every: int = 10
    seed: int = 0
    val_fraction: float = 0.01
    # train the lightning indexers with a KL loss to the main attention (their own gradients only;
    # without it a model trained from scratch keeps random indexers: docs/experiments/indexer.md)
    indexer_loss: bool = True
    # steps at the start during which CSA attends to every visible entry while the indexer learns
    # over all of them (DeepSeek's dense warm-up of a fresh indexer); needs indexer_loss
    indexer_warmup: int = 0
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the pure-tensor hot spots (v4.compile_hot_paths)
    resume: bool = False
    device: str = "cpu"
    samples: list[str] = field(default_factory=lambda: ["def ", "import os\n", "class "])

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class Trainer:
    def __init__(self, cfg: TrainConfig, rank: int = 0, world_size: int = 1):
        if cfg.balance not in ("aux_free", "aux_loss", "none"):
            raise ValueError(f"balance must be aux_free, aux_loss or none, got {cfg.balance!r}")
        if cfg.indexer_warmup and not cfg.indexer_loss:
            raise ValueError("indexer_warmup trains the indexer densely: it needs indexer_loss")
        self.cfg, self.rank, self.world = cfg, rank, world_size
        from sparseek import resolve_device

        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu":
            from sparseek.utils import tune_malloc

            tune_malloc()
        torch.manual_seed(cfg.seed)
        os.makedirs(cfg.out, exist_ok=True)
        data_dir = cfg.data_dir or os.path.join(cfg.out, "data")
        base = preset(cfg.preset, **cfg.overrides)
        if rank == 0:
            prepare(cfg.data, data_dir, tokenizer=cfg.tokenizer or base.vocab_size, seed=cfg.seed,
                    val_fraction=cfg.val_fraction)
        if world_size > 1:
            torch.distributed.barrier()
        from sparseek.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.from_dir(data_dir)
        self.args = base if base.vocab_size == self.tokenizer.vocab_size else \
            base.replace(vocab_size=self.tokenizer.vocab_size)
        self.train_data = TokenDataset(data_dir, "train", cfg.seq_len)
        self.val_data = TokenDataset(data_dir, "val", cfg.seq_len)
        with torch.device(self.device):
            self.model = build_model(self.args)
        self.model.init_weights(seed=cfg.seed)
        resume_from = self._find_resume() if cfg.resume else None
        if resume_from:
            # the published full weights go in before sharding: parallelize slices them like fresh ones
            from sparseek.checkpoint import load_model

            self.model.load_state_dict(load_model(resume_from, dtype=torch.float32, device=self.device).state_dict())
        self.ep_params = []
        if world_size > 1:
            from sparseek.parallel import expert_parameters, parallelize

            parallelize(self.model)  # every rank built the same weights: now slice experts, shard the rest
            self.ep_params = expert_parameters(self.model)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if cfg.compile:
            from sparseek.model.v4 import compile_hot_paths

            compile_hot_paths()
        self.moes = [m for m in self.model.modules() if isinstance(m, MoE)]
        self.indexed = indexer_learners(self.model)
        indexer_params = {id(p) for a in self.indexed for p in a.indexer.parameters()}
        self.clip_groups = [[p for p in self.model.parameters() if id(p) not in indexer_params]]
        if cfg.indexer_loss and indexer_params:
            self.clip_groups.append([p for p in self.model.parameters() if id(p) in indexer_params])
        self.optimizer = build_optimizer(self.model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.log_path = os.path.join(cfg.out, "log.jsonl")
        self.flops_per_token = training_flops_per_token(self.args, cfg.seq_len)
        self.peak_flops = None
        if resume_from:
            self._resume(resume_from)

    # ------------------------------------------------------------------ state
    def _find_resume(self) -> str | None:
        path = ckpt.latest_checkpoint(self.cfg.out)
        if path is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.cfg.out)
        return path

    def _resume(self, path: str) -> None:
        """Optimizer, RNG and step of this rank (the weights went in before sharding)."""
        state = ckpt.load_trainer_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.world > 1:
            ckpt.restore_sharded_state(self.optimizer)
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step = state["step"]
        # the log keeps only steps that a checkpoint covers: later lines belong to the lost run
        if os.path.exists(self.log_path) and self.rank == 0:
            with open(self.log_path, encoding="utf-8") as f:
                kept = [ln for ln in f if json.loads(ln).get("step", 0) <= self.step]
            with open(self.log_path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> str | None:
        state = None
        if self.world > 1:
            from sparseek.parallel import full_state_dict

            state = full_state_dict(self.model)  # a collective: every rank takes part
        # every rank writes its own optimizer shards and RNG; rank 0 the gathered model
        return ckpt.save_checkpoint(self.cfg.out, self.step, self.model, self.tokenizer, self.optimizer,
                                    {"config": json.dumps(self.cfg.to_json())}, keep_last=self.cfg.keep_last,
                                    state=state)

    # ------------------------------------------------------------------ one step
    def lr_at(self, step: int) -> float:
        c = self.cfg
        return lr_schedule(step, c.warmup, c.max_steps, c.lr, c.lr * c.final_lr_ratio,
                           decay_start=int(c.decay_start * c.max_steps))

    def losses(self, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """Forward one micro-batch: main, MTP and balance losses."""
        c = self.cfg
        # the losses come straight from the heads' inputs: no [tokens, vocab] logits (model/loss.py)
        loss, h = self.model(x, return_hidden=True, targets=y)
        out = {"loss": loss}
        if len(getattr(self.model, "mtp", ())):
            # MTP at position t sees the main streams at t and token t+1, and predicts token t+2
            out["mtp_loss"] = self.model.forward_mtp(h[:, :-1], x[:, 1:], targets=y[:, 1:])
        aux = loss.new_zeros(())
        for moe in self.moes:
            if moe.gate.hash_routed or moe.last_routing is None:
                continue
            idx, scores = moe.last_routing
            if c.balance == "aux_free" and c.seq_aux_alpha:
                aux = aux + c.seq_aux_alpha * balance_loss(idx, scores, moe.gate.n_experts, per_sequence=True)
            elif c.balance == "aux_loss":
                aux = aux + c.aux_loss_alpha * balance_loss(idx, scores, moe.gate.n_experts, per_sequence=False)
        out["aux_loss"] = aux
        if c.indexer_loss and self.indexed:
            out["indexer_loss"] = sum(a.indexer_loss for a in self.indexed if a.indexer_loss is not None)
            aux = aux + out["indexer_loss"]
        mtp_w = c.mtp_weight if step < int(c.decay_start * c.max_steps) else c.mtp_weight_decayed
        out["total"] = out["loss"] + mtp_w * out.get("mtp_loss", 0.0) + aux
        return out

    def train_step(self) -> dict:
        c = self.cfg
        self.model.train()
        for moe in self.moes:
            moe.record_routing = True
        for attn in self.indexed:
            attn.learn_indexer = c.indexer_loss
            attn.attend_all = c.indexer_loss and self.step < c.indexer_warmup
        lr = self.lr_at(self.step)
        apply_lr(self.optimizer, lr)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        loads = [torch.zeros(m.gate.n_experts, device=self.device) for m in self.moes]
        sums: dict[str, float] = {}
        for micro in range(c.grad_accum):
            x, y = self.train_data.batch(self.step * c.grad_accum + micro, c.batch_size, seed=c.seed,
                                         rank=self.rank, world_size=self.world)
            x, y = x.to(self.device), y.to(self.device)
            # bf16 autocast on GPUs; the model keeps its fp32 islands (norms, mHC, router, compressor)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                parts = self.losses(x, y, self.step)
            (parts["total"] / c.grad_accum).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) / c.grad_accum
            for load, moe in zip(loads, self.moes):
                idx = moe.last_routing[0]
                load += torch.bincount(idx.flatten(), minlength=moe.gate.n_experts).float()
        if self.world > 1:
            self._sync(loads, sums)
        # the indexers' gradients (their own KL loss) are clipped on their own, so their size never
        # scales the model's update
        gnorm, *_ = [self._clip(group) for group in self.clip_groups]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if c.balance == "aux_free":
            update_bias(self.moes, loads, c.bias_update_speed)
        for moe in self.moes:
            moe.last_routing = None
        for attn in self.indexed:
            attn.learn_indexer, attn.attend_all, attn.indexer_loss = False, False, None
        self.step += 1
        dt = time.perf_counter() - t0
        tokens = c.batch_size * c.grad_accum * c.seq_len * self.world
        vio = [max_violation(load) for load, m in zip(loads, self.moes) if not m.gate.hash_routed]
        rec = {"step": self.step, "loss": sums["loss"], "mtp_loss": sums.get("mtp_loss"), "aux_loss": sums["aux_loss"],
               "indexer_loss": sums.get("indexer_loss"),
               "lr": lr, "grad_norm": float(gnorm), "tokens_per_s": tokens / dt, "step_time": dt,
               "max_vio": max(vio) if vio else 0.0, "mean_vio": sum(vio) / len(vio) if vio else 0.0}
        if self.peak_flops:
            rec["mfu"] = self.flops_per_token * tokens / dt / (self.peak_flops * self.world)
        rec["mem_gb"] = peak_memory_bytes(self.device) / 2**30  # this step's on a GPU (reset above)
        if c.log_load_every and self.step % c.log_load_every == 0:
            rec["expert_load"] = [(load / load.sum()).tolist() for load in loads]
        return rec

    def _sync(self, loads, sums) -> None:
        """Across ranks: FSDP already averaged the dense gradients; expert gradients arrived summed
        over every rank's tokens (through the all-to-all), so they are divided by the world size;
        expert loads and the logged losses are summed / averaged."""
        import torch.distributed as dist

        for p in self.ep_params:
            if p.grad is not None:
                p.grad /= self.world
        for load in loads:
            dist.all_reduce(load)
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], device=self.device)
        dist.all_reduce(t)
        for k, v in zip(keys, t.tolist()):
            sums[k] = v / self.world

    def _clip(self, params: list) -> torch.Tensor:
        if self.world > 1:
            from sparseek.parallel import clip_grad_norm_

            return clip_grad_norm_(params, self.cfg.grad_clip, self.device)
        return torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        for moe in self.moes:
            moe.record_routing = False
        total, n = 0.0, 0
        for i, (x, y) in enumerate(self.val_data.iter_eval(self.cfg.batch_size)):
            if i >= self.cfg.eval_batches:
                break
            total += float(self.model(x.to(self.device), targets=y.to(self.device))) * x.shape[0]
            n += x.shape[0]
        val = total / max(n, 1)
        uni = self.val_data.unigram_loss() if hasattr(self.val_data, "unigram_loss") else float("nan")
        return {"step": self.step, "val_loss": val, "val_ppl": math.exp(val), "unigram_ppl": math.exp(uni)}

    # ------------------------------------------------------------------ the run
    def fit(self, progress: bool = True) -> dict:
        c = self.cfg
        if self.rank == 0:
            with open(os.path.join(c.out, "train_config.json"), "w", encoding="utf-8") as f:
                json.dump(c.to_json(), f, indent=2)
        self.peak_flops = measure_peak_flops(self.device)
        bar = None
        if progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=c.max_steps, initial=self.step, desc="train", unit="step")
        last_eval = {}
        while self.step < c.max_steps:
            rec = self.train_step()
            if c.eval_every and (self.step % c.eval_every == 0 or self.step == c.max_steps):
                last_eval = self.evaluate()
                rec.update({k: v for k, v in last_eval.items() if k != "step"})
            self._log(rec)
            if bar:
                bar.update()
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                vio=f"{rec['max_vio']:.2f}", mem=f"{rec['mem_gb']:.1f}G")
            if c.ckpt_every and self.step % c.ckpt_every == 0 and self.step < c.max_steps:
                self.save()
        if bar:
            bar.close()
        path = self.save()
        return {"checkpoint": path, **last_eval}

    def _log(self, rec: dict) -> None:
        if self.rank != 0:
            return
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them."""
    from torch.utils.checkpoint import checkpoint

    for block in list(model.layers) + list(getattr(model, "mtp", [])):
        inner = block.forward
        block.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)


# ---------------------------------------------------------------------------- balancing
def balance_loss(idx_BTK: torch.Tensor, scores_BTE: torch.Tensor, n_experts: int, per_sequence: bool) -> torch.Tensor:
    """L = sum_i f_i * P_i (DeepSeek-V3 eq. 17-20): f_i the (scaled) fraction of tokens routed to i,
    P_i the mean normalized affinity. Per sequence (V3/V4's "sequence-wise" loss) or over the batch."""
    B, T, K = idx_BTK.shape
    if not per_sequence:
        idx_BTK, scores_BTE = idx_BTK.reshape(1, B * T, K), scores_BTE.reshape(1, B * T, -1)
        B, T = 1, B * T
    counts = torch.zeros(B, n_experts, device=idx_BTK.device).scatter_add_(
        1, idx_BTK.reshape(B, -1), torch.ones(B, T * K, device=idx_BTK.device))
    f = counts * n_experts / (K * T)
    p = (scores_BTE / scores_BTE.sum(-1, keepdim=True).clamp(min=1e-20)).mean(dim=1)
    return (f * p).sum(-1).mean()


@torch.no_grad()
def update_bias(moes: list[MoE], loads: list[torch.Tensor], speed: float) -> None:
    """Aux-loss-free balancing: raise the bias of under-loaded experts, lower the over-loaded."""
    for moe, load in zip(moes, loads):
        if moe.gate.bias is not None:
            moe.gate.bias += speed * torch.sign(load.mean() - load)


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean load - 1 (0 = perfectly balanced)."""
    mean = float(load.mean())
    return float(load.max()) / mean - 1.0 if mean > 0 else 0.0


# ---------------------------------------------------------------------------- FLOPs
def training_flops_per_token(args, seq_len: int) -> float:
    """Forward+backward FLOPs per token: 6 x active matmul parameters + attention score/value work."""
    from sparseek.config import CSA_RATIO

    with torch.device("meta"):
        counts = build_model(args).param_counts()
    matmul = counts["active"] + args.hidden_size * args.vocab_size  # + head (embedding lookups are free)
    attn = 0.0
    if args.is_v4:
        for i in range(args.num_hidden_layers):
            keys = min(args.sliding_window, seq_len) / (2 if seq_len <= args.sliding_window else 1)
            m = args.compress_ratio(i)
            if m == CSA_RATIO:
                keys += min(args.index_topk, seq_len / m / 2)
                attn += 2 * args.index_n_heads * args.index_head_dim * seq_len / m / 2  # indexer scores
            elif m:
                keys += seq_len / m / 2
            attn += 4 * args.num_attention_heads * args.head_dim * keys
    else:
        attn = args.num_hidden_layers * 4 * args.num_attention_heads * args.qk_head_dim * seq_len / 2
    return 3 * (2 * matmul + attn)


def measure_peak_flops(device: torch.device, seconds: float = 0.3) -> float:
    """Achievable matmul FLOP/s on this device (the denominator of MFU)."""
    n = 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    t0, k = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        k += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * k / (time.perf_counter() - t0)


def sample_text(model: nn.Module, tokenizer, prompts: list[str], max_tokens: int = 48) -> list[str]:
    from sparseek.engine import LLM, SamplingParams

    llm = LLM(model, tokenizer, max_batch_size=len(prompts), max_seq_len=512)
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.95, seed=0))
    return [p + o.text for p, o in zip(prompts, outs)]

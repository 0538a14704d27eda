"""Supervised fine-tuning on chat-format JSONL, with the loss on assistant tokens only.

Each line is ``{"messages": [...]}`` (OpenAI-style roles, optional ``reasoning_content`` and
``tool_calls`` on assistant turns) and optionally ``"thinking": true``. Conversations are rendered
with DeepSeek-V4's chat format; the trained tokens are exactly what the model would generate in
each assistant turn (reasoning when present, the answer, tool calls, and the closing EOS), found
from character offsets of the rendered text, so every prompt token (system, user, tool results,
the ``<｜Assistant｜>`` transition) is masked.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field

import torch

from sparseek.model.loss import IGNORE_INDEX
from sparseek.tokenizer.chat import ASSISTANT, EOS, THINK_END, THINK_START, encode_messages
from sparseek.tokenizer.template import render_chat_template
from sparseek.train.optim import apply_lr, build_optimizer, lr_schedule

IGNORE = IGNORE_INDEX  # labels of the tokens the loss does not count (the prompt, padding)


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of what each assistant turn generates (EOS included)."""
    spans = []
    for m in re.finditer(re.escape(ASSISTANT), text):
        start = m.end()
        for marker in (THINK_START, THINK_END):  # the mode marker belongs to the prompt
            if text.startswith(marker, start):
                start += len(marker)
                break
        end = text.find(EOS, start)
        if end == -1:
            continue  # an open generation prompt: nothing to learn
        spans.append((start, end + len(EOS)))
    return spans


def encode_example(tokenizer, messages: list[dict], thinking: bool = False, max_len: int | None = None
                   ) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE outside assistant turns) of one conversation, in the
    checkpoint's own chat template where it has one (a fine-tune of R1 keeps R1's format), else
    DeepSeek-V4's."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        text = render_chat_template(template, messages, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                                    add_generation_prompt=False, thinking=thinking)
    else:
        text = encode_messages(messages, thinking_mode="thinking" if thinking else "chat", drop_thinking=False)
    enc = tokenizer.tk.encode(text, add_special_tokens=False)
    spans = assistant_spans(text)
    labels = []
    for tok, (a, b) in zip(enc.ids, enc.offsets):
        inside = any(s <= a and b <= e for s, e in spans)
        labels.append(tok if inside else IGNORE)
    ids = enc.ids
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return ids, labels


def load_chat_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
                raise ValueError(f"{path}:{i + 1}: expected an object with a 'messages' list")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no conversations")
    return rows


@dataclass
class SFTConfig:
    data: str = ""
    out: str = "runs/sft"
    max_len: int = 1024
    batch_size: int = 4
    max_steps: int = 200
    lr: float = 1e-4
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    seed: int = 0
    base: str | None = None  # the base model's directory or preset, recorded in the adapters' config
    extra: dict = field(default_factory=dict)


def batches(examples: list[tuple[list[int], list[int]]], batch_size: int, step: int, seed: int, pad_id: int):
    """Batch ``step`` of a seeded shuffle of the examples, right-padded (labels IGNORE on padding)."""
    n = len(examples)
    epoch, k = divmod(step * batch_size, n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    pick = [examples[order[(k + i) % n]] for i in range(batch_size)]
    T = max(len(ids) for ids, _ in pick)
    x = torch.full((batch_size, T), pad_id, dtype=torch.long)
    y = torch.full((batch_size, T), IGNORE, dtype=torch.long)
    for r, (ids, labels) in enumerate(pick):
        x[r, :len(ids)] = torch.tensor(ids)
        y[r, :len(labels) - 1] = torch.tensor(labels[1:])  # predict the next token
    return x, y


def sft_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, targets=y)  # IGNORE (-100) positions are not counted


def finetune(model, tokenizer, cfg: SFTConfig, log=print) -> dict:
    """Fine-tune ``model`` in place (full or LoRA); writes the result to ``cfg.out``."""
    from sparseek.checkpoint import save_model
    from sparseek.checkpoint.io import side_file
    from sparseek.checkpoint.adapters import save_adapters
    from sparseek.model.lora import add_lora, count_trainable

    torch.manual_seed(cfg.seed)
    rows = load_chat_jsonl(cfg.data)
    examples = [encode_example(tokenizer, r["messages"], bool(r.get("thinking")), cfg.max_len) for r in rows]
    examples = [e for e in examples if any(t != IGNORE for t in e[1])]
    if not examples:
        raise ValueError(f"{cfg.data}: no conversation has an assistant turn to learn from")
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    model.train()
    opt = build_optimizer(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-8)
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    os.makedirs(cfg.out, exist_ok=True)
    history = []
    t0 = time.perf_counter()
    for step in range(cfg.max_steps):
        apply_lr(opt, lr_schedule(step, cfg.warmup, cfg.max_steps, cfg.lr, cfg.lr * 0.1))
        x, y = batches(examples, cfg.batch_size, step, cfg.seed, pad)
        loss = sft_loss(model, x.to(model.embed.weight.device), y.to(model.embed.weight.device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(float(loss.detach()))
        if step % 10 == 0 or step == cfg.max_steps - 1:
            log(json.dumps({"step": step + 1, "loss": history[-1]}))
    model.eval()
    if cfg.lora_rank:
        save_adapters(model, cfg.out, base=cfg.base, tokenizer=tokenizer)
    else:
        gen = side_file(cfg.base, "generation_config.json")
        save_model(model, cfg.out, tokenizer=tokenizer, extra_files=[gen] if gen else [])
    return {"losses": history, "trainable": count_trainable(model), "seconds": time.perf_counter() - t0,
            "examples": len(examples), "out": cfg.out, "final_loss": history[-1] if history else math.nan}

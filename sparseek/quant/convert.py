"""``sparseek quantize``: write a checkpoint in DeepSeek's FP8 / FP4 layout, and say what it cost.

The quality report compares the quantized model with the original on the same tokens, as
llama.cpp's ``perplexity --kl-divergence`` does: per-token KL divergence of the quantized model's
next-token distribution from the original's (mean, median, 99th percentile, max), how often their
top-1 tokens agree, and both perplexities. Quantization that produces "gibberish" shows up here
before a user sees it.
"""

from __future__ import annotations

import json
import logging
import os
import time

import torch
import torch.nn.functional as F

log = logging.getLogger("sparseek")


def eval_windows(tokenizer, vocab_size: int, sources=None, windows: int = 4, seq_len: int = 256,
                 seed: int = 0) -> tuple[list[torch.Tensor], str]:
    """Token windows to compare the models on, and where they came from: text from ``sources``
    (default: the Python standard library, the embedded corpus) when there is a tokenizer, else
    random token ids (the comparison between the two models still holds; perplexities do not
    mean anything then)."""
    need = windows * seq_len
    if tokenizer is not None:
        from sparseek.train.data import iter_texts

        ids: list[int] = []
        for text in iter_texts(sources or "stdlib"):
            ids.extend(tokenizer.encode(text))
            if len(ids) >= need:
                break
        if len(ids) >= need:
            return [torch.tensor(ids[i * seq_len:(i + 1) * seq_len]) for i in range(windows)], \
                f"text ({sources or 'stdlib'})"
        log.warning("the evaluation text has %d tokens, fewer than %d: comparing on random tokens", len(ids), need)
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (seq_len,), generator=g) for _ in range(windows)], "random tokens"


@torch.no_grad()
def next_token_logprobs(model, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [F.log_softmax(model(w[None].to(device))[0].float(), dim=-1).cpu() for w in windows]


def compare(ref: list[torch.Tensor], quant: list[torch.Tensor], windows: list[torch.Tensor]) -> dict:
    """KL(ref || quant) per predicted token, top-1 agreement and both perplexities."""
    kl, agree, nll_ref, nll_q = [], [], [], []
    for lr, lq, w in zip(ref, quant, windows):
        lr, lq, target = lr[:-1], lq[:-1], w[1:]
        kl.append((lr.exp() * (lr - lq)).sum(-1))
        agree.append(lr.argmax(-1) == lq.argmax(-1))
        nll_ref.append(-lr.gather(-1, target[:, None])[:, 0])
        nll_q.append(-lq.gather(-1, target[:, None])[:, 0])
    kl_t = torch.cat(kl).clamp(min=0)  # rounding can make a near-zero KL slightly negative
    ppl_ref, ppl_q = torch.cat(nll_ref).mean().exp().item(), torch.cat(nll_q).mean().exp().item()
    return {"tokens": kl_t.numel(), "kl_mean": kl_t.mean().item(), "kl_median": kl_t.median().item(),
            "kl_p99": torch.quantile(kl_t, 0.99).item(), "kl_max": kl_t.max().item(),
            "top1_agreement": torch.cat(agree).float().mean().item(), "ppl_ref": ppl_ref, "ppl_quant": ppl_q,
            "ppl_ratio": ppl_q / ppl_ref}


def files_bytes(path: str) -> int | None:
    """Bytes of a checkpoint's safetensors files (None: not a directory, e.g. a preset)."""
    if not os.path.isdir(path):
        return None
    from sparseek.checkpoint.io import tensor_files

    return sum(os.path.getsize(f) for f in set(tensor_files(path).values()))


def quantize_checkpoint(src: str, dst: str, experts: str | None = "fp4", linears: str | None = "fp8",
                        scale_fmt: str | None = None, report: bool = True, sources=None, windows: int = 4,
                        seq_len: int = 256, device: str = "cpu", act_fp8: bool = False) -> dict:
    """Quantize the checkpoint (or preset) ``src`` into ``dst`` (config, tokenizer, safetensors) and
    return what happened: sizes before and after and, with ``report``, the quality comparison
    (also written to ``dst/quantization_report.json``).

    The model is held in memory once: the original's log-probabilities are computed first, then
    its layers are swapped for quantized ones in place. Without ``report`` it loads in the
    checkpoint's own dtype, memory-mapped (nothing computes with it), so a bf16 checkpoint costs
    little more memory than its quantized copy. With ``act_fp8`` the quantized model is measured
    as DeepSeek's runtime runs it, its GEMMs' inputs rounded to FP8 (``sparseek.model.qat``); the
    checkpoint written is the same."""
    import sparseek
    from sparseek.checkpoint.io import save_model, side_file
    from sparseek.quant.modules import default_scale_format, quantize_model_, quantized_bytes

    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"quantize writes a new checkpoint: the output {dst!r} is the input")
    t0 = time.perf_counter()
    dtype = None
    if not report and os.path.isdir(src):
        from sparseek.config import ModelArgs

        stored = str(ModelArgs.from_json(src).extra.get("torch_dtype", "bfloat16"))
        dtype = sparseek.resolve_dtype(stored) if stored in ("float32", "bfloat16", "float16") else None
    model, tok = sparseek.load(src, device=device, dtype=dtype)
    before = sum(quantized_bytes(model))
    out: dict = {"source": src, "experts": experts, "linears": linears}
    if report:
        wins, origin = eval_windows(tok, model.args.vocab_size, sources, windows, seq_len)
        ref = next_token_logprobs(model, wins)
    quantize_model_(model, experts=experts, linears=linears, scale_fmt=scale_fmt)
    out.update(bytes_before=before, bytes_after=sum(quantized_bytes(model)))
    if report:
        from sparseek.model.qat import set_act_fp8_

        act = (scale_fmt or default_scale_format(model)) if act_fp8 else None
        set_act_fp8_(model, act)
        out["report"] = {"data": origin, "act_fp8": act, **compare(ref, next_token_logprobs(model, wins), wins)}
        set_act_fp8_(model, model.args.act_scale_fmt)
    gen = side_file(src, "generation_config.json")  # the recommended sampling stays with the model
    save_model(model, dst, tokenizer=tok, extra_files=[gen] if gen else [])
    out.update(disk_bytes_before=files_bytes(src), disk_bytes_after=files_bytes(dst))
    if report:
        with open(os.path.join(dst, "quantization_report.json"), "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    out["seconds"] = time.perf_counter() - t0
    return out


def export_gguf(src: str, dst: str, qtype: str = "q8_0", lora=None, report: bool = True, sources=None,
                windows: int = 4, seq_len: int = 256, split_max_bytes: int | None = None, mtp: bool = False) -> dict:
    """``sparseek export-gguf``: write the DeepSeek checkpoint (or preset) ``src`` as the GGUF file
    ``dst`` for llama.cpp (V4 as ``deepseek4``, V2 / V3 / R1 as ``deepseek2``), and with ``report`` read the file back and compare it with the
    original on the same tokens (what llama.cpp's users would see of the quantization). A checkpoint
    in DeepSeek's FP8 / FP4 layout is exported from its stored bytes, decoded one tensor at a time."""
    import sparseek
    from sparseek.checkpoint.gguf import load_gguf, save_gguf

    t0 = time.perf_counter()
    # DeepSeek's FP8 / FP4 weights stay as stored and are decoded one tensor at a time while the
    # file is written; without a report, the rest stays in the checkpoint's dtype (nothing computes)
    dtype, quantize = "float32", None
    if os.path.isfile(os.path.join(str(src), "config.json")) and not lora:
        from sparseek.config import ModelArgs

        stored = ModelArgs.from_json(src)
        if stored.extra.get("quantization_config"):
            quantize = "stored"
        if not report:
            dtype = str(stored.extra.get("torch_dtype", "bfloat16"))
            dtype = dtype if dtype in ("float32", "bfloat16", "float16") else "bfloat16"
    model, tok = sparseek.load(src, dtype=dtype, lora=lora, quantize=quantize)
    out: dict = {"source": src, "type": qtype}
    if report:
        wins, origin = eval_windows(tok, model.args.vocab_size, sources, windows, seq_len)
        ref = next_token_logprobs(model, wins)
    res = save_gguf(model, dst, tokenizer=tok, qtype=qtype, split_max_bytes=split_max_bytes, mtp=mtp)
    out.update(files=res["files"], disk_bytes=sum(os.path.getsize(f) for f in res["files"]),
               types={t: sum(1 for v in res["types"].values() if v == t) for t in sorted(set(res["types"].values()))})
    if report:
        del model
        back = load_gguf(res["files"][0], dtype=torch.float32, mtp=False).eval()
        out["report"] = {"data": origin, **compare(ref, next_token_logprobs(back, wins), wins)}
    out["seconds"] = time.perf_counter() - t0
    return out

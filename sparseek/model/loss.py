"""Cross-entropy of the LM head without its logits tensor.

A training forward's logits are [tokens, vocab] in fp32, and autograd keeps them or their
log-softmax for backward: at V4's 129,280-token vocabulary and 8,192 tokens a step that is 4.2 GB
per copy, with the MTP head's loss a second set beside it (several copies each: the head's
output, its fp32 cast, the log-softmax, their gradients). ``linear_cross_entropy`` runs the head
and the loss over a few rows at a time and computes the gradients of both inputs in the same
pass (the logits' gradient is softmax - one-hot, known as soon as the row's softmax is), so no
[tokens, vocab] tensor ever exists and backward only scales what forward left. The idea is
Liger-Kernel's fused linear cross-entropy; here it is plain PyTorch.

The rounding is the unfused path's: logits from the head's product in the compute dtype (the
autocast dtype when autocast is on), then fp32 for the log-softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparseek.model.common import Linear

IGNORE_INDEX = -100

# fp32 logits per chunk: on a CPU under glibc's raised mmap threshold (``tune_malloc``, 32 MiB), so
# the chunks' buffers are reused from the heap instead of page-faulted in anew; on a GPU big
# enough that a chunk's products run at full speed (~2,000 rows at V4's vocabulary)
CHUNK_BYTES = {"cpu": 16 << 20}
CHUNK_BYTES_GPU = 1 << 30


def skip_ignored(device: torch.device) -> bool:
    """Whether to drop the ignored rows before the head's products: it needs their count on the
    host, a free question on a CPU but a stall of a GPU's queue, which then multiplies them too."""
    return device.type == "cpu"


def chunk_rows(vocab: int, device: torch.device) -> int:
    return max(1, CHUNK_BYTES.get(device.type, CHUNK_BYTES_GPU) // (4 * vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, y_N, ignore_index: int, rows: int, cdt: torch.dtype):
        grad_h, grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        hc_ND, wc_VD = h_ND.to(cdt), w_VD.to(cdt)
        valid_N = y_N != ignore_index
        count = valid_N.sum()
        kept_N = None
        if skip_ignored(h_ND.device) and int(count) < y_N.shape[0]:  # SFT: prompts and padding cost nothing
            kept_N = valid_N.nonzero().squeeze(1)
            hc_ND, y_N, valid_N = hc_ND[kept_N], y_N[kept_N], valid_N[kept_N]
        N = hc_ND.shape[0]
        dh = torch.empty(hc_ND.shape, dtype=h_ND.dtype, device=h_ND.device) if grad_h else None
        dw = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if grad_w else None
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        for i in range(0, N, rows):
            h_nD, y_n, v_n = hc_ND[i:i + rows], y_N[i:i + rows], valid_N[i:i + rows]
            logits = (h_nD @ wc_VD.t()).float()
            lse_n = torch.logsumexp(logits, dim=-1)
            picked = y_n.clamp(min=0)[:, None]
            total += ((lse_n - logits.gather(1, picked).squeeze(1)) * v_n).sum()
            if not (grad_h or grad_w):
                continue
            # d(loss_sum)/d(logits) = softmax - one-hot on counted rows, 0 on ignored ones (in place)
            g = logits.sub_(lse_n[:, None]).exp_()
            g.scatter_add_(1, picked, -torch.ones_like(picked, dtype=g.dtype))
            g.mul_(v_n[:, None])
            g = g.to(cdt)
            if grad_h:
                dh[i:i + rows] = g @ wc_VD
            if grad_w:
                if cdt == torch.float32:
                    dw.addmm_(g.t(), h_nD)
                else:
                    dw += (g.t() @ h_nD).float()
        if kept_N is not None and grad_h:
            dh = torch.zeros_like(h_ND).index_copy_(0, kept_N, dh)
        scale = 1.0 / count.clamp(min=1).float()
        ctx.save_for_backward(*(t * scale.to(t.dtype) if t is not None else torch.empty(0)
                                for t in (dh, dw)))
        ctx.w_dtype = w_VD.dtype
        return total / count  # nan when every row is ignored, as F.cross_entropy's mean

    @staticmethod
    def backward(ctx, go):
        dh, dw = ctx.saved_tensors
        gh = dh * go.to(dh.dtype) if ctx.needs_input_grad[0] else None
        gw = (dw * go).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, rows: int | None = None) -> torch.Tensor:
    """``F.cross_entropy((h @ weight.T).float(), targets, ignore_index=...)`` (the mean over the
    counted rows) without materializing the logits: ``rows`` of them at a time (default: 16 MB of
    fp32 logits on a CPU, 1 GB on a GPU), the gradients of ``h`` and ``weight`` computed on the way
    and kept (one ``h``-sized and one fp32 ``weight``-sized tensor) for backward."""
    dev = h_ND.device
    cdt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else \
        torch.promote_types(h_ND.dtype, weight_VD.dtype)
    rows = rows or chunk_rows(weight_VD.shape[0], dev)
    with torch.autocast(dev.type, enabled=False):
        return _LinearCrossEntropy.apply(h_ND, weight_VD, targets_N, ignore_index, rows, cdt)


def fusable(head: nn.Module) -> bool:
    """Whether ``head`` computes exactly ``h @ weight.T`` (no bias, adapter, fake quantization or
    hook between), so its loss may skip the module."""
    return (type(head) in (Linear, nn.Linear) and head.bias is None and isinstance(head.weight, torch.Tensor)
            and not (head._forward_hooks or head._forward_pre_hooks))


def head_loss(head: nn.Module, h_BTD: torch.Tensor, targets_BT: torch.Tensor,
              ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of ``head(h)`` against ``targets`` (``ignore_index`` rows not counted):
    fused (``linear_cross_entropy``) where the head allows, through the logits otherwise."""
    if h_BTD.shape[:-1] != targets_BT.shape:
        raise ValueError(f"targets have shape {tuple(targets_BT.shape)}, the positions scored "
                         f"{tuple(h_BTD.shape[:-1])}")
    h_ND, y_N = h_BTD.flatten(0, -2), targets_BT.flatten().long()
    if skip_ignored(y_N.device):  # a free check where the host holds the targets (a GPU would stall)
        V = head.weight.shape[0] if hasattr(head, "weight") else None
        bad = ((y_N < 0) & (y_N != ignore_index)) | ((y_N >= V) if V else False)
        if bool(bad.any()):
            raise ValueError(f"targets must be token ids in [0, {V}) or {ignore_index} (not counted), "
                             f"got {int(y_N[bad][0])}")
    if fusable(head):
        return linear_cross_entropy(h_ND, head.weight, y_N, ignore_index)
    return F.cross_entropy(head(h_ND).float(), y_N, ignore_index=ignore_index)

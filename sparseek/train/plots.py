"""Plots of a training run, drawn from its ``log.jsonl``: loss curves and expert load over time."""

from __future__ import annotations

import json
import os


def read_log(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str) -> list[str]:
    """Write ``loss.png`` (losses, MaxVio, the indexers' KL when logged) and ``expert_load.png``
    next to the log; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    recs = read_log(os.path.join(run_dir, "log.jsonl"))
    if not recs:
        return []
    written = []
    indexer = [(r["step"], r["indexer_loss"]) for r in recs if r.get("indexer_loss") is not None]
    fig, axes = plt.subplots(1, 3 if indexer else 2, figsize=(16 if indexer else 11, 4))
    ax1, ax2 = axes[:2]
    steps = [r["step"] for r in recs]
    ax1.plot(steps, [r["loss"] for r in recs], label="train loss", lw=1)
    if any(r.get("mtp_loss") is not None for r in recs):
        ax1.plot(steps, [r.get("mtp_loss") for r in recs], label="MTP loss", lw=1, alpha=0.7)
    ev = [r for r in recs if "val_loss" in r]
    if ev:
        ax1.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", label="val loss")
        ax1.axhline(np.log(ev[-1]["unigram_ppl"]), ls="--", c="gray", label="unigram baseline")
    ax1.set_xlabel("step")
    ax1.set_ylabel("nats / token")
    ax1.legend()
    ax1.set_title("loss")
    ax2.plot(steps, [r["max_vio"] for r in recs], lw=1, label="max over layers")
    ax2.plot(steps, [r["mean_vio"] for r in recs], lw=1, label="mean over layers")
    ax2.set_xlabel("step")
    ax2.set_ylabel("MaxVio")
    ax2.set_title("load imbalance (MaxVio)")
    ax2.legend()
    if indexer:  # how far the lightning indexers' picks are from where the attention looks
        axes[2].plot(*zip(*indexer), lw=1)
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("KL, summed over CSA layers")
        axes[2].set_title("lightning indexer loss")
    fig.tight_layout()
    p = os.path.join(run_dir, "loss.png")
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)

    loads = [(r["step"], r["expert_load"]) for r in recs if "expert_load" in r]
    if loads:
        n_layers = len(loads[0][1])
        fig, axes = plt.subplots(1, n_layers, figsize=(2.6 * n_layers, 3.6), squeeze=False)
        for li in range(n_layers):
            mat = np.array([ld[li] for _, ld in loads]).T  # experts x time
            ax = axes[0, li]
            im = ax.imshow(mat * mat.shape[0], aspect="auto", cmap="viridis", vmin=0, vmax=3,
                           extent=[loads[0][0], loads[-1][0], mat.shape[0] - 0.5, -0.5])
            ax.set_title(f"MoE layer {li}")
            ax.set_xlabel("step")
            if li == 0:
                ax.set_ylabel("expert")
        fig.colorbar(im, ax=axes.ravel().tolist(), label="load / uniform")
        p = os.path.join(run_dir, "expert_load.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written

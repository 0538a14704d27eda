"""Does training the lightning indexer help? nano preset, sequences long enough that CSA must pick.

    python experiments/indexer.py --steps 120 --out docs/experiments

CSA layers attend to the window plus the ``index_topk`` compressed entries the lightning indexer
picks. Its picks are indices, so no gradient of the language-model loss reaches it: without its own
loss (``TrainConfig.indexer_loss``, a KL to the main attention's mass on the compressed entries) a
model trained from scratch keeps a random indexer. Runs (same data, order and seed):

  random   the indexer is never trained (picks by random projections)
  trained  the indexer learns from its KL loss (its inputs detached: the model's gradients are those
           of ``random``'s loss on the same picks)
  warmup   as trained, after a dense warm-up (DeepSeek's): for the first fifth of the steps CSA
           attends to every visible entry and the indexer learns over all of them, then to its picks
  dense    top-k larger than any sequence's entry count: CSA attends to every visible entry (what
           perfect picks could at most give back)

Sequences are 1,024 tokens: up to 256 compressed entries per CSA layer, 64 picked (a quarter).
For each finished model, on held-out sequences:

  * validation loss with the model's picks and with every entry attended (the gap is what the
    sparsity costs that model),
  * recall of the picks: the share of the main attention's compressed-entry mass (every visible
    entry attended) that the indexer's top-k holds, next to a uniformly random top-k's and the best
    possible top-k's (the k heaviest entries), over queries that see more than k entries,
  * the indexer's KL to the attention mass.

Writes docs/experiments/indexer.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

RUNS = {
    "random": {},
    "trained": {"indexer_loss": True},
    "warmup": {"indexer_loss": True, "warmup_fraction": 0.2},
    "dense": {"overrides": {"index_topk": 1 << 20}},
}


def train(name: str, steps: int, work: str, batch: int, seq: int, data_dir: str):
    from sparseek.train.trainer import TrainConfig, Trainer

    spec = RUNS[name]
    cfg = TrainConfig(out=os.path.join(work, name), max_steps=steps, batch_size=batch, seq_len=seq,
                      eval_every=max(steps // 4, 1), eval_batches=8, ckpt_every=0, keep_last=1,
                      warmup=max(steps // 20, 1), data_dir=data_dir, indexer_loss=spec.get("indexer_loss", False),
                      indexer_warmup=int(spec.get("warmup_fraction", 0) * steps),
                      overrides=spec.get("overrides", {}), samples=[])
    t0 = time.time()
    trainer = Trainer(cfg)
    trainer.fit(progress=False)
    return trainer, time.time() - t0


def measure(trainer, batches: int, topk: int) -> dict:
    """Validation loss with the model's picks and with every entry, recall of the picks, KL."""
    import torch
    import torch.nn.functional as F

    from sparseek.model import v4

    model = trainer.model.eval()
    attns = [m for m in model.modules() if isinstance(m, v4.Attention) and m.indexer is not None]
    data = [(x, y) for (x, y), _ in zip(trainer.val_data.iter_eval(trainer.cfg.batch_size), range(batches))]

    def val_loss() -> float:
        with torch.no_grad():
            losses = [float(F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())) for x, y in data]
        return sum(losses) / len(losses)

    for a in attns:
        a.indexer.topk = topk
    sparse = val_loss()
    for a in attns:
        a.indexer.topk = 1 << 20
    dense = val_loss()

    # every entry attended: the attention mass over all visible entries is the target; score the
    # indexer's top-k of it
    stats = {"indexer": 0.0, "random": 0.0, "best": 0.0, "rows": 0, "kl": 0.0, "kl_rows": 0}
    original = v4.Attention._indexer_kl

    def spy(self, q, lse, comp, comp_mask, idx, qI, wI, keys_I, n_real, picks=None):
        target, rows = self.attention_mass(q, lse, comp, comp_mask, idx, n_real)
        seen = comp_mask.expand(q.shape[0], -1, -1, -1)
        logits = v4.Indexer.scores(qI.flatten(1, 2), wI.flatten(1, 2), keys_I[:, :seen.shape[-1]]).view(seen.shape)
        logits = logits.masked_fill(~seen, float("-inf"))
        n_vis = seen.sum(-1)
        many = rows & (n_vis > topk)
        k = min(topk, seen.shape[-1])
        picked = target.gather(-1, logits.topk(k, dim=-1).indices).sum(-1)
        best = target.topk(k, dim=-1).values.sum(-1)
        stats["indexer"] += float(picked[many].sum())
        stats["best"] += float(best[many].sum())
        stats["random"] += float((topk / n_vis[many].float()).sum())
        stats["rows"] += int(many.sum())
        kl, n = original(self, q, lse, comp, comp_mask, idx, qI, wI, keys_I, n_real, picks)
        stats["kl"] += float(kl.detach())
        stats["kl_rows"] += int(n)
        return kl, n

    v4.Attention._indexer_kl = spy
    try:
        for a in attns:
            a.learn_indexer = True
        with torch.enable_grad():  # the KL path runs in training forwards only
            for x, _ in data:
                model(x)
    finally:
        v4.Attention._indexer_kl = original
        for a in attns:
            a.learn_indexer, a.indexer.topk, a.indexer_loss = False, topk, None
    rows = max(stats["rows"], 1)
    return {"val_loss_picks": sparse, "val_loss_all_entries": dense, "sparsity_cost": sparse - dense,
            "recall_indexer": stats["indexer"] / rows, "recall_random": stats["random"] / rows,
            "recall_best": stats["best"] / rows, "indexer_kl": stats["kl"] / max(stats["kl_rows"], 1),
            "queries_scored": stats["rows"]}


def report(results: dict, out: str, command: str, topk: int, seq: int) -> None:
    lines = ["# Training the lightning indexer (nano, CSA must pick)", "", f"Command: `{command}`", "",
             f"Sequences of {seq} tokens: up to {seq // 4} compressed entries per CSA layer, top-{topk} picked. "
             "Validation on held-out sequences of the same length. Recall: share of the main attention's "
             "mass over the compressed entries (every visible entry attended) that a top-k holds, over "
             "queries that see more than k entries.", "",
             "| run | train min | val loss (picks) | val loss (all entries) | sparsity cost | recall: indexer | "
             "random | best k | indexer KL |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['seconds'] / 60:.1f} | {r['val_loss_picks']:.4f} | "
                     f"{r['val_loss_all_entries']:.4f} | {r['sparsity_cost']:+.4f} | {r['recall_indexer']:.3f} | "
                     f"{r['recall_random']:.3f} | {r['recall_best']:.3f} | {r['indexer_kl']:.3f} |")
    lines.append("")
    path = os.path.join(out, "indexer.md")
    # the hand-written reading of the numbers below the table survives a rerun
    kept = open(path).read().partition("## Reading the numbers")[1:] if os.path.exists(path) else ("", "")
    with open(path, "w") as f:
        f.write("\n".join(lines) + ("\n" + "".join(kept) if kept[0] else ""))
    with open(os.path.join(out, "indexer.json"), "w") as f:
        json.dump({"command": command, "runs": results}, f, indent=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--out", default="docs/experiments")
    ap.add_argument("--work", default="runs/experiments-indexer")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    from sparseek.config import preset
    from sparseek.train.data import prepare

    topk = preset("nano").index_topk
    data_dir = os.path.join(a.work, "data")
    prepare(["stdlib"], data_dir, tokenizer=preset("nano").vocab_size, val_fraction=0.01)
    path = os.path.join(a.out, "indexer.json")
    # runs of an earlier invocation with the same settings stay in the table
    results = json.load(open(path))["runs"] if os.path.exists(path) else {}
    for name in a.runs:
        trainer, seconds = train(name, a.steps, a.work, a.batch, a.seq, data_dir)
        results[name] = {"seconds": seconds, **measure(trainer, a.eval_batches, topk)}
        print(json.dumps({name: results[name]}), flush=True)
    report(results, a.out, " ".join(["python"] + sys.argv), topk, a.seq)
    print(open(os.path.join(a.out, "indexer.md")).read())


if __name__ == "__main__":
    main()

"""The main job's training step (``sparseek train``'s nano defaults) with the fused head + loss
against the loss from materialized logits: step time and page faults, in alternating processes.

    python benchmarks/train_step_ab.py --rounds 2 --steps 5 --out benchmarks/results/cpu-nano-train-step-ab.txt

Each process builds the trainer on the prepared corpus (prepared once, in ``--data-dir``), runs
two warm-up steps, then times ``--steps`` steps and counts the minor page faults they take (a
fresh allocation above glibc's mmap threshold faults its pages in again on every step). The
variants alternate process by process, so the VM's drift falls on both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from bench_engine import emit


def one(variant: str, data_dir: str, steps: int) -> None:
    import torch

    import sparseek.model.loss as loss
    from sparseek.train.trainer import Trainer, TrainConfig

    if variant == "logits":  # every head counts as unfusable: the loss goes through its logits
        loss.fusable = lambda head: False
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(TrainConfig(out=out, data_dir=data_dir, max_steps=100, eval_every=10**9, ckpt_every=10**9))
        for _ in range(2):
            tr.train_step()
        times, faults = [], []
        for _ in range(steps):
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            tr.train_step()
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(json.dumps({"variant": variant, "step_s": times, "minor_faults": faults}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--data-dir", default=None, help="a prepared corpus (default: the stdlib corpus, prepared once)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.one:
        return one(a.one, a.data_dir, a.steps)
    # the first trainer prepares the corpus there (before its timed steps); the others reuse it
    data_dir = a.data_dir or os.path.join(tempfile.gettempdir(), "sparseek-train-step-ab-data")
    res = {"fused": [], "logits": []}
    for _ in range(a.rounds):
        for variant in res:
            run = subprocess.run([sys.executable, __file__, "--one", variant, "--data-dir", data_dir,
                                  "--steps", str(a.steps)], check=True, capture_output=True, text=True)
            res[variant].append(json.loads(run.stdout.strip().splitlines()[-1]))
    lines = [f"# python benchmarks/train_step_ab.py --rounds {a.rounds} --steps {a.steps}",
             "# nano, 16 x 256 tokens, fp32, Muon + MTP + indexer loss (sparseek train's defaults); "
             f"{a.rounds} processes per variant, alternating", "",
             "| loss | median step s | steps | median minor page faults per step |", "|---|---|---|---|"]
    med = {}
    for variant, runs in res.items():
        times = [t for r in runs for t in r["step_s"]]
        faults = [f for r in runs for f in r["minor_faults"]]
        med[variant] = statistics.median(times)
        lines.append(f"| {variant} | {med[variant]:.2f} | {len(times)} | {statistics.median(faults):,.0f} |")
    lines += ["", f"fused / logits step time: {med['fused'] / med['logits']:.2f}x"]
    emit("\n".join(lines), a.out)


if __name__ == "__main__":
    main()

"""Two CPU processes (gloo): expert parallelism + FSDP2 give the single-process losses."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(out, corpus, batch, optimizer, **kw):
    from sparseek.train.trainer import TrainConfig

    return TrainConfig(**{**dict(
        preset="debug", data=[corpus], out=out, seq_len=64, batch_size=batch, max_steps=4, warmup=1, lr=3e-3,
        eval_every=0, ckpt_every=0, log_load_every=0, val_fraction=0.1, optimizer=optimizer,
        data_dir=os.path.join(os.path.dirname(out), "data")), **kw})


def _worker(rank, world, port, out, corpus, optimizer, runs=({},)):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from sparseek.parallel import init_distributed
    from sparseek.train.trainer import Trainer

    r, w, device = init_distributed()
    for kw in runs:  # several runs in one process group (e.g. an interrupted one, then its resume)
        kw = dict(kw)
        stop_at = kw.pop("stop_at", None)
        t = Trainer(_cfg(out, corpus, batch=4 // world, optimizer=optimizer, **kw), rank=r, world_size=w)
        if stop_at is None:
            t.fit(progress=False)
        else:  # the same run, killed after a checkpoint at step `stop_at`
            for _ in range(stop_at):
                t._log(t.train_step())
            t.save()
    import torch.distributed as dist

    dist.destroy_process_group()




@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_ranks_match_one(tmp_path, corpus, optimizer):
    from sparseek.train.trainer import Trainer

    torch.set_num_threads(1)
    single = Trainer(_cfg(str(tmp_path / "one" / "run"), corpus, batch=4, optimizer=optimizer))
    single.fit(progress=False)
    ref = [json.loads(l) for l in open(single.log_path)]
    out = str(tmp_path / "two" / "run")
    # the data is prepared once, before the ranks start (rank 0 would otherwise prepare it alone)
    from sparseek.train.data import prepare

    prepare([corpus], os.path.join(os.path.dirname(out), "data"), tokenizer=512, val_fraction=0.1)
    mp.start_processes(_worker, args=(2, _free_port(), out, corpus, optimizer), nprocs=2, join=True,
                       start_method="spawn")
    got = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert len(got) == len(ref) == 4
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * a["grad_norm"]
    # the gathered checkpoint is a normal one
    import sparseek

    ckpts = sorted(d for d in os.listdir(out) if d.startswith("step-"))
    m, _ = sparseek.load(os.path.join(out, ckpts[-1]), dtype=torch.float32)
    assert m.layers[1].ffn.experts.w1.shape[0] == 8


def test_two_rank_resume_continues_the_run(tmp_path, corpus):
    """A 2-rank run stopped at step 2 and resumed (each rank restores its optimizer shards, its
    experts' moments and its RNG) continues with the losses of an uninterrupted run."""
    from sparseek.train.data import prepare
    from sparseek.train.trainer import Trainer

    torch.set_num_threads(1)
    optimizer = "muon"  # momentum on FSDP-sharded matrices + Adam moments on the rest
    single = Trainer(_cfg(str(tmp_path / "one" / "run"), corpus, batch=4, optimizer=optimizer))
    single.fit(progress=False)
    ref = [json.loads(l) for l in open(single.log_path)]
    out = str(tmp_path / "two" / "run")
    prepare([corpus], os.path.join(os.path.dirname(out), "data"), tokenizer=512, val_fraction=0.1)
    runs = ({"stop_at": 2}, {"resume": True})
    mp.start_processes(_worker, args=(2, _free_port(), out, corpus, optimizer, runs), nprocs=2, join=True,
                       start_method="spawn")
    ckpt = os.path.join(out, "step-000002")
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("trainer-rank")) == [
        "trainer-rank00000.safetensors", "trainer-rank00001.safetensors"]
    got = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert [g["step"] for g in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
    # a different number of ranks cannot take over the shards: one clear error
    with pytest.raises(ValueError, match="written by 2 rank"):
        Trainer(_cfg(out, corpus, batch=4, optimizer=optimizer, resume=True))

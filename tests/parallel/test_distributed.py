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


def _cfg(out, corpus, batch, optimizer):
    from sparseek.train.trainer import TrainConfig

    return TrainConfig(preset="debug", data=[corpus], out=out, seq_len=64, batch_size=batch, max_steps=4, warmup=1,
                       lr=3e-3, eval_every=0, ckpt_every=0, log_load_every=0, val_fraction=0.1, optimizer=optimizer,
                       data_dir=os.path.join(os.path.dirname(out), "data"))


def _worker(rank, world, port, out, corpus, optimizer):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from sparseek.parallel import init_distributed
    from sparseek.train.trainer import Trainer

    r, w, device = init_distributed()
    t = Trainer(_cfg(out, corpus, batch=4 // world, optimizer=optimizer), rank=r, world_size=w)
    t.fit(progress=False)
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

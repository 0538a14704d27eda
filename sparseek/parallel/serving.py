"""Serving from expert-sharded ranks: rank 0 runs the HTTP server and the engine; every other rank
runs the same engine loop on the same requests, step for step, so that each step's all-reduces
meet (``shard_experts_``: each rank holds ``1 / N`` of the routed experts).

At each look at its inbox (before every step) rank 0's ``AsyncEngine`` tells its ``Leader`` what
joined (prompt token ids and sampling parameters, seeds drawn once on rank 0) and which requests
were aborted; the leader sends that to the followers, whose ``follow`` loop feeds it to their own
engine at the same point of the same loop. Identical inputs and identical all-reduced activations
give identical tokens on every rank, so only requests travel, never tokens.

The messages go over a gloo group of their own with a long timeout: an idle server waits in it for
as long as no request comes (NCCL's watchdog would end an idle collective after minutes).
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger("sparseek")


def control_channel(group=None):
    """``(send, recv)`` over a gloo process group made for these messages (call on every rank,
    together): rank 0 sends, every other rank receives the same objects in the same order."""
    if group is None:
        group = dist.new_group(backend="gloo", timeout=timedelta(days=365))

    def send(msg):
        dist.broadcast_object_list([msg], src=0, group=group)

    def recv():
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    return send, recv


class Leader:
    """Rank 0's side: ``AsyncEngine(llm, mirror=Leader(send))`` sends one message per loop turn."""

    def __init__(self, send):
        self._send = send
        self._next = 0

    def send(self, added, aborted, stop: bool, reset: bool) -> None:
        new = []
        for req in added:
            req.rid, self._next = self._next, self._next + 1
            first = req._seqs[0]
            new.append((req.rid, first.out.prompt_token_ids, first.params))
        self._send({"new": new, "abort": [r.rid for r in aborted], "stop": stop, "reset": reset})


class _Reset(Exception):
    """Rank 0 lost its requests to a failed step: start again clean, then take this message."""

    def __init__(self, msg: dict):
        super().__init__("reset")
        self.msg = msg


class _Gone(Exception):
    """Rank 0 can no longer be heard (it exited or crashed)."""


def follow(llm, recv, publish=None) -> None:
    """A follower rank's engine: run ``llm``'s loop on the requests rank 0's messages name, until
    rank 0 stops, or until it can no longer be heard (``publish(rid, seq)``, if given, sees each
    sequence as it advances: tests compare the ranks' tokens with it)."""
    live: dict[int, list] = {}
    pending: list[dict] = []  # a message that came with a reset, to take after starting again

    def feed(idle: bool):
        if pending:
            msg = pending.pop()
        else:
            try:
                msg = recv()
            except Exception as e:
                raise _Gone(str(e)) from e
        if msg["reset"] and not msg.get("handled"):
            msg["handled"] = True
            raise _Reset(msg)
        seqs = []
        for rid, ids, params in msg["new"]:
            live[rid] = llm._requests([ids], params)
            for s in live[rid]:
                s.sink = rid
            seqs.extend(live[rid])
        for rid in msg["abort"]:
            for s in live.get(rid, ()):
                s.aborted = True
        for rid in [r for r, ss in live.items() if all(s.out.finish_reason is not None for s in ss)]:
            del live[rid]
        return None if msg["stop"] else seqs

    while True:
        try:
            for seq in llm._run([], feed=feed):
                if publish is not None:
                    publish(seq.sink, seq)
            return
        except _Reset as r:
            pending.append(r.msg)
        except _Gone as e:
            log.warning("rank 0 can no longer be heard (%s): this rank stops", e)
            return
        except Exception:  # as rank 0 does: its step failed the same way, its requests are lost
            log.exception("engine step failed on this rank; starting again with the next message")
        live.clear()
        llm._cache = None


__all__ = ["control_channel", "Leader", "follow"]

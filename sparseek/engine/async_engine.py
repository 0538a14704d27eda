"""The engine for a server: one thread runs the continuous-batching loop; asyncio tasks submit
requests and read their deltas as they come.

Requests join the running batch between decode steps (the loop asks the inbox before each step
and sleeps on it when there is nothing to do), and a request whose reader goes away (a client
that disconnected) is aborted: its slot frees at the next step. An error inside a step (out of
memory, a bug) fails the requests in flight with that error and the loop starts again with a
fresh cache, so one bad step never takes the server down.

Aborts take effect at the loop's next look at its inbox (before each step), as a snapshot taken
on the engine thread. A ``mirror`` (``sparseek.parallel.serving.Leader``) is told, at each such
look, which requests joined and which were aborted, so that other processes holding other parts
of the model (expert-sharded ranks) can run the same steps on the same requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Sequence

from sparseek.engine.llm import LLM, StreamDelta, _delta, _Seq
from sparseek.engine.sampling import SamplingParams

log = logging.getLogger("sparseek")


class EngineError(RuntimeError):
    """The engine failed while running a request (the message says how); the request is lost."""


class Request:
    """One submitted prompt and its ``n`` completions: iterate it (``async for``) for their
    deltas, in the order they are produced, each tagged by ``sample``; ``abort()`` ends them."""

    def __init__(self, engine: "AsyncEngine", seqs: list[_Seq]):
        self._engine = engine
        self._seqs = seqs
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._open = len(seqs)  # completions not finished yet
        self._abort = False  # asked for from any thread; applied by the engine thread
        self.rid: int | None = None  # the mirror's name for it
        self.submitted = time.monotonic()
        for s in seqs:
            s.sink = self

    @property
    def outputs(self) -> list:
        """The ``RequestOutput`` of each completion (whole once its last delta has been read)."""
        return [s.out for s in self._seqs]

    def abort(self) -> None:
        """End every unfinished completion (safe from any thread, any number of times)."""
        if self._open:
            self._abort = True
            self._engine._wake()

    def _put(self, item) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the reader's event loop is gone: nobody to tell
            self.abort()

    def __aiter__(self) -> AsyncIterator[StreamDelta]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[StreamDelta]:
        try:
            while self._open:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self._open = 0
                    raise EngineError(str(item) or type(item).__name__) from item
                if item.finish_reason is not None:
                    self._open -= 1
                yield item
        finally:  # the reader stopped early (client gone, task cancelled): free the slots
            self.abort()


class AsyncEngine:
    """``LLM`` behind a thread, for asyncio servers. ``submit`` checks a request and queues it
    (bad input raises ``ValueError`` right there, naming the problem); ``max_waiting`` bounds the
    requests queued beyond the running batch (``submit`` raises ``EngineBusy`` past it)."""

    def __init__(self, llm: LLM, max_waiting: int = 256, mirror=None):
        self.llm = llm
        self.max_waiting = max_waiting
        self.mirror = mirror
        self._failed = False  # a step failed since the mirror last heard
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: set[Request] = set()  # requests the engine thread has accepted, not finished
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not yet taken by the engine thread
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="sparseek-engine", daemon=True)
        self.steps_failed = 0
        self.aborted = 0  # sequences ended by an abort (readers gone)
        # called on the engine thread with (request, sequence, delta) for every published delta
        # (the server's metrics); one that raises is logged, never fails the step
        self.listeners: list = []

    # ------------------------------------------------------------------ public
    def start(self) -> "AsyncEngine":
        self._thread.start()
        return self

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Abort what is in flight and stop the engine thread."""
        self._stopping = True
        with self._lock:
            live = list(self._live)
        for r in live:
            r.abort()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def load(self) -> dict:
        """Requests running or queued (for a health endpoint)."""
        with self._lock:
            return {"in_flight": len(self._live), "queued": self._pending, "aborted": self.aborted}

    def submit(self, prompt, params: SamplingParams | None = None) -> Request:
        """Queue one prompt (text or token ids); call from the event loop that will read it."""
        if self._stopping:
            raise EngineBusy("the engine is shutting down")
        params = params or SamplingParams()
        if self.mirror is not None and not params.greedy and params.seed is None:
            # every process must sample alike: the seed is drawn here, once, and travels with the request
            params = dataclasses.replace(params, seed=random.randrange(2**62))
        seqs = self.llm._requests([prompt], params)  # bad input: ValueError here
        with self._lock:
            if self._pending + len(self._live) >= self.max_batch_size + self.max_waiting:
                raise EngineBusy(f"too many requests in flight ({self.max_batch_size} running, "
                                 f"{self.max_waiting} queued at most): retry later")
            self._pending += 1
        req = Request(self, seqs)
        self._inbox.put(req)
        return req

    @property
    def max_batch_size(self) -> int:
        return self.llm.max_batch_size

    async def call(self, fn):
        """Run ``fn(llm)`` on the engine thread between two steps (loading or unloading a LoRA
        adapter) and return its result; its exception is raised here."""
        if self._stopping:
            raise EngineBusy("the engine is shutting down")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._inbox.put(_Call(fn, loop, done))
        return await done

    # ------------------------------------------------------------------ engine thread
    def _wake(self) -> None:
        self._inbox.put(None)  # a sleeping loop rechecks (aborts, shutdown)

    def _feed(self, idle: bool) -> Sequence[_Seq] | None:
        items = []
        if idle and not self._stopping:
            items.append(self._inbox.get())
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        stop = self._stopping
        added = []
        for req in items:
            if req is None:
                continue
            if isinstance(req, _Call):
                req.run(self.llm, stop)
                continue
            lora = req._seqs[0].params.lora
            if not stop and lora is not None and (self.llm.lora_rows is None or lora not in self.llm.lora_rows.names):
                # unloaded between its check at submit and now: it fails alone, not the step
                with self._lock:
                    self._pending -= 1
                req._put(EngineError(f"LoRA adapter {lora!r} was unloaded before the request started"))
                continue
            with self._lock:
                self._pending -= 1
                if not stop:
                    self._live.add(req)
            if stop:  # never admitted: the loop will not run it
                req._abort = True
                req._put(EngineError("the engine is shutting down"))
            else:
                added.append(req)
        with self._lock:
            live = list(self._live)
        aborted = []
        for req in live:
            if req._abort and not req._seqs[0].aborted:
                for s in req._seqs:
                    s.aborted = True
                aborted.append(req)
        if self.mirror is not None:
            self.mirror.send(added, aborted, stop=stop, reset=self._failed)
            self._failed = False
        return None if stop else [s for req in added for s in req._seqs]

    def _main(self) -> None:
        while not self._stopping:
            try:
                for seq in self.llm._run([], feed=self._feed):
                    self._publish(seq)
                return
            except Exception as e:  # a failed step: fail what is in flight, start again clean
                self.steps_failed += 1
                log.exception("engine step failed; failing %d request(s) in flight", len(self._live))
                with self._lock:
                    live, self._live = list(self._live), set()
                for r in live:
                    for s in r._seqs:
                        s.aborted = True
                    r._put(e)
                self.llm._cache = None  # rows of the lost requests may be half-written
                self._failed = True

    def _publish(self, seq: _Seq) -> None:
        req: Request = seq.sink
        delta = _delta(seq)
        if delta is None:
            return
        self.aborted += delta.finish_reason == "abort"
        for listen in self.listeners:
            try:
                listen(req, seq, delta)
            except Exception:
                log.exception("a delta listener failed")
        if delta.finish_reason is not None and all(s.out.finish_reason is not None for s in req._seqs):
            with self._lock:
                self._live.discard(req)
        req._put(delta)


class _Call:
    """A function to run on the engine thread, and the asyncio future that waits for it."""

    def __init__(self, fn, loop, done):
        self.fn, self.loop, self.done = fn, loop, done

    def run(self, llm: LLM, stopping: bool) -> None:
        try:
            if stopping:
                raise EngineBusy("the engine is shutting down")
            result, error = self.fn(llm), None
        except Exception as e:  # the caller's to handle (a bad adapter directory, an adapter in use)
            result, error = None, e
        self.loop.call_soon_threadsafe(self._settle, result, error)

    def _settle(self, result, error) -> None:
        if self.done.cancelled():
            return
        if error is not None:
            self.done.set_exception(error)
        else:
            self.done.set_result(result)


class EngineBusy(RuntimeError):
    """The engine's queue is full, or it is shutting down: retry later (HTTP 503)."""


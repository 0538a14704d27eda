"""Run untrusted Python (model-written code plus its tests) so that it cannot hurt the caller.

Each program runs in its own process:
* a fresh temporary directory as working directory and HOME (deleted afterwards);
* a minimal environment, ``python -I`` (no user site, no PYTHON* variables);
* ``resource.setrlimit`` in the child: address space (memory), CPU seconds, file size, no core
  dumps, no new processes;
* no network: inside a fresh network namespace (``unshare -n``, or ``unshare -rn`` for non-root
  users) when the kernel allows it, and in any case socket creation and name lookup are patched
  to raise in the child;
* destructive functions disabled in the child (file removal and renaming, chmod/chown, kill,
  fork/exec/system, subprocess, shutil.rmtree/move/copy, ctypes) and ``open`` refuses to write
  outside the temporary directory;
* a wall-clock timeout, after which the whole process group is killed.

This contains accidents and benchmark code; it is not a security boundary against code written
to escape (use a container or VM for that).

Outcomes: ``passed`` (ran to the end), ``failed`` (an assertion failed), ``timeout`` (wall clock
or CPU limit), ``error`` (any other exception, a blocked operation, memory exhaustion, a crash).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")


@dataclass
class ExecResult:
    status: str  # passed | failed | timeout | error
    detail: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=None)
def network_namespace_prefix() -> tuple[str, ...] | None:
    """The ``unshare`` command that gives a process its own empty network namespace, if any works here."""
    exe = shutil.which("unshare")
    if exe is None:
        return None
    for prefix in ((exe, "-n"), (exe, "-r", "-n")):
        try:
            r = subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return prefix
    return None


def isolation_info(isolation: str = "auto") -> str:
    """What ``run_program`` will use for the network, in words (goes into the results file)."""
    prefix = network_namespace_prefix() if isolation != "socket" else None
    if isolation in ("unshare", "unshare-only") and prefix is None:
        raise RuntimeError(f"isolation={isolation!r} needs `unshare -n`, which does not work on this machine")
    ns = f"{' '.join(os.path.basename(p) if i == 0 else p for i, p in enumerate(prefix))} (own network namespace)" \
        if prefix else None
    parts = [ns] if ns else []
    if isolation != "unshare-only":
        parts.append("socket creation blocked in the child")
    return " + ".join(parts)


def run_program(source: str, timeout: float = 10.0, memory_mb: int = 1024, cpu_s: int | None = None,
                file_mb: int = 16, isolation: str = "auto") -> ExecResult:
    """Run ``source`` as ``__main__`` in a sandboxed process.

    isolation: "auto" (network namespace when available, plus the socket patch), "unshare"
    (require the namespace, plus the patch), "socket" (the patch only), "unshare-only" (the
    namespace only; for testing that it holds on its own).
    """
    prefix = ()
    if isolation in ("auto", "unshare", "unshare-only"):
        p = network_namespace_prefix()
        if p is None and isolation != "auto":
            raise RuntimeError(f"isolation={isolation!r} needs `unshare -n`, which does not work here")
        prefix = p or ()
    block_net = "0" if isolation == "unshare-only" else "1"
    cpu = int(cpu_s if cpu_s is not None else max(1, timeout) + 1)
    work = tempfile.mkdtemp(prefix="sparseek-sandbox-")
    t0 = time.monotonic()
    try:
        prog = os.path.join(work, "program.py")
        with open(prog, "w", encoding="utf-8") as f:
            f.write(source)
        env = {"HOME": work, "TMPDIR": work, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        cmd = [*prefix, sys.executable, "-I", "-B", CHILD, prog, str(memory_mb << 20), str(cpu),
               str(file_mb << 20), block_net]
        with open(os.path.join(work, "stdout"), "wb") as out, open(os.path.join(work, "stderr"), "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return ExecResult("timeout", f"wall clock > {timeout:g}s", round(time.monotonic() - t0, 3))
            finally:
                _kill_group(proc)  # anything it left behind in its session
        tail = _tail(os.path.join(work, "stderr"))
        secs = round(time.monotonic() - t0, 3)
        if rc == 0:
            return ExecResult("passed", "", secs)
        if rc == 1:
            return ExecResult("failed", tail or "AssertionError", secs)
        if rc < 0:
            sig = -rc
            if sig == signal.SIGXCPU:
                return ExecResult("timeout", f"CPU limit ({cpu}s)", secs)
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            return ExecResult("error", f"killed by {name}", secs)
        return ExecResult("error", tail or f"exit status {rc}", secs)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_many(sources: list[str], workers: int | None = None, progress: bool = False, **kw) -> list[ExecResult]:
    """``run_program`` over many programs in parallel processes (threads only wait on them)."""
    workers = workers or max(1, os.cpu_count() or 1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sources), desc="execute", unit="prog")

    def one(src):
        r = run_program(src, **kw)
        if bar:
            bar.update()
        return r

    with ThreadPoolExecutor(max_workers=workers) as pool:
        out = list(pool.map(one, sources))
    if bar:
        bar.close()
    return out


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: str, n: int = 400) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1] if lines else ""
    except OSError:
        return ""

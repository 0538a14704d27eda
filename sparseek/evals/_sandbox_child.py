"""Runs inside the sandbox process (``python -I _sandbox_child.py PROGRAM MEM_BYTES CPU_S FSIZE BLOCK_NET``).

Standalone on purpose: it imports nothing from sparseek. Order matters: limits first, then the
program is read, then the dangerous parts of the standard library are disabled, then the
program runs. Exit status: 0 passed, 1 an assertion failed, 2 any other error (its type on the
last line of stderr).
"""

import builtins
import io
import os
import resource
import sys


def _limit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass


def main():
    try:
        source, run = setup()
    except BaseException as e:  # noqa: BLE001 - the sandbox itself could not be set up
        _report(sys.stderr, "SandboxError", e)
        os._exit(3)
    run(source)


def setup():
    program, mem, cpu, fsize, block_net = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
        sys.argv[5] == "1"
    with open(program, encoding="utf-8") as f:
        source = f.read()
    _limit(resource.RLIMIT_AS, mem)
    _limit(resource.RLIMIT_DATA, mem)
    _limit(resource.RLIMIT_CPU, cpu)
    _limit(resource.RLIMIT_FSIZE, fsize)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_NPROC, 0)  # no new processes (not enforced for root; the patches below are)

    import shutil
    import subprocess

    home = os.getcwd()
    exit_now, stderr = os._exit, sys.stderr

    def denied(name):
        def f(*a, **k):
            raise PermissionError(f"{name} is disabled in the sandbox")
        return f

    if block_net:
        import _socket
        import socket

        class NoSocket(socket.socket):
            def __init__(self, *a, **k):
                raise PermissionError("network access is disabled in the sandbox")

        socket.socket = socket.SocketType = _socket.socket = NoSocket
        for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
                     "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(socket, name):
                setattr(socket, name, denied(f"socket.{name}"))

    # writes only inside the throw-away directory
    real_open, real_os_open = builtins.open, os.open

    def inside(path):
        try:
            p = os.path.realpath(os.fspath(path) if not isinstance(path, int) else "")
        except TypeError:
            return False
        return p == home or p.startswith(home + os.sep)

    def safe_open(file, mode="r", *a, **k):
        if not isinstance(file, int) and any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"writing {file!r} is disabled in the sandbox")
        return real_open(file, mode, *a, **k)

    def safe_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and not inside(path):
            raise PermissionError(f"writing {path!r} is disabled in the sandbox")
        return real_os_open(path, flags, *a, **k)

    import _io
    import posix

    class SafeFileIO(_io.FileIO):
        def __init__(self, file, mode="r", *a, **k):
            if not isinstance(file, int) and any(c in mode for c in "wax+") and not inside(file):
                raise PermissionError(f"writing {file!r} is disabled in the sandbox")
            super().__init__(file, mode, *a, **k)

    builtins.open = io.open = _io.open = safe_open
    io.FileIO = _io.FileIO = SafeFileIO
    os.open = posix.open = safe_os_open

    for name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
                 "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chdir", "fchdir",
                 "kill", "killpg", "fork", "forkpty", "system", "popen", "putenv", "unsetenv", "setuid",
                 "seteuid", "setgid", "setegid", "setreuid", "setregid", "link", "symlink", "mkfifo", "mknod",
                 "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv",
                 "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn",
                 "posix_spawnp", "_exit", "abort"):
        for mod in (os, posix):  # os re-exports posix: both names must go
            if hasattr(mod, name):
                setattr(mod, name, denied(f"os.{name}"))
    for name in ("rmtree", "move", "chown", "copy", "copy2", "copyfile", "copytree", "make_archive",
                 "unpack_archive"):
        setattr(shutil, name, denied(f"shutil.{name}"))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, denied(f"subprocess.{name}"))
    for mod in ("ctypes", "_ctypes", "multiprocessing", "_posixsubprocess", "pty", "resource"):
        sys.modules[mod] = None  # importing them now raises ImportError

    def run(source):
        try:
            exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
        except AssertionError as e:
            _report(stderr, "AssertionError", e)
            exit_now(1)
        except BaseException as e:  # noqa: BLE001 - SystemExit and MemoryError included: not a pass
            _report(stderr, type(e).__name__, e)
            exit_now(2)
        try:
            sys.stdout.flush()
        except Exception:
            pass
        exit_now(0)

    return source, run


def _report(stream, kind, exc):
    try:
        stream.write(f"\n{kind}: {str(exc)[:200]}\n")
        stream.flush()
    except Exception:
        pass


if __name__ == "__main__":
    main()

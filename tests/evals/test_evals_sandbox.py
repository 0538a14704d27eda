"""The sandbox contains programs that loop, allocate without bound, reach the network or destroy files."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from sparseek.evals.sandbox import isolation_info, network_namespace_prefix, run_many, run_program


def test_pass_fail_error():
    assert run_program("assert sum([1, 2]) == 3").status == "passed"
    r = run_program("assert 1 + 1 == 3, 'bad sum'")
    assert r.status == "failed" and "bad sum" in r.detail
    r = run_program("def f(:\n  pass")
    assert r.status == "error" and "SyntaxError" in r.detail
    assert run_program("raise ValueError('x')").status == "error"
    # leaving early is not passing
    assert run_program("import sys\nsys.exit(0)\nassert False").status == "error"
    assert run_program("import os\nos._exit(0)\nassert False").status == "error"


def test_infinite_loop_times_out():
    r = run_program("while True:\n    pass", timeout=1.5)
    assert r.status == "timeout" and r.seconds < 10


def test_unbounded_allocation_is_contained():
    r = run_program("a = []\nwhile True:\n    a.append(bytearray(50_000_000))", timeout=20, memory_mb=256)
    assert r.status == "error" and "MemoryError" in r.detail
    assert run_program("x = bytearray(1 << 40)", memory_mb=256).status == "error"


def test_output_flood_is_contained():
    r = run_program("while True:\n    print('x' * 10000)", timeout=10, file_mb=1)
    assert r.status in ("error", "timeout") and r.status != "passed"


@pytest.fixture
def server():
    """A listening localhost socket; counts the connections it receives."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    got, stop = [], threading.Event()

    def loop():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                got.append(conn.recv(100))
                conn.close()
            except OSError:
                pass

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    yield srv.getsockname()[1], got
    stop.set()
    th.join()
    srv.close()


NET_PROGRAMS = [
    "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')",
    "import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\ns.sendall(b'leak')",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)",
]


@pytest.mark.parametrize("isolation", ["auto", "socket", "unshare-only"])
def test_network_is_unreachable(server, isolation):
    if isolation == "unshare-only" and network_namespace_prefix() is None:
        pytest.skip("unshare -n does not work on this machine")
    port, got = server
    # the server itself is reachable from an ordinary process
    with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
        c.sendall(b"ok")
    for prog in NET_PROGRAMS:
        r = run_program(prog.format(port=port), timeout=10, isolation=isolation)
        assert r.status == "error", (prog, r)
    import time

    time.sleep(0.5)
    assert got == [b"ok"]  # nothing from the sandboxed programs
    assert isolation_info(isolation)


def test_isolation_report_names_the_mechanism():
    info = isolation_info("auto")
    assert "socket creation blocked" in info
    assert ("unshare" in info) == (network_namespace_prefix() is not None)


def test_callers_files_and_processes_survive(tmp_path):
    import subprocess
    import sys

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    victim_dir = tmp_path / "precious"
    victim_dir.mkdir()
    victim = victim_dir / "data.txt"
    victim.write_text("keep me")
    v = str(victim)
    attacks = [
        f"import os\nos.remove({v!r})",
        f"import os\nos.unlink({v!r})",
        f"import posix\nposix.unlink({v!r})",
        f"import os\nos.rename({v!r}, {v!r} + '.moved')",
        f"import shutil\nshutil.rmtree({str(victim_dir)!r})",
        f"import shutil\nshutil.move({v!r}, 'here.txt')",
        f"import pathlib\npathlib.Path({v!r}).unlink()",
        f"open({v!r}, 'w').write('gone')",
        f"import io\nio.FileIO({v!r}, 'w')",
        f"import os\nos.truncate({v!r}, 0)",
        f"import os\nfd = os.open({v!r}, os.O_WRONLY | os.O_TRUNC)",
        f"import os\nos.system('rm -rf {victim_dir}')",
        f"import subprocess\nsubprocess.run(['rm', '-rf', {str(victim_dir)!r}])",
        f"import os\nos.chmod({v!r}, 0)",
        "import ctypes",
        f"import os, signal\nos.kill({bystander.pid}, signal.SIGKILL)",
    ]
    try:
        results = run_many(attacks, workers=4, timeout=10)
        assert bystander.poll() is None  # still running
    finally:
        bystander.kill()
        bystander.wait()
    for prog, r in zip(attacks, results):
        assert r.status == "error", (prog, r)
    assert victim.read_text() == "keep me"
    assert oct(victim.stat().st_mode & 0o777) != "0o0"


def test_runs_in_a_throwaway_home():
    prog = ("import os, tempfile\n"
            "home = os.environ['HOME']\n"
            "assert os.getcwd() == home and os.path.basename(home).startswith('sparseek-sandbox-')\n"
            "open('scratch.txt', 'w').write('fine')\n"
            "assert open(os.path.join(home, 'scratch.txt')).read() == 'fine'\n"
            "print(home)\n")
    assert run_program(prog).status == "passed"
    leftovers = [d for d in os.listdir(os.environ.get("TMPDIR", "/tmp")) if d.startswith("sparseek-sandbox-")]
    assert len(leftovers) < 50  # directories are removed after each run (others may be running)

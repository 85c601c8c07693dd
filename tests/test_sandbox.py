"""The code sandbox and pass@k: the unbiased estimator, and hostile programs that must neither pass nor linger."""

import math
import os
import socket
import time
from pathlib import Path

import pytest

from align.evaluation import passk, sandbox
from align.evaluation.sandbox import Limits, run_program

FAST = Limits(timeout=3, memory_mb=512, max_procs=8, max_output=64 * 1024)


@pytest.fixture(scope="module")
def layers():
    return sandbox.isolation()


# ---------------------------------------------------------------------------------------------------- estimator


def test_pass_at_k_estimator_cases():
    assert passk.estimate_pass_at_k(1, 1, 1) == 1.0
    assert passk.estimate_pass_at_k(1, 0, 1) == 0.0
    assert passk.estimate_pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert passk.estimate_pass_at_k(5, 0, 5) == 0.0
    assert passk.estimate_pass_at_k(5, 1, 5) == 1.0
    assert passk.estimate_pass_at_k(10, 8, 3) == 1.0  # fewer than k failures: every draw of k has a pass
    # matches the closed form 1 - C(n-c, k) / C(n, k)
    for n, c, k in [(20, 5, 3), (200, 13, 10), (7, 2, 2)]:
        want = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert passk.estimate_pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError):
        passk.estimate_pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        passk.estimate_pass_at_k(3, 4, 1)


def test_metric_called_as_lm_eval_calls_it():
    test = "def check(candidate):\n    assert candidate(2) == 4\ncheck(square)"
    good, bad = "def square(x):\n    return x * x\n", "def square(x):\n    return x + x + 1\n"
    assert passk.pass_at_k(references=[test], predictions=[[good]], k=[1]) == {"pass@1": 1.0}
    assert passk.pass_at_k(references=[test], predictions=[[bad]], k=[1]) == {"pass@1": 0.0}
    scores = passk.pass_at_k(references=[test], predictions=[[good, bad, bad, bad]], k=[1, 2])
    assert scores["pass@1"] == pytest.approx(0.25) and scores["pass@2"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------- sandbox


def test_honest_program_passes_and_failing_one_fails():
    ok = run_program("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('done')", FAST)
    assert ok.passed and ok.status == "passed" and "done" in ok.stdout
    bad = run_program("assert 1 + 1 == 3", FAST)
    assert not bad.passed and "AssertionError" in bad.stderr


def _descendants_of_me() -> list[int]:
    return sandbox._descendants(os.getpid())


HOSTILE = {
    "infinite_loop": "while True:\n    pass",
    "early_sys_exit": "import sys\nsys.exit(0)\nassert False",
    "early_os_exit": "import os\nos._exit(0)",
    "exit_in_atexit": "import atexit, os\natexit.register(lambda: os._exit(0))\nraise SystemExit(0)",
    "memory_hog": "blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))",
    "huge_output": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
    "setsid_daemon": (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(600)\n"
        "    os._exit(0)\n"
        "time.sleep(0.2)\n"
    ),
    "setsid_daemon_then_hang": (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    os.fork(); os.fork()\n"
        "    time.sleep(600)\n"
        "time.sleep(600)\n"
    ),
    "fork_bomb": (
        "import os\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        pass\n"
    ),
    "forge_sentinel_by_print": "print('0' * 32)\nraise SystemExit(0)",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_neither_passes_nor_lingers(name, layers):
    if name == "fork_bomb" and "pids-cgroup" not in layers and "nproc" not in layers:
        pytest.skip("no process limit on this machine (root without a writable pids cgroup)")
    before = set(_descendants_of_me())
    start = time.monotonic()
    result = run_program(HOSTILE[name], FAST)
    assert not result.passed, result
    assert result.leftover == 0
    assert time.monotonic() - start < FAST.timeout + 15  # the timeout held
    assert set(_descendants_of_me()) <= before  # nothing it started is still running
    assert len(result.stdout) <= FAST.max_output
    assert run_program("print('healthy')", FAST).passed  # and the host can still run programs


def test_secrets_in_environment_do_not_reach_the_program(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws_secret_value")
    result = run_program("import os\nprint(sorted(os.environ.items()))\nassert 'HF_TOKEN' not in os.environ", FAST)
    assert result.passed
    assert "secret_value" not in result.stdout


def test_no_network(layers):
    if "netns" not in layers and "landlock-tcp" not in layers:
        pytest.skip("neither a network namespace nor Landlock is available here")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    program = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')"
    result = run_program(program, FAST)
    server.settimeout(0.2)  # a connection that got through would be waiting in the backlog by now
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()
    assert not result.passed


def test_writes_outside_the_work_directory_are_refused(tmp_path, layers):
    if "landlock-fs" not in layers:
        pytest.skip("Landlock is not available: writes are limited only by file permissions here")
    target = tmp_path / "escaped.txt"
    result = run_program(f"open({str(target)!r}, 'w').write('x')", FAST)
    assert not result.passed
    assert not target.exists()
    inside = run_program("open('scratch.txt', 'w').write('x')\nimport os\nassert os.path.exists('scratch.txt')", FAST)
    assert inside.passed


def test_work_directory_is_removed():
    result = run_program("import os\nprint(os.getcwd())", FAST)
    assert result.passed
    assert not Path(result.stdout.strip()).exists()

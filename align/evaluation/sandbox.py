"""Run untrusted Python programs (model-written code) in a sandbox: one fresh interpreter per program, limited.

Layers, each used where the OS allows it (`isolation()` says which are in force here):
- a fresh `python -I` in its own temporary directory, scrubbed environment, stdin closed, output capped;
- rlimits: address space, CPU seconds, file size, open files, no core dumps, and processes (RLIMIT_NPROC, which
  the kernel does not enforce for root: there a `pids` cgroup bounds the process count instead);
- no network: a new network namespace (`unshare --net`, with `--map-root-user` when not root), else Landlock's
  TCP rules; writes only inside the temporary directory and no signals to outside processes (Landlock);
- a supervisor process that is a child subreaper: every descendant, including ones that called setsid and
  were orphaned, is re-parented to it, and at the end (exit or timeout) it kills them all.
A program passes only when it exits 0 and its last output is a random sentinel written after the test ran, so
`sys.exit(0)` or `os._exit(0)` before the end is a failure.

This file is run as a script for the supervisor, so it uses only the standard library.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 38, 36
MARKER_VAR = "ALIGN_SANDBOX_ID"


@dataclass
class Limits:
    timeout: float = 10.0  # wall-clock seconds for the whole program
    memory_mb: int = 1024  # address space per process
    max_procs: int = 16  # processes the program may have at once
    max_output: int = 1 << 20  # bytes per output stream (and per file written)


@dataclass
class Result:
    passed: bool
    status: str  # passed | failed | timeout | error
    exit_code: int | None
    stdout: str
    stderr: str
    isolation: list[str] = field(default_factory=list)
    leftover: int = 0  # processes the supervisor could not kill (should always be 0)


# ----------------------------------------------------------------------------------------------------------------
# host side


def run_program(source: str, limits: Limits | None = None) -> Result:
    """Run `source` as a Python program in the sandbox and report whether it ran to its end with exit code 0."""
    limits = limits or Limits()
    sentinel = secrets.token_hex(16)
    workdir = Path(tempfile.mkdtemp(prefix="align-sandbox-"))
    try:
        # Flush what the program printed, then os.write straight to fd 1 (replacing print or sys.stdout cannot
        # forge the end of the run); a program that exits early never gets here.
        program = f"{source}\n\n__import__('sys').stdout.flush()\n__import__('os').write(1, b'\\n{sentinel}\\n')\n"
        (workdir / "program.py").write_text(program, encoding="utf-8")
        config = {
            "workdir": str(workdir), "python": sys.executable, "timeout": limits.timeout,
            "memory_mb": limits.memory_mb, "max_procs": limits.max_procs, "max_output": limits.max_output,
            "marker": sentinel, "netns": bool(_netns_prefix()),
        }
        cmd = [*_netns_prefix(), sys.executable, "-I", str(Path(__file__).resolve()), "--supervise", json.dumps(config)]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", MARKER_VAR: sentinel}
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=workdir, env=env,
                                  timeout=limits.timeout + 30, start_new_session=True)
            report = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else None
        except (subprocess.TimeoutExpired, json.JSONDecodeError):
            report = None
        if report is None:  # the supervisor itself failed: kill whatever carries this run's marker
            _kill_marked(sentinel)
            return Result(False, "error", None, "", "sandbox supervisor failed", [], 0)
        stdout = _tail(workdir / "stdout", limits.max_output)
        stderr = _tail(workdir / "stderr", limits.max_output)
        # A program that leaves processes running behind it has not finished either.
        finished = report["exit_code"] == 0 and sentinel in stdout and report["killed"] == 0
        status = "timeout" if report["timed_out"] else "passed" if finished else "failed"
        return Result(status == "passed", status, report["exit_code"], stdout.replace(sentinel, "").rstrip(),
                      stderr, report["isolation"], report["leftover"])
    finally:
        _remove_tree(workdir)


def isolation() -> list[str]:
    """The isolation layers a program gets on this machine (runs a trivial program to find out)."""
    return run_program("pass", Limits(timeout=10)).isolation


def selftest() -> Result:
    """Run a trivial passing program; a sandbox that cannot pass it cannot score anything."""
    result = run_program("assert 1 + 1 == 2", Limits(timeout=20))
    if not result.passed:
        raise RuntimeError(f"the code sandbox cannot run a trivial program ({result.status}): {result.stderr[-500:]}")
    return result


@lru_cache(maxsize=1)
def _netns_prefix() -> tuple[str, ...]:
    """`unshare` arguments for a new network namespace, or () where the OS does not allow one."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    args = (unshare, "--net") if os.geteuid() == 0 else (unshare, "--net", "--map-root-user")
    try:
        ok = subprocess.run([*args, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return args if ok else ()


def _tail(path: Path, limit: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _remove_tree(path: Path) -> None:
    for root, dirs, _ in os.walk(path):  # a program may have made directories unwritable
        for d in dirs:
            try:
                os.chmod(os.path.join(root, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


def _kill_marked(marker: str) -> None:
    """Last resort: SIGKILL every process whose environment carries this run's marker."""
    needle = f"{MARKER_VAR}={marker}".encode()
    for _ in range(50):
        found = []
        for pid in _all_pids():
            try:
                if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found.append(pid)
            except OSError:
                pass
        if not found:
            return
        for pid in found:
            _kill(pid)
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------------------------------
# supervisor side (runs as `python -I sandbox.py --supervise CONFIG`, possibly in a new network namespace)


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may itself contain ")"
        children.setdefault(ppid, []).append(pid)
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _kill_all(cgroup: Path | None) -> tuple[int, int]:
    """Kill every descendant (orphans were re-parented to us, the subreaper) and every process in the cgroup;
    repeat until none is left, since a fork bomb keeps making new ones. Returns (killed, survivors)."""
    deadline = time.monotonic() + 10
    killed: set[int] = set()
    while True:
        pids = set(_descendants(os.getpid()))
        if cgroup is not None:
            try:
                pids |= {int(p) for p in (cgroup / "cgroup.procs").read_text().split()}
            except OSError:
                pass
        pids.discard(os.getpid())
        for pid in pids:
            _kill(pid)
        killed |= pids
        _reap()
        if not pids or time.monotonic() > deadline:
            return len(killed), len(pids)
        time.sleep(0.005)


def _own_cgroup_path(controller: str) -> str | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(",") or (controller == "" and controllers == ""):
            return path
    return None


def _make_pids_cgroup(name: str, max_procs: int) -> Path | None:
    """A `pids` cgroup (v1 or v2) limited to max_procs, where this process may create one; else None."""
    bases = []
    v1 = _own_cgroup_path("pids")
    if v1 is not None and Path("/sys/fs/cgroup/pids").is_dir():
        bases.append(Path("/sys/fs/cgroup/pids") / v1.lstrip("/"))
    v2 = _own_cgroup_path("")
    for mount in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if v2 is not None and (mount / "cgroup.controllers").is_file():
            bases.append(mount / v2.lstrip("/"))
    for base in bases:
        path = base / name
        try:
            path.mkdir()
        except OSError:
            continue
        try:
            (path / "pids.max").write_text(str(max_procs))
            return path
        except OSError:
            path.rmdir()
    return None


def _is_real_root() -> bool:
    """uid 0 in the initial user namespace (inside `unshare --map-root-user` a user looks like root but is not)."""
    if os.geteuid() != 0:
        return False
    try:
        return Path("/proc/self/uid_map").read_text().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def _count_processes(uid: int) -> int:
    count = 0
    for pid in _all_pids():
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                count += 1
        except OSError:
            pass
    return count


# Landlock (Linux >= 5.13): filesystem writes only below the work directory; TCP (ABI 4+) and signals and
# abstract unix sockets outside the sandbox (ABI 6+) denied. Constants from linux/landlock.h.
LL_WRITE_FS = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write file, remove, make *
LL_REFER, LL_TRUNCATE = 1 << 13, 1 << 14
LL_NET_TCP = (1 << 0) | (1 << 1)  # bind, connect
LL_SCOPE = (1 << 0) | (1 << 1)  # abstract unix sockets, signals


def _landlock(workdir: str) -> list[str]:
    libc = _libc()
    abi = libc.syscall(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return []
    fs = LL_WRITE_FS | (LL_REFER if abi >= 2 else 0) | (LL_TRUNCATE if abi >= 3 else 0)
    net = LL_NET_TCP if abi >= 4 else 0
    scoped = LL_SCOPE if abi >= 6 else 0
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(444, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        return []

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    dir_fd = os.open(workdir, os.O_PATH | os.O_CLOEXEC)
    rule = PathBeneath(fs, dir_fd)
    ok = libc.syscall(445, ruleset, 1, ctypes.byref(rule), 0) == 0  # LANDLOCK_RULE_PATH_BENEATH
    os.close(dir_fd)
    ok = ok and libc.syscall(446, ruleset, 0) == 0  # landlock_restrict_self
    os.close(ruleset)
    if not ok:
        return []
    return ["landlock-fs"] + (["landlock-tcp"] if net else []) + (["landlock-signals"] if scoped else [])


def supervise(config: dict) -> dict:
    libc = _libc()
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    workdir = config["workdir"]
    isolation = ["fresh-interpreter", "scrubbed-env", "rlimits"] + (["netns"] if config["netns"] else [])

    cgroup = _make_pids_cgroup(f"align-sandbox-{config['marker'][:12]}", config["max_procs"])
    root = _is_real_root()
    if cgroup is not None:
        isolation.append("pids-cgroup")
    elif not root:
        isolation.append("nproc")
    out = os.open(os.path.join(workdir, "stdout"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(os.path.join(workdir, "stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    nproc = _count_processes(os.getuid()) + config["max_procs"]
    read_end, write_end = os.pipe()  # the child reports its Landlock layers through this pipe

    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setsid()
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(out, 1)
            os.dup2(err, 2)
            memory = config["memory_mb"] << 20
            cpu = int(config["timeout"]) + 1
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
            resource.setrlimit(resource.RLIMIT_FSIZE, (config["max_output"], config["max_output"]))
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if not root:
                resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
            libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            layers = _landlock(workdir)
            os.write(write_end, json.dumps(layers).encode())
            os.close(write_end)
            os.chdir(workdir)
            env = {k: v for k, v in os.environ.items()}
            os.execve(config["python"], [config["python"], "-I", "program.py"], env)
        except BaseException as exc:  # noqa: BLE001 - report anything and never return into the supervisor
            os.write(2, f"sandbox: could not start the program: {exc!r}\n".encode())
        os._exit(127)

    os.close(write_end)
    with os.fdopen(read_end) as f:
        layers = f.read()
    isolation += json.loads(layers) if layers else []

    deadline = time.monotonic() + config["timeout"]
    status, timed_out = None, False
    while status is None:
        try:
            wpid, wstatus = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if wpid == pid:
            status = wstatus
        elif wpid == 0:
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.005)
    killed, leftover = _kill_all(cgroup)
    if cgroup is not None:
        try:
            cgroup.rmdir()
        except OSError:
            pass
    exit_code = None
    if status is not None:
        exit_code = os.waitstatus_to_exitcode(status)
    return {"exit_code": exit_code, "timed_out": timed_out, "isolation": isolation, "killed": killed,
            "leftover": leftover}


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--supervise":
    print(json.dumps(supervise(json.loads(sys.argv[2]))), flush=True)

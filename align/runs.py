"""Run directories: refuse to clobber finished work, write small JSON files atomically, clean up on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path


LOCK_FILE = ".lock"
# What an HF model directory holds its weights in (one of them), besides config.json
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def has_contents(path: str | Path) -> bool:
    """Whether a directory holds anything but a run's lock file (a run that failed at its start leaves only that)."""
    return any(p.name != LOCK_FILE for p in Path(path).iterdir())


def lock_run_dir(path: str | Path):
    """Hold `path/.lock` for as long as the returned file stays open (the process's lifetime, at most): a second run
    on the same directory stops here instead of interleaving its checkpoints and log with the first's."""
    import fcntl

    lock = open(Path(path) / LOCK_FILE, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise FileExistsError(f"{path} is in use by a run still going ({holder}); wait for it to finish, or choose "
                              "another output directory") from None
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    lock.flush()
    return lock


class Terminated(SystemExit):
    """SIGTERM (`kill`, scancel, a Slurm time limit) inside `sigterm_unwinds`; exits with 143 once `finally` clauses
    have run (the signal's default action ends the process on the spot: half-written files stay, children run on).
    A stage stopped by a first Ctrl-C after saving ends with it too, as 130."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(128 + signum)


@contextmanager
def sigterm_unwinds():
    """Inside the block SIGTERM raises Terminated, so that `finally` clauses run."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(_signum, _frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


class OutputDirError(OSError):
    """An output directory that cannot be made or used: a read-only file system, a name too long, no parent."""


def check_output_path(path: str | Path) -> None:
    """Refuse, before any work, an output path the system cannot even look up (a name too long, a symlink loop)."""
    try:
        Path(path).stat()
    except (FileNotFoundError, NotADirectoryError):  # made later; a file in the way is refused there
        pass
    except OSError as e:
        raise OutputDirError(f"cannot use output directory {path}: {e.strerror}; choose another --output_dir") from None


def prepare_output_dir(path: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create `path`, refusing an existing non-empty directory unless resuming or overwriting.

    With overwrite, the old contents are moved aside to `<path>.old-<time>` rather than deleted, so nothing
    already written is lost by a mistyped flag."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output path {path} exists and is a file")
    if path.is_dir() and has_contents(path) and not resume:
        if not overwrite:
            raise FileExistsError(
                f"output directory {path} already exists and is not empty; pass --resume to continue it, "
                "--overwrite to start again (the old directory is kept as a backup), or choose another --output_dir"
            )
        if holds_cwd(path):
            raise FileExistsError(f"output directory {path} is (or holds) the current directory, which --overwrite "
                                  "would move aside under your shell; choose another output directory")
        backup = move_aside(path)
        print(f"[align] moved the existing {path} to {backup}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"cannot create output directory {path}: {e.strerror} ({e.filename}); choose another "
                             "--output_dir") from None
    return path


def move_aside(path: Path) -> Path:
    """Rename `path` to `<path>.old-<time>` (`-2`, `-3`, ... after it when that name is taken within the second)."""
    stamp = f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    backup, n = path.with_name(stamp), 1
    while backup.exists():
        n += 1
        backup = path.with_name(f"{stamp}-{n}")
    os.replace(path, backup)
    return backup


def holds_cwd(path: str | Path) -> bool:
    """Whether `path` is the current directory or one above it: moving or replacing it would pull the ground from
    under the user's shell."""
    path, cwd = Path(path).resolve(), Path.cwd()
    return path == cwd or path in cwd.parents


def write_json(path: str | Path, data) -> None:
    """Write JSON to a temporary file in the same directory, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def read_log(path: Path) -> list[dict]:
    """The records of a JSON-lines log; a line cut off by a kill (or blank) is left out."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines after `step`: a killed run may have logged steps that its last checkpoint does not hold."""
    if not path.is_file():
        return
    lines = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # blank, or the last line cut off by the kill
        if record.get("step", 0) <= step:
            lines.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)

"""What the machine has: the device to train on, the precision it supports, the processes of a launch."""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
from contextlib import contextmanager

import torch


def device_type() -> str:
    """'cuda', 'mps' or 'cpu'."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def bf16_supported() -> bool:
    """bf16 autocast pays off on Ampere-or-newer GPUs; on CPU it is slower than fp32 here, so not used."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def hardware_defaults(args) -> None:
    """Set `use_cpu` and `bf16` on a transformers/TRL TrainingArguments-like object from the machine.

    TRL configs default to bf16=True, which fails on CPU; a user's explicit choice on a GPU machine is kept."""
    if device_type() == "cpu":
        args.use_cpu = True
        args.bf16 = False
        args.fp16 = False
    elif not bf16_supported():
        args.bf16 = False


def unsharded_warning(distributed_type) -> str | None:
    """What to tell the user when an FSDP or DeepSpeed accelerate config runs as plain data parallel.

    `accelerate launch` passes the config's choice on as ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED, and
    Accelerate quietly drops both on CPU processes: without a word the run would pass for a sharded one."""
    for asked in ("FSDP", "DEEPSPEED"):
        if os.environ.get(f"ACCELERATE_USE_{asked}", "").lower() == "true" and distributed_type.value != asked:
            return (f"the accelerate config asks for {asked}, but Accelerate runs CPU processes as "
                    f"{distributed_type.value} (every process holds the whole model; nothing is sharded)")
    return None


@contextmanager
def failing_together(num_processes: int):
    """Around work that some ranks do alone (the main process writing files) before all meet again: an Exception
    raised in the block on any rank is raised on every rank when the block ends, which is where they meet (a
    collective). A rank raises its own error, the others the first rank's. An error raised on one rank alone would
    leave the others waiting in the next collective, to die there with a connection traceback, not the message."""
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - handed on below, on every rank
        error = e
    if num_processes > 1:
        from accelerate.utils import gather_object

        sent = error if error is None or picklable(error) else RuntimeError(f"{type(error).__name__}: {error}")
        first = next((e for e in gather_object([sent]) if e is not None), None)
        error = error if error is not None else first
    if error is not None:
        raise error


def picklable(error: Exception) -> bool:
    try:
        pickle.loads(pickle.dumps(error))
        return True
    except Exception:  # noqa: BLE001 - exceptions whose __init__ takes other arguments than their args
        return False


class StopRequest:
    """SIGTERM, or a first Ctrl-C, while installed: noted, for the training loop to save at the end of its step and
    stop; a second Ctrl-C raises KeyboardInterrupt at once. `ctrl_c_message` is printed at the first Ctrl-C (None on
    the processes that should not print it)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, ctrl_c_message: str | None = None):
        self.signal: str | None = None  # "SIGTERM" or "SIGINT": this process's, or another rank's once agreed
        self.ctrl_c_message = ctrl_c_message
        self.previous = {}

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self.previous = {sig: signal.signal(sig, self.note) for sig in self.SIGNALS}
        return self

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def note(self, signum, _frame):
        if signum == signal.SIGINT and self.signal == "SIGINT":
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if signum == signal.SIGINT and self.ctrl_c_message:
            sys.stderr.write(f"\n{self.ctrl_c_message}\n")

    def agreed(self, num_processes: int, device) -> str | None:
        """The signal every rank stops for now, or None: a vote (an all-reduce) under several processes. A signal
        that arrives after this rank's vote counts at the next one: acted on alone, this rank would save or stop while
        the others go on into the next collective."""
        if num_processes == 1:
            return self.signal
        from accelerate.utils import reduce

        if reduce(torch.tensor(float(self.signal is not None), device=device), "max").item() == 0:
            return None
        self.signal = self.signal or "SIGTERM"  # another rank's
        return self.signal

"""What the machine has: the device to train on, the precision it supports, the processes of a launch."""

from __future__ import annotations

import os

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


def raise_on_every_rank(error: Exception | None, num_processes: int) -> None:
    """Raise the first rank's error on every rank (each passes its own, or None). An error raised on one rank alone
    leaves the others waiting in the next collective, where they die with a connection traceback, not the message."""
    if num_processes > 1:
        from accelerate.utils import gather_object

        error = next((e for e in gather_object([error]) if e is not None), None)
    if error is not None:
        raise error

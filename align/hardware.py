"""What the machine has: the device to train on and the precision it supports."""

from __future__ import annotations

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

"""Pretraining: the from-scratch GPT on token shards, one linear loop under Accelerate."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.data.corpus import DataError, check_sources
from align.data.prepare import DataConfig, adapt_tokenizer, cache_key, prepare_data, resolve_data_dir
from align.data.shards import TOKENIZER_DIR, BatchLoader, TokenShards, load_data_tokenizer, shards_digest
from align.hardware import StopRequest, bf16_supported, device_type, failing_together, unsharded_warning
from align.model.config import PRESETS, GPTConfig, preset
from align.model.gpt import GPT
from align.model.hf import CONFIG_FILE, WEIGHTS_FILE, export, load_checkpoint
from align.recipe import RECIPE_FILE, parse_recipe, save_recipe
from align.runs import (OutputDirError, Terminated, check_output_path, has_contents, holds_cwd, lock_run_dir,
                        prepare_output_dir, read_log, truncate_log, write_json)

LOG_FILE = "train_log.jsonl"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"
VAL_SEED = 1234
# Dense bf16 tensor-core peaks (FLOP/s) for MFU; other devices use a matmul peak measured at startup. The first key
# found in torch's device name wins ("NVIDIA H100 80GB HBM3", "NVIDIA H200 NVL"), so a variant precedes its family.
GPU_BF16_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "GH200": 989e12, "H100": 989e12,
                 "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "A10G": 125e12, "L4": 121e12,
                 "RTX 4090": 165e12, "RTX 3090": 71e12}


@dataclass
class PretrainConfig:
    output_dir: str = field(default="runs/pretrain", metadata={"help": "run directory (logs, checkpoints, hf/)"})
    model: str = field(default="tiny", metadata={"help": f"preset {sorted(PRESETS)} or a gpt_config.json path"})
    init_from: str | None = field(
        default=None, metadata={"help": "continue from an HF model directory (Llama/GPT-2) or an align checkpoint"}
    )
    block_size: int = field(default=128, metadata={"help": "training sequence length (<= the model's block_size)"})
    batch_size: int = field(default=32, metadata={"help": "global batch in sequences per optimizer step"})
    micro_batch_size: int = field(
        default=0, metadata={"help": "sequences per device per micro-step (0: batch_size / processes, no accumulation)"}
    )
    max_steps: int = field(default=300, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to learning_rate * min_lr_ratio"})
    warmup_steps: int = field(default=30, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices and embeddings only)"})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    eval_steps: int = field(default=50, metadata={"help": "validate every N steps (and at the end)"})
    eval_batches: int = field(default=8, metadata={"help": "validation size in global batches"})
    save_steps: int = field(default=100, metadata={"help": "checkpoint every N steps (and at the end)"})
    save_total_limit: int = field(default=2, metadata={"help": "keep the last N checkpoints"})
    seed: int = field(default=0, metadata={"help": "model init, data order and dropout"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest complete checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "move an existing output_dir aside and start again"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 where supported, else fp32), bf16 or fp32"})
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute blocks in backward"})
    report_to: str = field(default="none", metadata={"help": "none, tensorboard or wandb"})
    peak_flops: float = field(
        default=0.0, metadata={"help": "per-device peak FLOP/s for MFU (0: a known GPU's, or measured at start)"}
    )


class ConfigError(ValueError):
    """A recipe value that cannot work; the message names the field and what to do."""


class TrainState:
    """The step counter and token count, saved with Accelerate's state (the lr schedule is a function of step)."""

    def __init__(self):
        self.step, self.tokens = 0, 0

    def state_dict(self):
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state):
        self.step, self.tokens = int(state["step"]), int(state["tokens"])


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to learning_rate * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    ratio = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.learning_rate * ratio


def measure_matmul_flops(device, dtype=torch.float32, n: int | None = None, seconds: float = 0.5) -> float:
    """Achieved FLOP/s of an n x n matmul on this device (MFU is measured against it where no peak is known).

    The best of several short bursts, so that other processes busy on a shared machine bias it less."""
    n = n or (8192 if device.type == "cuda" else 1024)
    # Its own generator: drawing from the global one would shift a resumed run's dropout masks.
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = 0.0
    for _ in range(5):
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 5:
            a @ b
            iters += 1
        sync()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    return best


def peak_flops(device, dtype) -> float:
    if device.type == "cuda" and dtype == torch.bfloat16:
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_BF16_PEAK.items():
            if key in name:
                return value
    return measure_matmul_flops(device, dtype)


# ------------------------------------------------------------------------------------------------------------------
# Setup: config checks, the model, the optimizer, checkpoints


def check_config(cfg: PretrainConfig) -> None:
    for name in ("block_size", "batch_size", "max_steps", "eval_steps", "eval_batches", "save_steps",
                 "save_total_limit"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("learning_rate", "min_lr_ratio", "weight_decay", "max_grad_norm", "adam_beta1", "adam_beta2",
                 "peak_flops"):
        if not math.isfinite(getattr(cfg, name) or 0.0):
            raise ConfigError(f"{name} must be a finite number, got {getattr(cfg, name)}")
    if cfg.micro_batch_size < 0 or cfg.warmup_steps < 0 or cfg.max_grad_norm < 0:
        raise ConfigError("micro_batch_size, warmup_steps and max_grad_norm must not be negative")
    if cfg.learning_rate <= 0 or not 0 <= cfg.min_lr_ratio <= 1:
        raise ConfigError(f"learning_rate must be > 0 and min_lr_ratio in [0, 1], got {cfg.learning_rate}, "
                          f"{cfg.min_lr_ratio}")
    if not (0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1):
        raise ConfigError(f"adam_beta1 and adam_beta2 must be in [0, 1), got {cfg.adam_beta1}, {cfg.adam_beta2}")
    if cfg.weight_decay < 0 or (cfg.peak_flops or 0) < 0:
        raise ConfigError(f"weight_decay and peak_flops must not be negative, got {cfg.weight_decay}, "
                          f"{cfg.peak_flops}")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {cfg.seed}")
    if cfg.overwrite and holds_cwd(cfg.output_dir):
        raise ConfigError(f"--overwrite would move aside output_dir {cfg.output_dir}, the current directory (or one "
                          "holding it); give another output_dir")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: pass one")
    from accelerate.utils import LoggerType

    trackers = sorted({"none", *(t.value for t in LoggerType)})
    if cfg.report_to not in trackers:
        raise ConfigError(f"report_to must be one of {', '.join(trackers)}, got {cfg.report_to!r}")
    import importlib.util

    modules = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
               "comet_ml": ("comet_ml",), "aim": ("aim",), "clearml": ("clearml",), "dvclive": ("dvclive",),
               "trackio": ("trackio",), "swanlab": ("swanlab",)}
    needed = modules.get(cfg.report_to, ())
    if needed and not any(importlib.util.find_spec(m) for m in needed):
        raise ConfigError(f"report_to {cfg.report_to}: the {needed[0]} package is not installed (pip install "
                          f"{needed[0]}), and Accelerate would log nothing")


def find_tokenizer_dir(path: Path) -> Path | None:
    for candidate in (path, path / "tokenizer", path.parent / "tokenizer", path.parent.parent / "tokenizer"):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    return None


def use_init_tokenizer(cfg: PretrainConfig, data_cfg: DataConfig) -> None:
    """Continued pretraining tokenizes with init_from's tokenizer unless the recipe names one."""
    if cfg.init_from and not data_cfg.tokenizer:
        found = find_tokenizer_dir(Path(cfg.init_from))
        if found is None:
            raise ConfigError(f"init_from {cfg.init_from} has no tokenizer.json (nor a tokenizer/ beside it); "
                              "set `tokenizer` to the model's tokenizer")
        data_cfg.tokenizer = str(found)


def model_config(cfg: PretrainConfig) -> GPTConfig:
    """The architecture, before the vocabulary is known (vocab_size comes from the tokenizer)."""
    if cfg.init_from:
        src = Path(cfg.init_from)
        if (src / "config.json").is_file():  # an HF directory (an exported one also holds a gpt_config.json)
            from transformers import AutoConfig

            from align.model.hf import gpt_config_from_hf

            return gpt_config_from_hf(AutoConfig.from_pretrained(src))
        if (src / CONFIG_FILE).is_file():
            return GPTConfig.load(src / CONFIG_FILE)
        if not src.exists():
            raise ConfigError(f"init_from {src} does not exist")
        raise ConfigError(f"init_from {src}: no {CONFIG_FILE} (align checkpoint) or config.json (HF model) there")
    if cfg.model in PRESETS:
        return preset(cfg.model)
    if Path(cfg.model).is_file():
        try:
            return GPTConfig.load(cfg.model)
        except ValueError as e:  # unreadable JSON, or fields that do not make a model
            raise ConfigError(str(e)) from e  # the message names the file
    raise ConfigError(f"model {cfg.model!r} is neither a preset ({', '.join(PRESETS)}) nor a gpt_config.json file")


def build_model(cfg: PretrainConfig, arch: GPTConfig, tokenizer, log=print) -> GPT:
    from align.tokenizer import id_limit

    if not cfg.init_from:
        arch.vocab_size = 64 * math.ceil(id_limit(tokenizer) / 64)  # a multiple of 64 keeps the LM-head matmul fast
        return GPT(GPTConfig.from_dict(arch.to_dict()))
    src = Path(cfg.init_from)
    if (src / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        from align.model.hf import from_hf

        model = from_hf(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32))
    else:
        model = load_checkpoint(src)
    vocab = model.config.vocab_size
    if id_limit(tokenizer) > vocab:
        beyond = {i: t for t, i in tokenizer.get_vocab().items() if i >= vocab}
        special = set(tokenizer.all_special_tokens)
        if not set(beyond.values()) <= special:
            raise ConfigError(f"the tokenizer has token ids up to {id_limit(tokenizer) - 1} but init_from {src} has "
                              f"vocab_size {vocab}: it is not the model's tokenizer")
        # The pad and role tokens align adds to a tokenizer (HF checkpoints often have no spare rows for them).
        # Exactly as many rows as the tokenizer needs: rows past its ids, mean-initialised like the new ones, would
        # take probability mass from the real tokens and raise the loss the run starts from (no rounding to 64).
        grow_vocab(model, id_limit(tokenizer))
        log(f"[pretrain] init_from {src}: vocabulary grown from {vocab} to {model.config.vocab_size} rows for the "
            f"special tokens added to its tokenizer ({', '.join(beyond[i] for i in sorted(beyond))}); the new rows "
            "start as the mean of the existing ones")
    return model.train()


def grow_vocab(model: GPT, vocab_size: int) -> None:
    """Give the embedding (and an untied LM head) rows for new token ids, each the mean of the existing rows."""
    def grown(weight: torch.Tensor) -> torch.nn.Parameter:
        extra = weight.mean(dim=0, keepdim=True).expand(vocab_size - weight.size(0), -1)
        return torch.nn.Parameter(torch.cat([weight.detach(), extra]))

    model.wte.weight = grown(model.wte.weight)
    model.lm_head.weight = model.wte.weight if model.config.tie_embeddings else grown(model.lm_head.weight)
    model.wte.num_embeddings = model.lm_head.out_features = vocab_size
    model.config.vocab_size = vocab_size


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig, device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only; the fused kernel where the device has one."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2]}, {"params": [p for p in params if p.dim() < 2]}]
    try:
        optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=device.type in ("cuda", "cpu"))
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
    return set_optimizer_settings(optimizer, cfg)


def set_optimizer_settings(optimizer: torch.optim.AdamW, cfg: PretrainConfig) -> torch.optim.AdamW:
    """The recipe's betas and weight decay (none on gains and biases, the second group). Applied again after a
    resume, which loads the checkpoint's own into the optimizer; the learning rate is set at every step."""
    for i, group in enumerate(optimizer.param_groups):
        decay = cfg.weight_decay if i == 0 else 0.0
        group.update(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-8, weight_decay=decay)
    return optimizer


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A checkpoint is renamed from its temporary name only once everything
    is written; a step directory without our own files (written last) was damaged or made by hand, and is passed
    over."""
    return [d for d in step_dirs(output_dir) if (d / CONFIG_FILE).is_file() and (d / WEIGHTS_FILE).is_file()]


def step_dirs(output_dir: Path) -> list[Path]:
    """checkpoints/step-N directories, oldest first; a copy named otherwise (step-N.bak) is the user's."""
    root = output_dir / CHECKPOINTS
    found = [d for d in root.iterdir() if d.is_dir() and re.fullmatch(r"step-\d+", d.name)] if root.is_dir() else []
    return sorted(found, key=step_number)  # by number: names of 7 digits (step 1,000,000 on) sort before 6


def step_number(step_dir: Path) -> int:
    return int(step_dir.name.removeprefix("step-"))


def save_checkpoint(accelerator, model, output_dir: Path, step: int, keep: int) -> Path:
    """Accelerate's full state plus gpt_config.json + model.safetensors (readable by load_checkpoint / export)."""
    from accelerate.utils import DistributedType
    from safetensors.torch import save_file

    root = output_dir / CHECKPOINTS
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    with failing_together(accelerator.num_processes):
        if accelerator.is_main_process:
            for leftover in root.glob(".tmp-step-*"):  # saves cut short (killed); the run's lock keeps others out
                shutil.rmtree(leftover, ignore_errors=True)
            tmp.mkdir(parents=True)
    try:
        with failing_together(accelerator.num_processes):  # every rank has written its files (its RNG state) or none
            accelerator.save_state(str(tmp))
        full = None
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            full = accelerator.get_state_dict(model)  # a collective: gathers the sharded weights on the main process
        with failing_together(accelerator.num_processes):  # a full disk on the main process stops every rank
            if accelerator.is_main_process:
                unwrapped = accelerator.unwrap_model(model)
                unwrapped.config.save(tmp / CONFIG_FILE)
                if full is not None or not (tmp / WEIGHTS_FILE).is_file():
                    state = {k: v.detach().cpu().contiguous() for k, v in (full or unwrapped.state_dict()).items()}
                    if unwrapped.config.tie_embeddings:
                        state.pop("lm_head.weight", None)
                    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
                if final.exists():  # a damaged one the resume passed over (or a run past the end): kept, not deleted
                    os.replace(final, final.with_name(f"{final.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"))
                os.replace(tmp, final)
    except BaseException:  # a second Ctrl-C, a full disk: no partial copy of the model and optimizer left behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    with failing_together(accelerator.num_processes):
        if accelerator.is_main_process:
            for old in checkpoint_dirs(output_dir)[:-keep]:  # renamed first: a kill mid-delete leaves no step-N behind
                os.replace(old, root / f".deleting-{old.name}")
            for leftover in root.glob(".deleting-*"):  # also what an earlier, killed run left
                shutil.rmtree(leftover, ignore_errors=True)
    return final


def weights_finite(model, accelerator) -> bool:
    local = all(bool(p.isfinite().all()) for p in model.parameters())
    flag = torch.tensor(float(local), device=accelerator.device)
    return accelerator.reduce(flag, "min").item() > 0 if accelerator.num_processes > 1 else local


# ------------------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: PretrainConfig, data_cfg: DataConfig) -> dict:
    """Pretrain as the recipe says; returns the final metrics (also written to output_dir/metrics.json)."""
    with contextlib.ExitStack() as held:  # what the run holds until it returns or fails: its directory's lock
        return _train(cfg, data_cfg, held)


def _train(cfg: PretrainConfig, data_cfg: DataConfig, held: contextlib.ExitStack) -> dict:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from align.tokenizer import tokenizer_hash

    check_config(cfg)
    check_sources(data_cfg.sources)  # on every rank, so that all of them stop on a missing file, not only the first
    arch = model_config(cfg)
    if cfg.block_size > arch.block_size:
        source = cfg.init_from or cfg.model
        raise ConfigError(
            f"block_size {cfg.block_size} is larger than the model's block_size {arch.block_size} ({source}); "
            f"lower --block_size to at most {arch.block_size} or use a model with a longer context"
        )
    output_dir = Path(cfg.output_dir)
    check_output_path(output_dir)
    if output_dir.is_dir() and has_contents(output_dir) and not (cfg.resume or cfg.overwrite):
        prepare_output_dir(output_dir)  # raises the standard "exists; --resume or --overwrite" error
    use_init_tokenizer(cfg, data_cfg)
    data_home = resolve_data_dir(data_cfg, cache_key(data_cfg)[0]).resolve()
    if not cfg.resume and (data_home == output_dir.resolve() or output_dir.resolve() in data_home.parents):
        # A new run needs output_dir empty, which its own data would not leave it; --overwrite would move it aside
        raise ConfigError(f"the data directory {data_home} is inside output_dir {output_dir}, which a new run needs "
                          "empty and --overwrite moves aside; set data_dir (or ALIGN_HOME) to a directory outside it")

    use_cpu = device_type() == "cpu"
    state = PartialState(cpu=use_cpu)
    world = state.num_processes
    micro = cfg.micro_batch_size or cfg.batch_size // world
    if micro == 0 or cfg.batch_size % (micro * world):
        raise ConfigError(
            f"batch_size {cfg.batch_size} must be a multiple of micro_batch_size {micro} x {world} processes"
        )
    grad_accum = cfg.batch_size // (micro * world)
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher_precision == "fp16":
        raise ConfigError("fp16 is not supported (loss scaling would trip the non-finite check): use bf16 or 'no' "
                          "in the accelerate config")
    # auto: what the accelerate config asks for when it asks for bf16 (DeepSpeed insists), else bf16 where supported
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and (launcher_precision == "bf16" or bf16_supported()))
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_steps=grad_accum,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(output_dir),
    )
    if accelerator.state.deepspeed_plugin is not None:  # DeepSpeed sizes its buffers from this; no DataLoader here
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro
    main = accelerator.is_main_process
    log = print if main else (lambda *a, **k: None)
    if unsharded := unsharded_warning(accelerator.distributed_type):
        log(f"[pretrain] warning: {unsharded}")
    # Accelerate warns on every save that it dropped lm_head.weight, which is tied to wte.weight: expected here.
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # The local main process prepares the data, then the others find it.
    with failing_together(world):
        if accelerator.is_local_main_process:
            data_dir = prepare_data(data_cfg, log=log)
    if not accelerator.is_local_main_process:
        data_dir = prepare_data(data_cfg, log=log)
    tokenizer = load_data_tokenizer(data_dir)
    tok_hash = tokenizer_hash(tokenizer)
    data_digest = shards_digest(data_dir)
    if world > 1:  # each rank found its data itself: a source edited meanwhile gives it another cache key and tokens
        from accelerate.utils import gather_object

        seen = gather_object([(accelerator.process_index, str(data_dir), data_digest)])
        if len({digest for _, _, digest in seen}) > 1:
            raise DataError("the processes prepared different data (a source changed while the run started): "
                            + "; ".join(f"rank {r}: {d} (tokens {digest})" for r, d, digest in seen)
                            + ". Leave the sources unchanged while a run starts, or run `align prepare-data` first")
    if cfg.init_from:
        init_tok = adapt_tokenizer(AutoTokenizer.from_pretrained(data_cfg.tokenizer))
        if tokenizer_hash(init_tok) != tok_hash:
            raise DataError(f"the shards in {data_dir} were not made with the tokenizer of init_from {cfg.init_from}; "
                            "leave data_dir unset (or point it at data prepared with that tokenizer)")
    train_data = BatchLoader(TokenShards(data_dir, "train", tok_hash), cfg.block_size, cfg.batch_size, cfg.seed)
    # Validation windows: a fixed sample spread over the whole split (whatever the training seed), so val_loss is
    # comparable between runs and covers every source, not just the first one in the file.
    val_data = BatchLoader(TokenShards(data_dir, "val", tok_hash), cfg.block_size, cfg.batch_size, seed=VAL_SEED)
    # Only now, with the data known to be good, is an existing run moved aside (--overwrite) or continued.
    problem = [None]  # the main process's, raised on every rank: none may wait alone in a collective
    if main:
        try:
            if output_dir.is_dir():  # before --overwrite moves it aside: not from under a run still writing to it
                lock_run_dir(output_dir).close()
            prepare_output_dir(output_dir, overwrite=cfg.overwrite, resume=cfg.resume)
            held.enter_context(lock_run_dir(output_dir))  # a second run on this directory stops with an error
        except OSError as e:  # in use, a file, read-only
            problem = [e]
    if world > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(problem)
    if problem[0] is not None:
        raise problem[0]

    set_seed(cfg.seed)
    model = build_model(cfg, arch, tokenizer, log)
    model.activation_checkpointing = cfg.activation_checkpointing
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = model.config.flops_per_token(cfg.block_size)
    optimizer = make_optimizer(model, cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.torch_compile:
        # In place and after wrapping (DDP/FSDP): parameter names, and so checkpoints, stay the plain model's.
        accelerator.unwrap_model(model).compile()
    train_state = TrainState()
    accelerator.register_for_checkpointing(train_state)

    log_path = output_dir / LOG_FILE
    if cfg.resume:
        ckpts = checkpoint_dirs(output_dir)
        for skipped in step_dirs(output_dir):
            if skipped not in ckpts and (not ckpts or step_number(skipped) > step_number(ckpts[-1])):
                log(f"[pretrain] warning: passing over {skipped}: no {CONFIG_FILE} + {WEIGHTS_FILE} (incomplete)")
        if ckpts:
            check_resumable(ckpts[-1], output_dir, accelerator.unwrap_model(model), tok_hash)
            load_latest_checkpoint(accelerator, ckpts, log)
            # Accelerate restores its micro-step count, which decides when `accumulate` steps the optimizer; with
            # another accumulation count now (micro_batch_size, batch_size or processes changed) it would step
            # mid-batch. Each optimizer step is grad_accum micro-steps of this run.
            accelerator.step = train_state.step * grad_accum
            set_optimizer_settings(optimizer, cfg)
            log(f"[pretrain] resumed from {ckpts[-1]} (step {train_state.step})")
            if train_state.step > cfg.max_steps:
                raise ConfigError(
                    f"--resume: {ckpts[-1]} is at step {train_state.step}, past --max_steps {cfg.max_steps}: the run "
                    f"was started with more steps (see {output_dir / RECIPE_FILE}); pass its --max_steps to finish it"
                )
            if train_state.step == cfg.max_steps:
                log(f"[pretrain] the checkpoint is at step {train_state.step} = --max_steps {cfg.max_steps}: "
                    "nothing left to train; writing the export and metrics again (raise --max_steps to go on)")
        else:
            log(f"[pretrain] --resume: no complete checkpoint in {output_dir / CHECKPOINTS}; starting at step 0")
        accelerator.wait_for_everyone()  # every rank has read the run's tokenizer before the main one writes it again
        if main:
            truncate_log(log_path, train_state.step)
    if main:
        notes = {"data prepared in": data_dir, "data digest": data_digest}
        if cfg.resume and (output_dir / RECIPE_FILE).is_file():
            changed = _report_changes(output_dir / RECIPE_FILE, cfg, data_cfg, log)
            trained_on = _noted(output_dir / RECIPE_FILE, "data digest")  # None for a run from before digests
            if trained_on and trained_on != data_digest:  # a digest from before data format 4, of the same tokens?
                from align.tokenizer import legacy_tokenizer_hash

                if trained_on == shards_digest(data_dir, tokenizer_key=legacy_tokenizer_hash(tokenizer)):
                    trained_on = data_digest
            if trained_on and trained_on != notes["data digest"] and train_state.step > 0:
                log(f"[pretrain] warning: the data changed since this run started (tokens {trained_on}, now "
                    f"{notes['data digest']} in {data_dir}): from step {train_state.step} on it trains on the new "
                    "shards, not the batches it would have seen (restore the sources to resume on the old data)")
                changed.append(f"data digest {trained_on} -> {notes['data digest']}")
            if changed:  # the file then describes the run from this step on, and says so
                notes[f"resumed at step {train_state.step} with changed settings"] = ", ".join(changed)
        # resume/overwrite say how this invocation treats the directory, not what the run is
        save_recipe(output_dir, cfg, data_cfg, notes=notes, skip=("resume", "overwrite"))
        tokenizer.save_pretrained(output_dir / TOKENIZER_DIR)
    if cfg.report_to != "none":
        # After a resume, TensorBoard drops what the interrupted run logged past the checkpoint instead of
        # showing those steps twice.
        accelerator.init_trackers("pretrain", init_kwargs={"tensorboard": {"purge_step": train_state.step + 1}})

    dtype = torch.bfloat16 if bf16 else torch.float32
    peak = cfg.peak_flops or peak_flops(accelerator.device, dtype)
    tokens_per_step = cfg.batch_size * cfg.block_size
    log(
        f"[pretrain] {n_params / 1e6:.2f}M parameters, {world} process(es) x {micro} sequences x {grad_accum} "
        f"micro-steps x {cfg.block_size} tokens = {tokens_per_step:,} tokens/step, {dtype}, "
        f"device {accelerator.device} ({accelerator.distributed_type.value}), peak {peak / 1e9:.0f} GFLOP/s per device"
    )
    if cfg.init_from:
        log(f"[pretrain] the architecture is init_from's ({cfg.init_from}); model {cfg.model!r} is not used")
    if cfg.eval_batches * cfg.batch_size > val_data.n_windows:
        log(f"[pretrain] note: eval_batches {cfg.eval_batches} x batch_size {cfg.batch_size} = "
            f"{cfg.eval_batches * cfg.batch_size} windows, but the val split holds {val_data.n_windows} of "
            f"block_size {cfg.block_size}: val_loss counts some of its tokens more than once ("
            + (f"set eval_batches to {val_data.n_windows // cfg.batch_size} or less, or raise val_fraction)"
               if val_data.n_windows >= cfg.batch_size else "it holds fewer than one batch: raise val_fraction)"))
    if cfg.warmup_steps > cfg.max_steps:
        log(f"[pretrain] note: warmup_steps {cfg.warmup_steps} > max_steps {cfg.max_steps}, so the learning rate "
            f"never reaches {cfg.learning_rate:g}")

    def evaluate() -> float:
        model.eval()
        total = torch.zeros((), device=accelerator.device)
        with torch.no_grad():
            for b in range(cfg.eval_batches):
                for m in range(grad_accum):
                    x, y = val_data.batch(b, m, micro, accelerator.process_index, world, accelerator.device)
                    with accelerator.autocast():
                        total += model(x, y)[1].float()
        model.train()
        return accelerator.reduce(total / (cfg.eval_batches * grad_accum), "mean").item()

    # SIGTERM or a first Ctrl-C: save at the end of this step and exit; a second Ctrl-C: now
    stop = StopRequest("[pretrain] Ctrl-C: saving a checkpoint after this step (Ctrl-C again to stop at once)"
                       if main else None).install()
    recent, last_val, rates, saved_step = [], None, [], -1
    started = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=train_state.step, desc="pretrain", unit="step", disable=not main)
    model.train()
    try:
        while train_state.step < cfg.max_steps:
            step = train_state.step
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=accelerator.device)
            grad_norm = None
            for m in range(grad_accum):
                x, y = train_data.batch(step, m, micro, accelerator.process_index, world, accelerator.device)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        _, loss = model(x, y, return_logits=False)
                    accelerator.backward(loss)  # Accelerate divides by the accumulation steps
                    loss_sum += loss.detach().float()
                    if accelerator.sync_gradients:
                        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")  # inf: measure only
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                        step_loss = accelerator.reduce(loss_sum / grad_accum, "mean").item()
                        norm = float(grad_norm) if grad_norm is not None else 0.0  # None under DeepSpeed
                        if not (math.isfinite(step_loss) and math.isfinite(norm)):
                            raise FloatingPointError(_nonfinite_message(step + 1, step_loss, norm, lr, output_dir))
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            train_state.step += 1
            train_state.tokens += tokens_per_step
            rate = tokens_per_step / dt
            rates.append(rate)
            recent = (recent + [step_loss])[-10:]
            record = {
                "step": train_state.step, "loss": round(step_loss, 6), "lr": float(f"{lr:.6g}"),
                "grad_norm": round(norm, 6) if grad_norm is not None else None,
                "tokens_per_sec": round(rate, 1), "mfu": round(flops_per_token * rate / (peak * world), 4),
                "tokens": train_state.tokens, "elapsed_s": round(time.perf_counter() - started, 2),
            }
            if train_state.step % cfg.eval_steps == 0 or train_state.step == cfg.max_steps:
                last_val = evaluate()
                record.update(val_loss=round(last_val, 6), val_ppl=round(math.exp(min(last_val, 50)), 4))
                if main:  # tqdm.write prints on every rank, the bar only on the main one
                    bar.write(f"step {train_state.step}: loss {step_loss:.4f}, val_loss {last_val:.4f}")
            if main:
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if cfg.report_to != "none":
                accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None},
                                step=train_state.step)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{rate:,.0f}")
            stopping = stop.agreed(world, accelerator.device)  # every rank stops at the same step
            if train_state.step % cfg.save_steps == 0 or train_state.step == cfg.max_steps or stopping:
                if not weights_finite(model, accelerator):  # a checkpoint is never saved with inf/nan weights
                    raise FloatingPointError(_nonfinite_message(train_state.step, step_loss, norm, lr, output_dir,
                                                                what="weights after the optimizer step"))
                ckpt = save_checkpoint(accelerator, model, output_dir, train_state.step, cfg.save_total_limit)
                saved_step = train_state.step
                stopping = stopping or stop.agreed(world, accelerator.device)  # a signal during the save
            if stopping:
                bar.close()
                log(f"[pretrain] {stopping}: saved {ckpt} at step {train_state.step} of {cfg.max_steps}; "
                    f"continue with the same command and --resume (keeping --max_steps {cfg.max_steps})")
                return {"stopped_at": train_state.step, "checkpoint": str(ckpt), "signal": stopping}
    finally:
        bar.close()
        stop.restore()
        if cfg.report_to != "none":  # not end_training(): it also destroys the process group the export needs
            for tracker in accelerator.trackers:
                tracker.finish()

    ckpts = checkpoint_dirs(output_dir)
    if saved_step != cfg.max_steps and (not ckpts or ckpts[-1].name != f"step-{cfg.max_steps:06d}"):
        save_checkpoint(accelerator, model, output_dir, train_state.step, cfg.save_total_limit)
    if last_val is None:
        last_val = evaluate()
    if log_path.is_file():  # the run's whole log: after a resume the summary covers what an uninterrupted run's does
        logged = read_log(log_path)
        recent = [r["loss"] for r in logged[-10:]] or recent
        rates = rates or [r["tokens_per_sec"] for r in logged]
    steady = rates[1:] or rates
    metrics = {
        "train_loss": round(sum(recent) / len(recent), 6) if recent else None,
        "val_loss": last_val,
        "val_ppl": math.exp(min(last_val, 50)),
        "tokens_seen": train_state.tokens,
        "steps": train_state.step,
        "parameters": n_params,
        "tokens_per_sec": sum(steady) / len(steady) if steady else None,
        "mfu": flops_per_token * (sum(steady) / len(steady)) / (peak * world) if steady else None,
        "processes": world,
        "runtime_s": round(time.perf_counter() - started, 1),
        "data_dir": str(data_dir),
    }
    with failing_together(world):
        if main:
            write_json(output_dir / METRICS_FILE, metrics)
            final_model = load_checkpoint(checkpoint_dirs(output_dir)[-1])
            extra = {METRICS_FILE: json.dumps(metrics, indent=2) + "\n",
                     RECIPE_FILE: (output_dir / RECIPE_FILE).read_text()}
            export(final_model, tokenizer, output_dir / "hf", overwrite=True, extra_files=extra)
            log(f"[pretrain] done: train_loss {metrics['train_loss']:.4f}, val_loss {last_val:.4f} "
                f"(ppl {metrics['val_ppl']:.2f}), {train_state.tokens:,} tokens -> {output_dir / 'hf'}")
            if metrics["mfu"] and metrics["mfu"] > 1 and not cfg.peak_flops:
                log(f"[pretrain] note: mfu {metrics['mfu']:.0%} is above 100%: the matmul peak measured at the start "
                    f"({peak / 1e9:.0f} GFLOP/s) came out low, as on a machine busy at that moment; pass --peak_flops "
                    "for a fixed reference")
    return metrics


def check_resumable(ckpt: Path, output_dir: Path, model: GPT, tok_hash: str) -> None:
    """A run continues only with the architecture and the tokenizer its checkpoints were trained with."""
    from transformers import AutoTokenizer

    from align.tokenizer import tokenizer_hash

    try:
        saved = GPTConfig.load(ckpt / CONFIG_FILE).to_dict()
    except ValueError as e:
        raise ConfigError(f"--resume: cannot load {ckpt} ({e}); move it aside to resume from the one before") from e
    now = model.config.to_dict()
    changed = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in saved if saved[k] != now.get(k)]
    if changed:
        raise ConfigError(
            f"--resume: {ckpt} holds another model than the recipe now builds ({', '.join(changed)}); resume with "
            f"the settings it was trained with ({output_dir / RECIPE_FILE}), or start a new --output_dir"
        )
    run_tokenizer = output_dir / TOKENIZER_DIR
    try:
        trained_with = (tokenizer_hash(AutoTokenizer.from_pretrained(run_tokenizer))
                        if (run_tokenizer / "tokenizer.json").is_file() else tok_hash)
    except Exception as e:  # a damaged copy: json, tokenizers and transformers each fail in their own way
        raise DataError(f"--resume: the run's tokenizer in {run_tokenizer} cannot be loaded ({type(e).__name__}: "
                        f"{e}); restore it (the data's own is in data_dir/{TOKENIZER_DIR}) or delete it") from None
    if trained_with != tok_hash:
        raise DataError(
            f"--resume: the run was trained with the tokenizer in {run_tokenizer}, but the data settings now give "
            "another one (token ids would change meaning mid-run); resume with the data settings it was trained "
            f"with ({output_dir / RECIPE_FILE}), or start a new --output_dir"
        )


def load_latest_checkpoint(accelerator, ckpts: list[Path], log) -> None:
    previous = (f"move it aside to resume from {ckpts[-2].name}" if len(ckpts) > 1
                else "no earlier checkpoint is kept: start again with --overwrite")
    # One RNG state per process that saved it. The same check on every rank (all read the same directory), so
    # that no rank fails alone and leaves the others waiting in a collective.
    names = (re.fullmatch(r"random_states_(\d+)\.pkl", f.name) for f in ckpts[-1].iterdir())
    saved = sorted(int(m.group(1)) for m in names if m)
    if saved != list(range(len(saved))) or not saved:  # Accelerate would go on without them, silently
        found = ", ".join(f"random_states_{r}.pkl" for r in saved) or "none"
        raise ConfigError(f"--resume: {ckpts[-1]} lacks random states (found: {found}); {previous}")
    if len(saved) != accelerator.num_processes:
        log(f"[pretrain] note: {ckpts[-1].name} was saved by {len(saved)} process(es), this run has "
            f"{accelerator.num_processes}: the batches are the same, but each process's random stream (dropout) "
            "does not continue as it would have, so a model with dropout will not repeat the run bit for bit")
    try:
        accelerator.load_state(str(ckpts[-1]))
    except Exception as e:  # torch, safetensors and accelerate each fail in their own way on a damaged file
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 300 else reason[:300] + "..."
        raise ConfigError(f"--resume: cannot load {ckpts[-1]} ({type(e).__name__}: {reason}); {previous}") from e


def _report_changes(recipe_path: Path, cfg: PretrainConfig, data_cfg: DataConfig, log) -> list[str]:
    """A resumed run with other settings than the run it continues is allowed (e.g. more steps), but said."""
    import dataclasses

    import yaml

    try:
        old = yaml.safe_load(recipe_path.read_text())
        reason = "not a mapping of setting: value"
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        old, reason = None, f"{type(e).__name__}: {' '.join(str(e).split())}"
    if not isinstance(old, dict):  # the checkpoints, not this file, decide what may resume; the run goes on
        log(f"[pretrain] note: {recipe_path} cannot be read ({reason}), so changed settings cannot be reported; "
            "it is written again now")
        return []
    new = {**dataclasses.asdict(data_cfg), **dataclasses.asdict(cfg)}
    # output_dir is the directory being resumed, however spelt (a relative path, a copied run): not a setting
    changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in sorted(new) if k in old and old[k] != new[k]
               and k not in ("resume", "overwrite", "output_dir")]
    if changed:
        log(f"[pretrain] resuming with changed settings: {', '.join(changed)}")
    return changed


def _noted(recipe_path: Path, key: str) -> str | None:
    """A note save_recipe wrote into recipe.yaml as a `# key: value` comment."""
    for line in recipe_path.read_text(errors="replace").splitlines():
        if line.startswith(f"# {key}: "):
            return line[len(f"# {key}: "):]
    return None


def _nonfinite_message(step: int, loss: float, grad_norm: float, lr: float, output_dir: Path,
                       what: str | None = None) -> str:
    what = what or ("loss" if not math.isfinite(loss) else "gradient norm")
    ckpts = checkpoint_dirs(output_dir)
    losses = {r["step"]: r["loss"] for r in read_log(output_dir / LOG_FILE) if "step" in r and "loss" in r}
    if not ckpts:
        advice = ("no checkpoint was saved yet. Lower --learning_rate, raise --warmup_steps or set --max_grad_norm, "
                  "and start again")
    else:
        saved_at = step_number(ckpts[-1])
        best = min(losses.items(), key=lambda kv: kv[1]) if losses else None
        history = (f" (logged loss {losses[saved_at]:.4g} at its step, lowest {best[1]:.4g} at step {best[0]})"
                   if saved_at in losses and best else "")
        advice = (f"the latest checkpoint is {ckpts[-1]}{history}. A diverging run often goes bad before its loss "
                  "turns non-finite: if the loss had already risen there, that checkpoint diverged too; resume from an "
                  "earlier one (move the later ones aside) or start again. Lower --learning_rate, raise "
                  "--warmup_steps or set --max_grad_norm, then --resume")
    return (f"non-finite {what} at step {step} (loss {loss}, grad_norm {grad_norm}, lr {lr:.3g}): stopped instead "
            f"of training on garbage; {advice}")


def prepare_main(argv: list[str] | None = None) -> int:
    """`align prepare-data --config recipes/<preset>/pretrain.yaml [--key value ...]`: the data step of a pretraining
    recipe on its own. The recipe's training fields are checked like `align pretrain` checks them, then unused."""
    try:
        cfg, data_cfg = parse_recipe((PretrainConfig, DataConfig), argv, prog="align prepare-data")
        use_init_tokenizer(cfg, data_cfg)  # as train() does, so that both prepare the same data
        data_dir = prepare_data(data_cfg)
    except (ConfigError, DataError) as e:
        print(f"align prepare-data: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the half-prepared directory was removed on the way out
        print("align prepare-data: interrupted; no prepared data was kept", file=sys.stderr)
        return 130
    except Terminated as e:
        print("align prepare-data: terminated (SIGTERM); no prepared data was kept", file=sys.stderr)
        return e.code
    print(f"[data] ready: {data_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`align pretrain --config recipes/<preset>/pretrain.yaml [--key value ...]` (also scripts/pretrain.py)."""
    # An error is one write: the processes of a launch share stderr, and print's two (text, then newline) ran two
    # ranks' messages together on one line.
    try:
        cfg, data_cfg = parse_recipe((PretrainConfig, DataConfig), argv, prog="align pretrain")
        result = train(cfg, data_cfg)
    except (ConfigError, DataError, FileExistsError, NotADirectoryError, PermissionError, OutputDirError) as e:
        sys.stderr.write(f"align pretrain: error: {e}\n")
        return 2
    except (FloatingPointError, MemoryError) as e:
        sys.stderr.write(f"align pretrain: error: {e}\n")
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        sys.stderr.write(f"align pretrain: error: {e}; a checkpoint cut short is removed and the ones before are "
                         "kept: free some space, then run the same command with --resume\n")
        return 1
    except Terminated as e:  # during data preparation; in the loop SIGTERM saves a checkpoint and returns
        print("align pretrain: terminated (SIGTERM) while preparing data; no prepared data was kept", file=sys.stderr)
        return e.code
    return 128 + signal.Signals[result["signal"]] if "stopped_at" in result else 0  # 143 for SIGTERM, 130 Ctrl-C

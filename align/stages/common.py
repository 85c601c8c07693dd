"""What every stage shares: recipe parsing, run directories, models and tokenizers, data, guards and saving."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback, set_seed

from align.data import tasks
from align.data.validate import (DATA_SUFFIXES, DataError, DataReport, Record, dataset_records, enforce,
                                 read_records, validate)
from align.hardware import (StopRequest, bf16_supported, device_type, failing_together, hardware_defaults,
                            unsharded_warning)
from align.recipe import parse_recipe, save_recipe
from align.runs import (LOCK_FILE, WEIGHT_FILES, OutputDirError, Terminated, check_output_path, holds_cwd,
                        prepare_output_dir, truncate_log, write_json)

DEMO = "demo"


class StageError(ValueError):
    """A problem the user can fix (model, tokenizer, configuration); the message says what to do."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run is stopped before anything broken is saved."""


USER_ERRORS = (StageError, DataError, FileExistsError, FileNotFoundError, NotADirectoryError, NonFiniteLossError,
               OutputDirError)
# Not written to recipe.yaml: how this invocation treated output_dir, and GRPO's generation_batch_size, which its
# config derives from steps_per_generation (and the process count) and refuses to be given alongside it.
RECIPE_SKIP = ("overwrite", "resume_from_checkpoint", "generation_batch_size")


def log(message: str) -> None:
    """Print once per job (main process), prefixed like every toolkit message."""
    if PartialState().is_main_process:
        print(f"[align] {message}", flush=True)


def stage_main(stage: str, run, dataclass_types, argv: list[str] | None) -> int:
    """Parse the recipe and run a stage. An error the user can fix is printed as `align STAGE: error: ...`, with no
    traceback, and the exit status is 2 (a bad recipe or flag ends the program the same way while parsing)."""
    try:
        run(*parse_stage_args(dataclass_types, argv, prog=f"align {stage}"))
    except USER_ERRORS as e:  # one write: print's two would run the ranks' messages together on one line
        sys.stderr.write(f"align {stage}: error: {e}\n")
        return 2
    except Terminated as e:  # SIGTERM or Ctrl-C: the checkpoint was saved and named (for PPO, the loss said)
        return e.code
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training
        sys.stderr.write(f"align {stage}: interrupted; what was not saved in a checkpoint-N is lost\n")
        return 130
    return 0


DEMO_FILES = {"sft": "sft.jsonl", "preference": "preferences.jsonl", "prompt": "prompts.jsonl"}


@dataclass
class DataArguments:
    """Where a stage's data comes from and how strictly it is checked; shared by every stage's recipe."""

    dataset_name: str = field(
        default=DEMO,
        metadata={"help": "'demo' (writes the embedded demo data to data_dir and reads the stage's file), a local "
                          ".jsonl/.json/.parquet file, a directory of them or one save_to_disk wrote, or a Hugging "
                          "Face dataset name"},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "hub dataset configuration name"})
    dataset_train_split: str = field(default="train", metadata={"help": "split to train on (hub or directory)"})
    dataset_test_split: str | None = field(
        default=None,
        metadata={"help": "split to evaluate on (hub or directory), or for a local file the path of an eval file"},
    )
    eval_fraction: float = field(
        default=0.0,
        metadata={"help": "without a test split, hold out this fraction of the training prompts (chosen by a hash "
                          "of the prompt, so every row of one prompt lands on the same side) for evaluation"},
    )
    data_dir: str | None = field(default=None, metadata={"help": "demo data directory (default: <output_dir>/../data)"})
    demo_seed: int = field(default=0, metadata={"help": "seed of the demo data generator"})
    demo_n_sft: int = field(default=6000, metadata={"help": "demo SFT conversations"})
    demo_n_preference: int = field(default=4000, metadata={"help": "demo questions with preference pairs"})
    demo_n_rejected: int = field(
        default=2, metadata={"help": "demo pairs per preference question (distinct wrong answers)"}
    )
    demo_n_prompts: int = field(default=2000, metadata={"help": "demo PPO/GRPO prompts"})
    demo_n_heldout: int = field(default=400, metadata={"help": "demo held-out questions (never trained on)"})
    max_dropped_fraction: float = field(
        default=0.05, metadata={"help": "fail when validation drops more than this fraction of a dataset's rows"}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "replace an existing output_dir (the old one is kept as <dir>.old-<time>)"}
    )
    merge_lora: bool = field(
        default=True, metadata={"help": "with use_peft, save the merged model (loads anywhere) instead of the adapter"}
    )


@dataclass
class PromptDataArguments(DataArguments):
    """DataArguments of the stages that generate from prompts (PPO, GRPO), whose datasets often name them otherwise."""

    dataset_prompt_field: str = field(
        default="prompt",
        metadata={"help": "the column holding the prompts, e.g. 'question' for GSM8K (a string is used as plain text, "
                          "without the chat template; a list of {role, content} turns goes through it)"},
    )


# ----------------------------------------------------------------------------------------------------------------
# Recipes and run directories


def hardware_flags() -> list[str]:
    """Command-line defaults for the machine, placed before the user's own flags so those still win.

    TRL configs default to bf16=True and transformers refuses that on a CPU while parsing, before
    `hardware_defaults` could fix it, so the machine's choice has to go in with the arguments."""
    if device_type() == "cpu":
        return ["--use_cpu", "true", "--bf16", "false"]
    if not bf16_supported():
        return ["--bf16", "false"]
    return []


def parse_stage_args(dataclass_types, argv: list[str] | None, prog: str = "align"):
    """Parse a stage recipe (YAML + overrides) and apply the machine's defaults; `prog` is e.g. "align sft"."""
    argv = list(sys.argv[1:] if argv is None else argv)
    configs = parse_recipe(dataclass_types, hardware_flags() + argv, prog=prog)
    for config in configs:
        if hasattr(config, "use_cpu"):
            hardware_defaults(config)
            # The non-finite-loss guard has to see raw losses; transformers would otherwise log a window average.
            config.logging_nan_inf_filter = False
    return configs


def start_run(training_args, data_args, can_resume: bool = True) -> Path:
    """Check and create output_dir: every rank refuses a finished run first, then the main process prepares it.
    can_resume: whether the stage can continue a run (the refusal suggests --resume_from_checkpoint only then).
    Then seeds every RNG with the recipe's seed: the Trainer seeds only once built, after the models, and a new
    head (the reward model's score) or LoRA weights would otherwise start from the process's random seed."""
    out = Path(training_args.output_dir)
    check_output_path(out)
    resume = resume_arg(training_args)
    has_checkpoint = out.is_dir() and any(out.glob("checkpoint-*"))
    # A run stopped by its data checks leaves only data_report.json: the next attempt starts there afresh.
    stopped_at_data = out.is_dir() and {p.name for p in out.iterdir()} - {LOCK_FILE} == {"data_report.json"}
    if resume is True and not has_checkpoint:
        raise StageError(f"--resume_from_checkpoint true: {out} holds no checkpoint-N to continue from (a run saves "
                         "them with --save_strategy steps --save_steps N); start again with --overwrite true")
    if resume not in (None, True) and not (Path(resume) / "trainer_state.json").is_file():
        # checked before the models and data load (and data_report.json is rewritten); transformers would raise later
        raise StageError(f"--resume_from_checkpoint {resume}: not a checkpoint directory (no trainer_state.json "
                         "there); pass a checkpoint-N directory a run saved, or true for the latest in output_dir")
    if out.is_dir() and any(out.iterdir()) and not (resume is not None or data_args.overwrite or stopped_at_data):
        resume_hint = "--resume_from_checkpoint true to continue it, " if can_resume and has_checkpoint else ""
        raise FileExistsError(
            f"output directory {out} already exists and is not empty; pass --overwrite true to start again (the old "
            f"directory is kept as a backup), {resume_hint}or choose another --output_dir"
        )
    if out.is_dir() and any(out.iterdir()) and data_args.overwrite and resume is None and holds_cwd(out):
        raise FileExistsError(f"output directory {out} is (or holds) the current directory, which --overwrite would "
                              "move aside under your shell; choose another --output_dir")
    state = PartialState()
    state.wait_for_everyone()
    with failing_together(state.num_processes):  # a file in the way, no permission: the message on every rank
        if state.is_main_process:
            if stopped_at_data:
                (out / "data_report.json").unlink()
            prepare_output_dir(out, overwrite=data_args.overwrite, resume=resume is not None)
    set_seed(training_args.seed)
    return out


def resume_arg(training_args):
    """`--resume_from_checkpoint true` means the latest checkpoint in output_dir; anything else is a path."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    return True if str(value).lower() in ("true", "last", "latest") else value


# ----------------------------------------------------------------------------------------------------------------
# Models and tokenizers


def check_model_dir(path: str | None, what: str, argument: str, kind: str = "causal") -> str:
    """Refuse a path that is not a model of the expected kind, with a message saying what to pass instead.

    kind "causal": a causal LM (its config names a *ForCausalLM or *LMHeadModel class); "reward": a sequence
    classifier with one label (what `align reward` writes)."""
    from transformers import AutoConfig

    if not path:
        raise StageError(f"no {what} given: pass --{argument} DIR")
    local = Path(path)
    looks_local = local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1  # else a hub name
    if looks_local and not local.is_dir():
        raise FileNotFoundError(f"{what} {path} does not exist (--{argument}); pass a Hugging Face model directory")
    if local.is_dir() and not (local / "config.json").is_file():
        hint = ("it looks like a pretraining checkpoint: export it with `align export CKPT --out DIR` first"
                if (local / "gpt_config.json").is_file() else "pass the directory a stage or `align export` wrote")
        if (local / "adapter_config.json").is_file():
            hint = ("it is a LoRA adapter (a stage run with merge_lora false): run that stage again with --merge_lora "
                    "true, or merge the adapter into its base model with peft's merge_and_unload and save that")
        raise FileNotFoundError(f"{what} {path} has no config.json, so it is not a Hugging Face model; {hint}")
    if local.is_dir() and not any((local / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{what} {path} has a config.json but no weights ({' or '.join(WEIGHT_FILES[:3])}): "
                                "an incomplete copy or a damaged run; write it again")
    try:
        config = AutoConfig.from_pretrained(path)  # a local directory, or a hub name (org/name) to download
    except (OSError, ValueError) as e:
        if not local.exists():
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FileNotFoundError(
                f"{what} {path} (--{argument}): there is no local directory {path} (relative to {Path.cwd()}), and "
                f"the Hugging Face Hub could not provide a model of that name (offline, or a typo?): {reason}"
            ) from e
        raise FileNotFoundError(f"could not read the {what} config from {path} (--{argument}): {e}") from e
    archs = list(getattr(config, "architectures", None) or [])
    if kind == "causal":
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        if any(a.endswith("ForSequenceClassification") for a in archs):
            raise StageError(f"{what} {path} is a sequence classifier ({archs[0]}), not a causal LM; pass the SFT or "
                             f"base model directory as --{argument}")
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or (
            not archs and type(config) in MODEL_FOR_CAUSAL_LM_MAPPING)
        if not causal:
            raise StageError(f"{what} {path} is not a causal language model (architectures: {archs or 'none'}, "
                             f"model_type {config.model_type!r}); pass a *ForCausalLM checkpoint as --{argument}")
    else:
        if not any(a.endswith("ForSequenceClassification") for a in archs) or getattr(config, "num_labels", 0) != 1:
            raise StageError(f"{what} {path} is not a reward model (architectures: {archs or 'none'}, num_labels="
                             f"{getattr(config, 'num_labels', None)}); pass the directory `align reward` wrote as "
                             f"--{argument}")
    return path


def model_kwargs(model_args) -> dict:
    """from_pretrained keyword arguments from TRL's ModelConfig (fp32 weights unless a dtype is asked for)."""
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise StageError("load_in_4bit / load_in_8bit are not supported by align's stages; use use_peft without them")
    dtype = model_args.dtype
    if dtype in (None, "float32"):
        dtype = torch.float32
    elif dtype != "auto":
        dtype = getattr(torch, dtype)
    kwargs = {"dtype": dtype}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.model_revision and model_args.model_revision != "main":
        kwargs["revision"] = model_args.model_revision
    return kwargs


def load_tokenizer(path: str, padding_side: str = "right"):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, padding_side=padding_side)


def add_missing_tokens(tokenizer) -> list[int]:
    """Give a tokenizer what the stages need: eos, a pad token distinct from eos, and the toolkit's chat template
    (with its role tokens) when it has none. Returns the ids of tokens added to the vocabulary."""
    from align.tokenizer import EOS_TOKEN, add_chat_tokens

    before = len(tokenizer)
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
        log(f"the tokenizer has no eos token: added {EOS_TOKEN}")
    for what in add_chat_tokens(tokenizer):
        log(f"the tokenizer lacked it: added {what}")
    return list(range(before, len(tokenizer)))


def fit_model_to_tokenizer(model, tokenizer) -> None:
    """Grow the embeddings when tokens were added and write the tokenizer's special ids into the configs."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, key)
        if value is not None or key != "bos_token_id":
            setattr(model.config, key, value)
            if getattr(model, "generation_config", None) is not None and model.can_generate():
                setattr(model.generation_config, key, value)
    if model.can_generate() and model.generation_config.max_new_tokens is None:
        # transformers' default max_length of 20 cuts chat answers; half the context leaves room for the prompt
        context = getattr(model.config, "max_position_embeddings", None) or 512
        model.generation_config.max_new_tokens = max(1, min(256, context // 2))


@contextlib.contextmanager
def reference_from_grown_model(model, added: list[int], out: Path, peft_config):
    """While a DPO or GRPO trainer is built: TRL loads the frozen reference model again from the model's path, which
    lacks the tokens just added (an IndexError at the first batch), so the path is then a copy of the grown start
    model saved in the run directory, removed once the trainer holds its reference. (LoRA needs no copy: the
    reference is the model with its adapter disabled.)"""
    if not added or peft_config is not None:
        yield
        return
    state, start = PartialState(), out / "start-model"
    if state.is_main_process:
        model.save_pretrained(start)
    state.wait_for_everyone()
    original, model.config._name_or_path = model.config._name_or_path, str(start)
    try:
        yield
        state.wait_for_everyone()  # every process has loaded its reference
    finally:
        model.config._name_or_path = original
        if state.is_main_process:
            shutil.rmtree(start, ignore_errors=True)


def require_pad(tokenizer, path: str, stage: str) -> None:
    """Stages after SFT need the pad token SFT gave the model; a missing or eos pad is refused, not patched,
    because the policy and reward model must keep identical tokenizers."""
    if tokenizer.pad_token_id is None:
        raise StageError(f"{stage}: the tokenizer in {path} has no pad token; run `align sft` on the base model first "
                         "(it adds <|pad|>) or add a pad token distinct from eos to the tokenizer")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise StageError(f"{stage}: the tokenizer in {path} uses the eos token {tokenizer.eos_token!r} as pad; PPO "
                         "masks padding by pad id and would drop every eos, so the reward would be read at the wrong "
                         "token. Run `align sft` on the base model (it adds <|pad|>) or set a distinct pad token")
    if not tokenizer.chat_template:
        warnings.warn(f"{stage}: the tokenizer in {path} has no chat template; conversational data will fail")


def closed_assistant_turn(tokenizer) -> str | None:
    """A short chat as the template writes it, ending with an assistant turn (None without a template)."""
    if not tokenizer.chat_template:
        return None
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], tokenize=False)


def assistant_turn_ends_with_eos(tokenizer) -> bool:
    """Whether the chat template closes an assistant turn with eos, where the reward model and PPO read the score."""
    text = closed_assistant_turn(tokenizer)
    return text is None or text.rstrip().endswith(tokenizer.eos_token)  # None: plain-text data, nothing to check


def peft_config_for(model_args, added_tokens: list[int] | None = None, task_type: str | None = None,
                    merge_lora: bool = True):
    """TRL's LoRA config from ModelConfig (None without use_peft); tokens added to the vocabulary stay trainable."""
    from accelerate.utils import DistributedType
    from trl import get_peft_config

    if task_type:
        model_args.lora_task_type = task_type
    config = get_peft_config(model_args)
    if config is not None and added_tokens:
        sharded = PartialState().distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        if not merge_lora or sharded:
            raise StageError(
                f"LoRA on {model_args.model_name_or_path}, whose tokenizer this stage extends ({len(added_tokens)} "
                f"tokens added), saves an adapter {'under DeepSpeed/FSDP' if sharded else 'with merge_lora false'}: it "
                "would need a base model with those tokens, which exists nowhere on disk, so it could not be loaded. "
                "Keep merge_lora true (one process or DDP), or start from a model whose tokenizer has a pad token and "
                "a chat template (e.g. the output of a full SFT)")
        config.trainable_token_indices = list(added_tokens)
    return config


# ----------------------------------------------------------------------------------------------------------------
# Data


def demo_data_dir(data_args, training_args) -> Path:
    return Path(data_args.data_dir) if data_args.data_dir else Path(training_args.output_dir).resolve().parent / "data"


def ensure_demo_data(data_args, training_args) -> Path:
    """Write the embedded demo data once per data_dir; later stages reuse it (and refuse different settings)."""
    data_dir = demo_data_dir(data_args, training_args)
    params = {"seed": data_args.demo_seed, "n_sft": data_args.demo_n_sft, "n_preference": data_args.demo_n_preference,
              "n_prompts": data_args.demo_n_prompts, "n_heldout": data_args.demo_n_heldout,
              "n_rejected": data_args.demo_n_rejected}
    marker = data_dir / "demo.json"
    if data_dir.exists() and not data_dir.is_dir():  # on every rank: the main process alone would fail in mkdir
        raise DataError(f"data_dir {data_dir} is a file; give a directory for the demo data (--data_dir)")
    with PartialState().main_process_first():  # (PPOConfig shadows the world_size main_process_first needs)
        existing = json.loads(marker.read_text()) if marker.is_file() else None
        if existing is None and PartialState().is_main_process:
            tasks.write_demo_data(data_dir, **params)
            write_json(marker, params)
            log(f"wrote the demo data to {data_dir} (sft, preferences, prompts, heldout .jsonl)")
    # Refused after the block, on every rank: raised inside it, the main process would leave the others waiting in
    # its barrier (they died there with a connection traceback instead of this message).
    if existing is not None and existing != params:
        raise DataError(f"{data_dir} holds demo data made with {existing}, but this recipe asks for {params}; "
                        "use the same demo_* settings in every stage of a run, or another --data_dir")
    return data_dir


def _local_split(path: Path, split: str) -> Path | None:
    for suffix in DATA_SUFFIXES:
        candidate = path / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def directory_test_file(data_args) -> Path | None:
    """The test file (test.jsonl|json|parquet) of a directory dataset, which is the eval set when neither
    --dataset_test_split nor eval_fraction says otherwise, as a hub dataset's test split would be."""
    local = Path(data_args.dataset_name)
    if data_args.dataset_name == DEMO or data_args.dataset_test_split or data_args.eval_fraction > 0:
        return None
    return _local_split(local, "test") if local.is_dir() else None


def require_eval_data(data_args, training_args) -> None:
    """Refuse an eval_strategy other than "no" without eval data, before anything is written (the trainer would
    refuse it later, naming its own arguments rather than the recipe's)."""
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    has_eval = data_args.dataset_test_split or data_args.eval_fraction > 0 or directory_test_file(data_args)
    if strategy == "no" or has_eval:
        return
    raise StageError(
        f"--eval_strategy {strategy} needs eval data, and dataset {data_args.dataset_name!r} has no eval split: pass "
        "--dataset_test_split (a split name, or an eval data file when --dataset_name is a file), --eval_fraction F "
        "to hold out part of the training prompts, or --eval_strategy no"
    )


def load_records(data_args, training_args, kind: str):
    """Train and eval records (each row with the file and line it came from) and the name of their source."""
    if data_args.dataset_name == DEMO:
        path = ensure_demo_data(data_args, training_args) / DEMO_FILES[kind]
        return read_records(path), None, str(path)
    local = Path(data_args.dataset_name)
    if local.is_file():
        test = data_args.dataset_test_split
        if test and not Path(test).is_file():
            raise DataError(f"--dataset_test_split {test}: for a local data file it must name an eval data file")
        return read_records(local), read_records(test) if test else None, str(local)
    if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
        return _saved_records(local, data_args)
    if local.is_dir():
        train = _local_split(local, data_args.dataset_train_split)
        if train is None and not any(p.suffix in DATA_SUFFIXES for p in local.iterdir()):
            # a copy of a hub dataset repository (`hf download --repo-type dataset NAME --local-dir DIR`): its files
            # lie in subdirectories (data/train-00000-of-00001.parquet), which `datasets` reads by their split names
            return _hub_records(data_args)
        if train is None:
            raise DataError(f"{local} has no {data_args.dataset_train_split}{{{','.join(DATA_SUFFIXES)}}} file; name "
                            "a data file directly or pass --dataset_train_split NAME")
        if data_args.dataset_test_split:
            test = _local_split(local, data_args.dataset_test_split)
            if test is None:
                raise DataError(f"{local} has no {data_args.dataset_test_split} data file (--dataset_test_split)")
        else:
            test = directory_test_file(data_args)
            if test is not None:
                log(f"evaluating on {test} (the directory's test split; --dataset_test_split NAME or --eval_fraction F "
                    "chooses otherwise)")
        return read_records(train), read_records(test) if test else None, str(train)
    if local.suffix in DATA_SUFFIXES or str(local).startswith((".", "/", "~")):
        raise DataError(f"data file {local} not found (--dataset_name)")
    return _hub_records(data_args)


def _saved_records(path: Path, data_args):
    """Train and eval records of a dataset that `datasets` saved with save_to_disk (a DatasetDict, or one Dataset,
    which is then the train split)."""
    from datasets import DatasetDict, load_from_disk

    try:
        saved = load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged save raises many kinds
        raise DataError(f"{path} looks like a dataset saved with save_to_disk but does not load: {e}") from e
    train_name, test_name = data_args.dataset_train_split, data_args.dataset_test_split
    if not isinstance(saved, DatasetDict):
        if test_name:
            raise DataError(f"{path} holds one saved Dataset, with no splits: drop --dataset_test_split {test_name} "
                            "(hold out part of it with --eval_fraction F)")
        return dataset_records(saved, str(path)), None, str(path)
    for name in (train_name, test_name):
        if name and name not in saved:
            raise DataError(f"{path} has no split {name!r} (its splits: {', '.join(saved)}); pass "
                            "--dataset_train_split / --dataset_test_split NAME")
    test = dataset_records(saved[test_name], f"{path}[{test_name}]") if test_name else None
    return dataset_records(saved[train_name], f"{path}[{train_name}]"), test, f"{path}[{train_name}]"


def _hub_records(data_args):
    from datasets import load_dataset

    name = data_args.dataset_name

    def split(split_name):
        try:
            ds = load_dataset(name, data_args.dataset_config, split=split_name)
        except Exception as e:  # offline, unknown name or split: datasets raises many kinds
            raise DataError(f"could not load the Hugging Face dataset {name!r} split {split_name!r}: {e}\n(no "
                            "network? pass a local .jsonl/.parquet file or directory as --dataset_name)") from e
        return dataset_records(ds, f"{name}[{split_name}]")

    test = split(data_args.dataset_test_split) if data_args.dataset_test_split else None
    return split(data_args.dataset_train_split), test, f"{name}[{data_args.dataset_train_split}]"


def _prompt_key(row: dict) -> str:
    """What identifies a prompt: the prompt column, or a conversation without its last (assistant) turn."""
    return json.dumps(row["prompt"] if "prompt" in row else row["messages"][:-1], sort_keys=True)


def split_eval(rows: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """Hold out about `fraction` of the prompts (all rows of a prompt together) by a hash of the prompt."""
    import hashlib

    if fraction <= 0:
        return rows, []
    train, held = [], []
    for row in rows:
        bucket = int.from_bytes(hashlib.sha256(_prompt_key(row).encode()).digest()[:4], "big") / 2**32
        (held if bucket < fraction else train).append(row)
    return train, held


def load_stage_data(data_args, training_args, kind: str, out: Path, tokenizer=None, columns=None, **checks):
    """Read, validate and split a stage's data; saves data_report.json; returns (train rows, eval rows).
    `columns` maps the stage's column names to the dataset's (from the recipe's dataset_<name>_field)."""
    train_records, eval_records, source = load_records(data_args, training_args, kind)
    if columns:
        train_records = rename_columns(train_records, columns, source)
        if eval_records is not None:
            eval_records = rename_columns(eval_records, columns, f"{source} (eval)")
    train, train_report = validate(train_records, kind, source, tokenizer=tokenizer, **checks)
    reports: dict[str, DataReport] = {"train": train_report}
    if eval_records is not None:
        evaluation, reports["eval"] = validate(eval_records, kind, f"{source} (eval)", tokenizer=tokenizer, **checks)
        if data_args.eval_fraction > 0:  # a recipe's default, with a test split given on the command line
            log(f"eval_fraction={data_args.eval_fraction} is not used: the eval set is the test split (every "
                "training row is trained on)")
    else:
        train, evaluation = split_eval(train, data_args.eval_fraction)
    state = PartialState()
    if state.is_main_process:
        summary = {name: r.as_dict() for name, r in reports.items()}
        summary["rows"] = {"train": len(train), "eval": len(evaluation)}
        write_json(out / "data_report.json", summary)
    for report in reports.values():
        if state.is_main_process or report.kept == 0:
            enforce(report, data_args.max_dropped_fraction)
        else:
            enforce_quietly(report, data_args.max_dropped_fraction)
    if data_args.eval_fraction > 0 and eval_records is None and not evaluation:
        raise DataError(f"{source}: eval_fraction={data_args.eval_fraction} held out no rows; raise it or add rows")
    if data_args.eval_fraction > 0 and eval_records is None and not train:
        raise DataError(f"{source}: eval_fraction={data_args.eval_fraction} held out every row, leaving none to train "
                        "on; lower it (it is a fraction below 1) or add rows")
    if kind == "prompt" and train and getattr(tokenizer, "chat_template", None) and isinstance(train[0]["prompt"], str):
        log(f"the prompts of {source} are plain strings: the model generates from them as text, without its chat "
            "template; give them as [{role: user, content}] turns if it was fine-tuned on conversations")
    return train, evaluation


def rename_columns(records: list[Record], columns: dict[str, str], source: str) -> list[Record]:
    """The rows with each dataset column of `columns` (stage name -> dataset name) under the stage's name; the
    dataset's own column of that name, if any, gives way."""
    renames = {ours: theirs for ours, theirs in columns.items() if ours != theirs}
    if not renames:
        return records
    found = set().union(*(r.row.keys() for r in records if r.row is not None))
    for ours, theirs in renames.items():
        if records and theirs not in found:
            raise DataError(f"{source}: no column {theirs!r} to read as {ours!r} (--dataset_{ours}_field; found: "
                            f"{', '.join(sorted(found)) or 'none'})")
    return [r if r.row is None else
            Record(r.where, {**{k: v for k, v in r.row.items() if k not in renames},
                             **{ours: r.row[theirs] for ours, theirs in renames.items() if theirs in r.row}}, r.error)
            for r in records]


def enforce_quietly(report: DataReport, max_dropped_fraction: float) -> None:
    """Same decision as `enforce` on the other ranks, without printing the report twice."""
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        enforce(report, max_dropped_fraction)


def to_dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows)


# ----------------------------------------------------------------------------------------------------------------
# Guards and logs


class NonFiniteGuard(TrainerCallback):
    """Stops training with a clear message as soon as a logged loss (or PPO objective) is NaN or infinite."""

    KEYS = ("loss", "grad_norm", "eval_loss", "loss/policy_avg", "loss/value_avg", "objective/kl", "objective/scores")

    def __init__(self, stage: str):
        self.stage = stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in self.KEYS:
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise NonFiniteLossError(
                    f"{self.stage}: {key} is {value} at step {state.global_step}; training stopped and no model was "
                    f"saved to {args.output_dir}. Lower learning_rate, check the data (data_report.json) and, for "
                    "PPO, the reward model's scores; then start again with --overwrite true"
                )


class JsonlLogger(TrainerCallback):
    """Appends every logged step (step, epoch or episode, metrics) to a JSONL file in output_dir (main process)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.global_step > 0:  # resumed: the steps after the checkpoint again
            truncate_log(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # (not transformers' end-of-train summary, which metrics.json holds: a run stopped by SIGTERM and resumed
        # would log two, a two-point "curve" of train_loss in the report)
        if state.is_world_process_zero and logs and "train_runtime" not in logs:
            row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float, str))}}
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


class SaveOnSignal(TrainerCallback):
    """SIGTERM (`kill`, scancel, a Slurm preemption) or a first Ctrl-C during trainer.train(): the current optimizer
    step finishes, a checkpoint-N is saved in output_dir and training stops; `train_and_evaluate` then exits 143 or
    130. A second Ctrl-C stops at once. Under several processes every step ends with a vote, so that every rank saves
    at the same step whichever got the signal."""

    def __init__(self):
        message = "[align] Ctrl-C: saving a checkpoint after this step (Ctrl-C again to stop at once)"
        self.request = StopRequest(message if PartialState().is_main_process else None)
        self.stopped = False  # every process agreed to stop: the checkpoint of this step is saved

    def agreed(self) -> bool:
        state = PartialState()
        return self.request.agreed(state.num_processes, state.device) is not None

    def on_step_end(self, args, state, control, **kwargs):
        if self.agreed():  # after DefaultFlowCallback's decisions, so these win
            self.stopped = control.should_save = control.should_training_stop = True
            control.should_evaluate = False  # save first: the time left before a SIGKILL may be short

    def on_save(self, args, state, control, **kwargs):
        if not self.stopped and self.agreed():  # a signal during a save_steps save: that checkpoint is the one
            self.stopped = control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped:  # an epoch strategy would evaluate, and save the same checkpoint again
            control.should_evaluate = control.should_save = False


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def save_model(trainer, model, tokenizer, out: Path, merge_lora: bool) -> None:
    """Write `model` (unwrapped) as an HF directory: weights, config with pad/eos ids, generation_config and the
    tokenizer with its chat template. A LoRA adapter is merged into the model unless merge_lora is off."""
    from peft import PeftModel

    state = PartialState()
    sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
    if isinstance(model, PeftModel) and merge_lora and sharded:
        warnings.warn("merge_lora under DeepSpeed/FSDP is not supported: saving the LoRA adapter instead")
    if isinstance(model, PeftModel) and merge_lora and not sharded:
        model = model.merge_and_unload()
    fit_model_to_tokenizer(model.get_base_model() if isinstance(model, PeftModel) else model, tokenizer)
    if sharded:
        trainer.save_model(str(out))  # gathers the sharded weights
    with failing_together(state.num_processes):  # a full disk on the main process: the message on every rank
        if state.is_main_process and not sharded:
            model.save_pretrained(out, safe_serialization=True)
        if state.is_main_process:
            tokenizer.save_pretrained(out)
            if not (out / "generation_config.json").is_file():  # a reward model: its special ids, as every output has
                from transformers import GenerationConfig

                GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id).save_pretrained(out)


def train_and_evaluate(trainer, training_args) -> dict:
    """Train (resuming when asked), then evaluate when there is an eval set: the last logged training step's
    metrics, the trainer's train summary and the final eval metrics, in one flat dict."""
    from transformers.trainer_utils import get_last_checkpoint

    if unsharded := unsharded_warning(trainer.accelerator.distributed_type):
        log(f"warning: {unsharded}")
    resume = resume_arg(training_args)
    resumed_from = None
    if resume is not None:  # transformers' train_* summary (train_loss, num_tokens) then covers only the steps run now
        checkpoint = Path(get_last_checkpoint(training_args.output_dir) if resume is True else resume)
        if (checkpoint / "trainer_state.json").is_file():
            resumed_from = json.loads((checkpoint / "trainer_state.json").read_text()).get("global_step")
    stop = SaveOnSignal()
    trainer.add_callback(stop)
    stop.request.install()
    try:
        summary = trainer.train(resume_from_checkpoint=resume).metrics
    finally:
        stop.request.restore()
    if stop.stopped:  # not evaluated, and no model or metrics.json written: the run has not finished
        checkpoint = Path(training_args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        what = "Ctrl-C" if stop.request.signal == "SIGINT" else "SIGTERM"
        log(f"{what}: saved {checkpoint} at step {trainer.state.global_step} of {trainer.state.max_steps}; continue "
            "with the same command and --resume_from_checkpoint true")
        # Every rank has written its share (rank 0 the most): the first to exit makes the launcher end the others
        PartialState().wait_for_everyone()
        raise Terminated(signal.Signals[stop.request.signal])
    if resumed_from is not None:
        summary["resumed_from_step"] = resumed_from
    steps = [log for log in trainer.state.log_history if "train_runtime" not in log and not
             any(k.startswith("eval_") for k in log)]
    # The final step even when no step was logged (max_steps < logging_steps).
    metrics = {**(steps[-1] if steps else {}), **summary, "step": trainer.state.global_step}
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    return metrics


def tokens_added(base: str, out: Path) -> list[str]:
    """The tokens of the tokenizer saved in `out` that the base model's tokenizer lacks (add_missing_tokens')."""
    from transformers import AutoTokenizer

    try:
        before, after = AutoTokenizer.from_pretrained(base).get_vocab(), AutoTokenizer.from_pretrained(out).get_vocab()
    except Exception:  # noqa: BLE001 - both loaded during the run; should one be gone now, the card just says less
        return []
    return sorted((t for t in after if t not in before), key=after.get)


GENERATE_USAGE = """```python
from transformers import pipeline
generate = pipeline("text-generation", model="PATH/TO/THIS/DIR")
question = "Question: Tom has 3 apples and gets 4 more. How many apples does Tom have now?\\nAnswer:"
print(generate([{"role": "user", "content": question}])[0]["generated_text"][-1]["content"])
```
"""
# A reward model scores a conversation; it is not meant to generate (pipeline("text-generation") still loads it).
REWARD_USAGE = """```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/DIR")
model = AutoModelForSequenceClassification.from_pretrained("PATH/TO/THIS/DIR", num_labels=1)
question = "Question: Tom has 3 apples and gets 4 more. How many apples does Tom have now?\\nAnswer:"
messages = [{"role": "user", "content": question}, {"role": "assistant", "content": "3 + 4 = 7\\n#### 7"}]
inputs = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)
print(model(**inputs).logits[0, 0].item())  # the score, read at the eos that closes the answer
```
"""


def finish_run(out: Path, stage: str, metrics: dict, configs: tuple, base: str, dataset: str) -> None:
    """metrics.json, the resolved recipe.yaml and a short model card, written by the main process."""
    if not PartialState().is_main_process:
        return
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
    write_json(out / "metrics.json", {"stage": stage, "num_processes": PartialState().num_processes, **metrics})
    added = tokens_added(base, out)
    grown = "tokens added to the base model's tokenizer (embedding rows grown, mean-initialised): "
    base_note = f"{base}; {grown}{', '.join(added)}" if added else base
    save_recipe(out, *configs, notes={"base model": base_note}, skip=RECIPE_SKIP)
    grown = f"\nThe {grown}{', '.join(f'`{t}`' for t in added)}." if added else ""
    shown = {k: v for k, v in metrics.items() if k.startswith(("eval_", "train_loss", "objective/"))}
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in shown.items())
    (out / "README.md").write_text(f"""---
library_name: transformers
tags: [align, {stage}, trl]
---
# {stage.upper()} model trained by align

Stage `{stage}` (TRL) from `{base}` on `{dataset}`. The resolved recipe is in `recipe.yaml`, every final metric in
`metrics.json`, what data validation kept or dropped in `data_report.json`.{grown}

| metric | value |
|---|---|
{rows}

{REWARD_USAGE if stage == "reward" else GENERATE_USAGE}""")
    log(f"{stage}: wrote {out} (model, tokenizer, metrics.json, recipe.yaml)")

"""`align <command>`: thin dispatch to the module that does the work."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# command -> (module with a `main(argv)` function, or module:function, one-line help)
COMMANDS = {
    "prepare-data": ("align.pretrain:prepare_main", "build the tokenizer and token shards for a pretraining recipe"),
    "pretrain": ("align.pretrain", "pretrain the from-scratch GPT (--config recipes/<preset>/pretrain.yaml)"),
    "export": ("align.cli:export_main", "export a pretraining checkpoint as a Hugging Face directory"),
    "sft": ("align.stages.sft", "supervised fine-tuning with TRL's SFTTrainer"),
    "reward": ("align.stages.reward", "train a reward model with TRL's RewardTrainer"),
    "ppo": ("align.stages.ppo", "PPO with TRL's PPOTrainer (trl<1.13)"),
    "dpo": ("align.stages.dpo", "direct preference optimisation with TRL's DPOTrainer"),
    "grpo": ("align.stages.grpo", "GRPO with a verifiable reward (TRL's GRPOTrainer)"),
    "eval": ("align.evaluation.run", "evaluate a checkpoint with lm-evaluation-harness"),
    "compare": ("align.evaluation.report", "compare evaluated models in a report"),
    "benchmarks": ("align.evaluation.pack", "fetch the offline benchmark data (`align benchmarks fetch`)"),
    "pipeline": ("align.pipeline", "run every stage of a preset in order"),
}


def export_main(argv: list[str] | None = None) -> int:
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    from align.model.hf import check_exportable, export, load_checkpoint
    from align.pretrain import find_tokenizer_dir
    from align.runs import holds_cwd, prepare_output_dir

    parser = argparse.ArgumentParser(prog="align export", description=COMMANDS["export"][1])
    parser.add_argument("checkpoint", help="checkpoint directory (gpt_config.json + model.safetensors)")
    parser.add_argument("--out", required=True, help="output directory for the Hugging Face checkpoint")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's, or its run's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="export over an existing --out directory (it is moved aside to OUT.old-TIME, not deleted)")
    args = parser.parse_args(argv)
    checkpoint, out_dir = Path(args.checkpoint).resolve(), Path(args.out).resolve()
    if out_dir == checkpoint or out_dir in checkpoint.parents:
        parser.error(f"--out {args.out} holds the checkpoint {args.checkpoint}; choose a directory outside it")
    if holds_cwd(out_dir):
        parser.error(f"--out {args.out} is (or holds) the current directory, which the export would replace; give a "
                     "new directory, e.g. --out ./hf")
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"--out {args.out} is a file; give a directory")
    if (out_dir / "gpt_config.json").is_file() and not (out_dir / "config.json").is_file():
        parser.error(f"--out {args.out} is a pretraining checkpoint (its training state would be replaced); "
                     "choose a directory outside the run's checkpoints/")
    if args.tokenizer and not (Path(args.tokenizer) / "tokenizer.json").is_file():
        parser.error(f"--tokenizer {args.tokenizer}: no tokenizer.json there (give the directory a tokenizer was "
                     "saved to, e.g. runs/NAME/tokenizer)")
    try:
        model = load_checkpoint(args.checkpoint)
        run_tokenizer = find_tokenizer_dir(Path(args.checkpoint))
        if not (args.tokenizer or run_tokenizer):
            raise FileNotFoundError(f"no tokenizer.json in {args.checkpoint} or beside it (looked in ./, tokenizer/, "
                                    "../tokenizer, ../../tokenizer); pass --tokenizer DIR")
        tokenizer_dir = args.tokenizer or run_tokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        except Exception as e:  # tokenizers and transformers raise many kinds for a damaged tokenizer.json
            raise ValueError(f"cannot load the tokenizer in {tokenizer_dir}: {' '.join(str(e).split())}") from e
        if args.tokenizer and run_tokenizer and not _same_tokenizer(tokenizer, run_tokenizer):
            print(f"align export: warning: --tokenizer {args.tokenizer} is not the tokenizer of the run this "
                  f"checkpoint comes from ({run_tokenizer}): its token ids may mean other things than the weights "
                  "learnt",
                  file=sys.stderr)
        check_exportable(model, tokenizer)  # a refused export leaves --out where it was
        if args.overwrite:
            prepare_output_dir(out_dir, overwrite=True)  # the old directory is moved aside, never deleted
        out = export(model, tokenizer, out_dir, overwrite=args.overwrite)
    except (OSError, ValueError, MemoryError, SafetensorError) as e:  # OSError: also a read-only or full disk
        print(f"align export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def _same_tokenizer(tokenizer, other_dir: Path) -> bool:
    from transformers import AutoTokenizer

    from align.tokenizer import tokenizer_hash

    try:
        return tokenizer_hash(tokenizer) == tokenizer_hash(AutoTokenizer.from_pretrained(other_dir))
    except Exception:  # an unreadable run tokenizer: nothing to compare with
        return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: align <command> [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<13} {help_text}")
        print("\n`align <command> --help` shows a command's options.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"align: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, _, function = COMMANDS[command][0].partition(":")
    return getattr(importlib.import_module(module), function or "main")(rest) or 0


if __name__ == "__main__":
    sys.exit(main())

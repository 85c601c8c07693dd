"""Reward-model scores of a policy's answers on held-out prompts: reward_mean and head-to-head win rates."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from align.runs import read_json

STOP_STRINGS = ("\n\n", "Question:")  # where a base model's plain-text answer ends (lm-eval's demo/GSM8K stops)


def load_prompts(heldout_file: str | Path, limit: int | None = None) -> list[str]:
    """User-turn texts ("Question: ...\\nAnswer:") of the held-out demo problems (GSM8K schema rows)."""
    import json

    rows = [json.loads(line) for line in Path(heldout_file).read_text().splitlines() if line.strip()]
    return [f"Question: {row['question']}\nAnswer:" for row in rows[:limit]]


def uses_chat(model_dir: str | Path) -> bool:
    """Whether a model was aligned on chat data (a stage wrote it) rather than being a pretrained base."""
    metrics = Path(model_dir) / "metrics.json"
    return metrics.is_file() and read_json(metrics).get("stage") in ("sft", "ppo", "dpo", "grpo")


@torch.inference_mode()
def generate_answers(model_dir: str | Path, prompts: list[str], chat: bool, max_new_tokens: int = 32,
                     batch_size: int = 64) -> list[str]:
    """One greedy answer per prompt: through the chat template for aligned models, as plain text for a base model
    (cut at the first stop string, where lm-eval's demo task would stop it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             if chat else p for p in prompts]
    answers = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for row in out[:, batch["input_ids"].shape[1]:]:
            text = tokenizer.decode(row, skip_special_tokens=True)
            for stop in STOP_STRINGS:
                text = text.split(stop)[0]
            answers.append(text.strip())
    return answers


@torch.inference_mode()
def score(reward_dir: str | Path, prompts: list[str], answers: list[str], batch_size: int = 64) -> list[float]:
    """The reward model's score of each (prompt, answer) as a chat exchange, read where PPO reads it (the eos)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_dir, padding_side="right")
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": a}],
                                           tokenize=False) for p, a in zip(prompts, answers)]
    scores = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        scores.extend(model(**batch).logits[:, 0].tolist())
    return scores


def mean_entry(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {"value": mean, "stderr": math.sqrt(var / n), "n": n}


def win_rate(challenger: list[float], incumbent: list[float]) -> dict:
    """How often the reward model prefers the challenger's answer to the same prompt (ties count half)."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(challenger, incumbent)]
    return mean_entry(wins)

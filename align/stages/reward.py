"""Reward model with TRL's RewardTrainer: a one-label sequence classifier from the SFT model, scored at eos."""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from trl import ModelConfig, RewardConfig, RewardTrainer

from align.data.tasks import extract_answer, is_correct, is_heldout, write_jsonl
from align.data.validate import full_tokens
from align.hardware import failing_together
from align.stages.common import (
    DataArguments,
    JsonlLogger,
    NonFiniteGuard,
    assistant_turn_ends_with_eos,
    check_model_dir,
    closed_assistant_turn,
    finish_run,
    fit_model_to_tokenizer,
    load_stage_data,
    load_tokenizer,
    log,
    model_kwargs,
    peft_config_for,
    require_eval_data,
    require_pad,
    save_model,
    stage_main,
    start_run,
    to_dataset,
    train_and_evaluate,
)

SELF_NEGATIVES_FILE = "self_negatives.jsonl"


@dataclass
class RewardArguments(DataArguments):
    """Data options of `align reward`, including negatives sampled from the SFT model itself."""

    self_negatives: float = field(
        default=0.0,
        metadata={"help": "fraction of pairs whose rejected answer is replaced by a wrong answer sampled from the SFT "
                          "model (verifiable '#### N' data only): synthetic negatives alone teach the reward model "
                          "little about the mistakes the policy really makes"},
    )
    self_negative_samples: int = field(default=4, metadata={"help": "samples per prompt when looking for a wrong one"})
    self_negative_temperature: float = field(default=1.0, metadata={"help": "sampling temperature for them"})
    self_negative_max_new_tokens: int = field(default=32, metadata={"help": "answer length limit for them"})


def question_of(prompt) -> str | None:
    """The question text of a demo-format prompt ("Question: ...\\nAnswer:"), or None."""
    text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
    if not text.startswith("Question: "):
        return None
    return text[len("Question: "):].split("\nAnswer:")[0]


def content_of(turns) -> str:
    return "".join(m["content"] for m in turns) if isinstance(turns, list) else turns


@torch.no_grad()
def sample_wrong_answers(model, tokenizer, rows: list[dict], fraction: float, samples: int = 4,
                         temperature: float = 1.0, max_new_tokens: int = 32, batch_size: int = 64,
                         seed: int = 0) -> dict[int, str]:
    """Wrong answers the model itself gives, for a random `fraction` of preference rows: {row index: answer}.

    Only rows whose chosen answer is verifiable ("#### N") are used, and never a question of the demo's held-out
    partition. Each selected prompt gets `samples` sampled answers; the first one that is_correct rejects is kept
    (rows where every sample is right keep their synthetic negative)."""
    rng = random.Random(seed)
    candidates = []
    for i, row in enumerate(rows):
        answer = extract_answer(content_of(row["chosen"]))
        question = question_of(row["prompt"])
        if answer is not None and not (question is not None and is_heldout(question)):
            candidates.append((i, answer))
    chosen = rng.sample(candidates, round(fraction * len(candidates)))
    torch.manual_seed(seed)
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    found = {}
    try:
        for start in range(0, len(chosen), batch_size):
            batch = chosen[start : start + batch_size]
            prompts = [rows[i]["prompt"] for i, _ in batch]
            if isinstance(prompts[0], list):
                texts = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False)
            else:
                texts = prompts
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            generated = model.generate(
                **enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                num_return_sequences=samples, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
            answers = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for k, (i, answer) in enumerate(batch):
                wrong = [a.strip() for a in answers[k * samples : (k + 1) * samples]
                         if a.strip() and not is_correct(a, answer)]
                if wrong:
                    found[i] = wrong[0]
    finally:
        tokenizer.padding_side = padding_side
    return found


def add_self_negatives(script_args: RewardArguments, training_args, model_args, tokenizer, rows: list[dict],
                       out: Path, name: str) -> list[dict]:
    """Replace some rejected answers with the SFT model's own wrong ones; the main process samples them once and
    writes them to <name>_self_negatives.jsonl (which every rank then reads)."""
    from transformers import AutoModelForCausalLM

    path, state = out / f"{name}_{SELF_NEGATIVES_FILE}", PartialState()
    with failing_together(state.num_processes):
        if not path.is_file() and state.is_main_process:
            model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **model_kwargs(model_args))
            fit_model_to_tokenizer(model, tokenizer)
            model.to(state.device)
            found = sample_wrong_answers(
                model, tokenizer, rows, script_args.self_negatives, script_args.self_negative_samples,
                script_args.self_negative_temperature, script_args.self_negative_max_new_tokens,
                seed=training_args.seed,
            )
            # (written whole or not at all: a run killed here samples them again when resumed)
            write_jsonl(path, [{"row": i, "prompt": rows[i]["prompt"], "rejected": answer}
                               for i, answer in sorted(found.items())])
            del model
    found = {r["row"]: r["rejected"] for r in map(json.loads, path.read_text().splitlines())}
    rows, max_length, too_long = [dict(row) for row in rows], training_args.max_length, 0
    for i, answer in found.items():
        rejected = [{"role": "assistant", "content": answer}] if isinstance(rows[i]["rejected"], list) else answer
        if max_length is not None and full_tokens(tokenizer, rows[i]["prompt"], rejected) > max_length:
            too_long += 1  # the trainer would silently skip the pair: keep the row's own negative
            continue
        rows[i]["rejected"] = rejected
    left_out = f" ({too_long} more would exceed max_length={max_length}: those keep their own)" if too_long else ""
    log(f"reward: {len(found) - too_long} of {len(rows)} {name} pairs now reject the SFT model's own wrong answer"
        + left_out)
    return rows


def text_after_eos(tokenizer) -> bool:
    """Whether the chat template writes more after the eos that closes an assistant turn (Qwen's "<|im_end|>\\n")."""
    text = closed_assistant_turn(tokenizer)
    return text is not None and not text.endswith(tokenizer.eos_token) and text.rstrip().endswith(tokenizer.eos_token)


def ids_cut_at_eos(rows: list[dict], tokenizer) -> list[dict]:
    """Conversational pairs tokenized as TRL would, each ending at its last eos: the reward model reads its score at
    the last token, and PPO reads it at the eos its responses stop at, not at what the template writes after it."""
    def ids(turns):
        ids = tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"]
        return ids[: len(ids) - ids[::-1].index(tokenizer.eos_token_id)]

    return [{"chosen_ids": ids(row["prompt"] + row["chosen"]), "rejected_ids": ids(row["prompt"] + row["rejected"])}
            for row in rows]


@torch.no_grad()
def pairwise_accuracy(trainer) -> dict:
    """The fraction of eval pairs whose chosen answer the trained model scores above the rejected one, counted over
    the whole eval set. (TRL's eval_accuracy averages per-batch accuracies, so a short last batch weighs as much as
    a full one.) Each process scores its share of the eval batches, as in trainer.evaluate; the counts are gathered."""
    model = trainer.model_wrapped  # DDP / DeepSpeed / FSDP wrapper, or the model itself
    model.eval()
    correct = total = 0
    for batch in trainer.get_eval_dataloader():  # chosen rows, then rejected rows, as the trainer collates them
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        chosen, rejected = torch.chunk(scores.squeeze(-1), chunks=2)
        wins = trainer.accelerator.gather_for_metrics((chosen > rejected).long())  # without the padding repeats
        correct += int(wins.sum())
        total += len(wins)
    return {"eval_accuracy": correct / total, "eval_pairs": total}


def build_trainer(script_args: RewardArguments, training_args: RewardConfig, model_args: ModelConfig):
    """The RewardTrainer for a recipe, with the output directory prepared; returns (trainer, output_dir)."""
    from transformers import AutoModelForSequenceClassification

    require_eval_data(script_args, training_args)
    path = check_model_dir(model_args.model_name_or_path, "SFT model", "model_name_or_path")  # before --overwrite
    out = start_run(training_args, script_args)
    tokenizer = load_tokenizer(path)
    require_pad(tokenizer, path, "reward")
    if not assistant_turn_ends_with_eos(tokenizer):
        warnings.warn("the chat template does not end assistant turns with eos: the reward model reads its score at "
                      "the last token, PPO reads it at eos")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **model_kwargs(model_args))
    fit_model_to_tokenizer(model, tokenizer)  # pad_token_id on the config: the score is read at the last non-pad

    train, evaluation = load_stage_data(script_args, training_args, "preference", out, tokenizer,
                                        max_length=training_args.max_length, long_rows="drop")
    if script_args.self_negatives > 0:
        train = add_self_negatives(script_args, training_args, model_args, tokenizer, train, out, "train")
        if evaluation:
            evaluation = add_self_negatives(script_args, training_args, model_args, tokenizer, evaluation, out, "eval")
    if isinstance(train[0]["chosen"], list) and text_after_eos(tokenizer):
        train, evaluation = ids_cut_at_eos(train, tokenizer), ids_cut_at_eos(evaluation, tokenizer)
        log("reward: the chat template writes more after the eos that ends an answer; each pair is cut at that eos, "
            "where PPO reads the score")
    trainer = RewardTrainer(
        model=model,
        args=training_args,
        train_dataset=to_dataset(train),
        eval_dataset=to_dataset(evaluation) if evaluation else None,
        processing_class=tokenizer,
        peft_config=peft_config_for(model_args, task_type="SEQ_CLS"),
        callbacks=[NonFiniteGuard("reward"), JsonlLogger(out / "reward_log.jsonl")],
    )
    return trainer, out


def run(script_args: RewardArguments, training_args: RewardConfig, model_args: ModelConfig) -> dict:
    trainer, out = build_trainer(script_args, training_args, model_args)
    metrics = train_and_evaluate(trainer, training_args)
    if trainer.eval_dataset is not None:
        metrics["eval_accuracy_batch_mean"] = metrics.pop("eval_accuracy", None)  # TRL's figure
        metrics.update(pairwise_accuracy(trainer))
    save_model(trainer, trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, out,
               script_args.merge_lora)
    finish_run(out, "reward", metrics, (script_args, training_args, model_args), model_args.model_name_or_path,
               script_args.dataset_name)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("reward", run, (RewardArguments, RewardConfig, ModelConfig), argv)

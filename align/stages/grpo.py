"""GRPO with TRL's GRPOTrainer and a verifiable reward: 1 when the answer after "####" is the right number."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig, GRPOTrainer, ModelConfig

from align.data.tasks import is_correct
from align.stages.common import (
    JsonlLogger,
    NonFiniteGuard,
    PromptDataArguments,
    add_missing_tokens,
    check_model_dir,
    finish_run,
    fit_model_to_tokenizer,
    load_stage_data,
    load_tokenizer,
    model_kwargs,
    peft_config_for,
    reference_from_grown_model,
    require_eval_data,
    save_model,
    stage_main,
    start_run,
    to_dataset,
    train_and_evaluate,
)


@dataclass
class GRPOArguments(PromptDataArguments):
    """Data and output options of `align grpo`; the data needs 'prompt' and 'answer' (the number after ####)."""

    dataset_answer_field: str = field(
        default="answer",
        metadata={"help": "the column holding the right answer: a number, or a worked solution ending in '#### N' "
                          "(GSM8K's 'answer')"},
    )


def exact_answer_reward(completions, answer, **kwargs) -> list[float]:
    """GSM8K-style exact match: 1.0 when the number after the last "####" equals the answer, else 0.0."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(is_correct(text, str(a))) for text, a in zip(texts, answer, strict=True)]


def build_trainer(script_args: GRPOArguments, training_args: GRPOConfig, model_args: ModelConfig):
    """The GRPOTrainer for a recipe (generation with model.generate: no vLLM needed), with the output directory
    prepared; returns (trainer, output_dir)."""
    from transformers import AutoModelForCausalLM

    require_eval_data(script_args, training_args)
    path = check_model_dir(model_args.model_name_or_path, "SFT model", "model_name_or_path")  # before --overwrite
    out = start_run(training_args, script_args)
    tokenizer = load_tokenizer(path)
    added = add_missing_tokens(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs(model_args))
    fit_model_to_tokenizer(model, tokenizer)
    columns = {"prompt": script_args.dataset_prompt_field, "answer": script_args.dataset_answer_field}
    train, evaluation = load_stage_data(script_args, training_args, "prompt", out, tokenizer, columns=columns,
                                        extra_columns=("answer",))
    for row in train + evaluation:
        row["answer"] = str(row["answer"])  # numbers or strings in the file; compared as text
    peft_config = peft_config_for(model_args, added, merge_lora=script_args.merge_lora)
    with reference_from_grown_model(model, added, out, peft_config):
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[exact_answer_reward],
            args=training_args,
            train_dataset=to_dataset(train),
            eval_dataset=to_dataset(evaluation) if evaluation else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[NonFiniteGuard("grpo"), JsonlLogger(out / "grpo_log.jsonl")],
        )
    return trainer, out


def run(script_args: GRPOArguments, training_args: GRPOConfig, model_args: ModelConfig) -> dict:
    trainer, out = build_trainer(script_args, training_args, model_args)
    metrics = train_and_evaluate(trainer, training_args)
    save_model(trainer, trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, out,
               script_args.merge_lora)
    finish_run(out, "grpo", metrics, (script_args, training_args, model_args), model_args.model_name_or_path,
               script_args.dataset_name)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("grpo", run, (GRPOArguments, GRPOConfig, ModelConfig), argv)

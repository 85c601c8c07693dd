"""Direct preference optimisation with TRL's DPOTrainer, from the SFT model on the reward stage's preference pairs."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from trl import DPOConfig, DPOTrainer, ModelConfig

from align.stages.common import (
    DataArguments,
    JsonlLogger,
    NonFiniteGuard,
    StageError,
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
class DPOArguments(DataArguments):
    """Data and output options of `align dpo` (the trainer's own options are DPOConfig's)."""


def check_loss_types(training_args: DPOConfig) -> None:
    """TRL checks loss_type only when it computes the first loss: a traceback once models and data are loaded."""
    help_text = next(f.metadata["help"] for f in fields(DPOConfig) if f.name == "loss_type")
    known = re.findall(r"`'(\w+)'`", help_text)  # the values TRL's help lists, as the installed version has them
    unknown = [t for t in training_args.loss_type if t not in known]
    if known and unknown:
        raise StageError(f"loss_type {', '.join(unknown)} is not a DPO loss; TRL's are {', '.join(known)}")


def build_trainer(script_args: DPOArguments, training_args: DPOConfig, model_args: ModelConfig):
    """The DPOTrainer for a recipe (reference = a frozen copy of the start model, or the adapter disabled under
    LoRA), with the output directory prepared; returns (trainer, output_dir)."""
    from transformers import AutoModelForCausalLM

    require_eval_data(script_args, training_args)
    check_loss_types(training_args)
    path = check_model_dir(model_args.model_name_or_path, "SFT model", "model_name_or_path")  # before --overwrite
    out = start_run(training_args, script_args)
    tokenizer = load_tokenizer(path)
    added = add_missing_tokens(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs(model_args))
    fit_model_to_tokenizer(model, tokenizer)
    train, evaluation = load_stage_data(script_args, training_args, "preference", out, tokenizer,
                                        max_length=training_args.max_length, long_rows="truncate")
    peft_config = peft_config_for(model_args, added, merge_lora=script_args.merge_lora)
    with reference_from_grown_model(model, added, out, peft_config):
        trainer = DPOTrainer(
            model=model,
            ref_model=None,
            args=training_args,
            train_dataset=to_dataset(train),
            eval_dataset=to_dataset(evaluation) if evaluation else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[NonFiniteGuard("dpo"), JsonlLogger(out / "dpo_log.jsonl")],
        )
    return trainer, out


def run(script_args: DPOArguments, training_args: DPOConfig, model_args: ModelConfig) -> dict:
    trainer, out = build_trainer(script_args, training_args, model_args)
    metrics = train_and_evaluate(trainer, training_args)
    save_model(trainer, trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, out,
               script_args.merge_lora)
    finish_run(out, "dpo", metrics, (script_args, training_args, model_args), model_args.model_name_or_path,
               script_args.dataset_name)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("dpo", run, (DPOArguments, DPOConfig, ModelConfig), argv)

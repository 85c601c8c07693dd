"""Supervised fine-tuning with TRL's SFTTrainer: chat data, loss on the assistant's tokens only, packing, LoRA."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from trl import ModelConfig, SFTConfig, SFTTrainer

from align.stages.common import (
    DataArguments,
    JsonlLogger,
    NonFiniteGuard,
    StageError,
    add_missing_tokens,
    assistant_turn_ends_with_eos,
    check_model_dir,
    finish_run,
    fit_model_to_tokenizer,
    log,
    load_stage_data,
    load_tokenizer,
    model_kwargs,
    peft_config_for,
    require_eval_data,
    save_model,
    stage_main,
    start_run,
    to_dataset,
    train_and_evaluate,
)


@dataclass
class SFTArguments(DataArguments):
    """Data and output options of `align sft` (the trainer's own options are SFTConfig's)."""


def marks_assistant_turns(tokenizer) -> bool:
    """Whether the chat template wraps assistant turns in {% generation %}, which TRL's assistant-only loss needs."""
    return bool(re.search(r"\{%-?\s*generation\s*-?%\}", tokenizer.chat_template or ""))


def one_row_per_assistant_turn(rows: list[dict]) -> list[dict]:
    """Conversations as prompt/completion rows, one per assistant turn with the conversation before it as prompt:
    the loss then falls on every assistant turn once, under any chat template."""
    return [{"prompt": row["messages"][:i], "completion": [message]}
            for row in rows for i, message in enumerate(row["messages"]) if message["role"] == "assistant"]


def build_trainer(script_args: SFTArguments, training_args: SFTConfig, model_args: ModelConfig):
    """The SFTTrainer for a recipe, with the output directory prepared; returns (trainer, output_dir)."""
    from transformers import AutoModelForCausalLM

    if training_args.dataset_text_field != "text":
        raise StageError("--dataset_text_field is for plain-text data, which align sft does not read "
                         "(it trains on messages or prompt/completion rows, loss on the answers only); continue "
                         "pretraining on text with `align pretrain --init_from MODEL --sources FILE`")
    require_eval_data(script_args, training_args)
    path = check_model_dir(model_args.model_name_or_path, "base model", "model_name_or_path")  # before --overwrite
    out = start_run(training_args, script_args)
    tokenizer = load_tokenizer(path)
    added = add_missing_tokens(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs(model_args))
    fit_model_to_tokenizer(model, tokenizer)
    if not assistant_turn_ends_with_eos(tokenizer):
        warnings.warn("the chat template does not end assistant turns with eos: the model will not learn to stop "
                      "where the reward model and PPO expect it")

    train, evaluation = load_stage_data(script_args, training_args, "sft", out, tokenizer,
                                        max_length=training_args.max_length, long_rows="truncate")
    if "messages" in train[0] and not marks_assistant_turns(tokenizer):
        train, evaluation = one_row_per_assistant_turn(train), one_row_per_assistant_turn(evaluation)
        log(f"the chat template of {path} does not mark assistant turns with {{% generation %}}: each conversation is "
            f"trained as one prompt/completion row per assistant turn ({len(train)} train rows)")
    # Loss on what the assistant says only, set explicitly: TRL's default depends on the columns it sees.
    if "messages" in train[0]:
        training_args.assistant_only_loss = True
    else:
        training_args.completion_only_loss = True
    peft_config = peft_config_for(model_args, added, merge_lora=script_args.merge_lora)
    tied = model.config.tie_word_embeddings
    if peft_config is not None and added and tied and training_args.loss_type == "chunked_nll":
        # PEFT wraps a tied LM head to train the new rows; TRL's chunked loss reads the head's weight directly and
        # cannot take that wrapper (an AttributeError in TRL 1.12), its plain loss can: the same value.
        training_args.loss_type = "nll"
        log("LoRA with the new tokens of a tied LM head: loss_type nll instead of chunked_nll")
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=to_dataset(train),
        eval_dataset=to_dataset(evaluation) if evaluation else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[NonFiniteGuard("sft"), JsonlLogger(out / "sft_log.jsonl")],
    )
    return trainer, out


def run(script_args: SFTArguments, training_args: SFTConfig, model_args: ModelConfig) -> dict:
    trainer, out = build_trainer(script_args, training_args, model_args)
    metrics = train_and_evaluate(trainer, training_args)
    save_model(trainer, trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class, out,
               script_args.merge_lora)
    finish_run(out, "sft", metrics, (script_args, training_args, model_args), model_args.model_name_or_path,
               script_args.dataset_name)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("sft", run, (SFTArguments, SFTConfig, ModelConfig), argv)

"""PPO with TRL's PPOTrainer (trl.experimental.ppo: trl 1.9-1.12, deleted upstream in 1.13) plus the guards it lacks."""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from trl import ModelConfig

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # known and pinned: trl>=1.9,<1.13
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402

from align.data.validate import prompt_ids
from align.hardware import unsharded_warning
from align.runs import Terminated, sigterm_unwinds
from align.stages.common import (
    JsonlLogger,
    NonFiniteGuard,
    PromptDataArguments,
    StageError,
    check_model_dir,
    finish_run,
    fit_model_to_tokenizer,
    load_stage_data,
    load_tokenizer,
    log,
    model_kwargs,
    peft_config_for,
    require_pad,
    resume_arg,
    save_model,
    stage_main,
    start_run,
    to_dataset,
)

LOG_FILE = "ppo_log.jsonl"
VALUE_DIR = "value_model"
RATIO_RANGE = (0.5, 2.0)
KL_TOLERANCE = 0.01  # the k1 estimate is a noisy sample mean: tiny negative values are noise, not a bug


@dataclass
class PPOArguments(PromptDataArguments):
    """Data options of `align ppo`; the models are PPOConfig's sft_model_path and reward_model_path."""

    max_prompt_length: int | None = field(
        default=512, metadata={"help": "drop (and count) prompts longer than this many tokens"}
    )
    eval_prompts: int = field(
        default=64,
        metadata={"help": "without a test split or eval_fraction, PPO's (required) eval set is the first N prompts"},
    )


class PPOMonitor(JsonlLogger):
    """Writes each PPO step to ppo_log.jsonl and warns when KL turns negative or the policy ratio drifts."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.negative_kl_steps = 0
        self.ratio_out_of_range_steps = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        logs = logs or {}
        kl, ratio = logs.get("objective/kl"), logs.get("val/ratio")
        if kl is not None and kl < -KL_TOLERANCE:
            self.negative_kl_steps += 1
            if state.is_world_process_zero:
                warnings.warn(f"PPO step {state.global_step}: KL(policy || reference) estimate is {kl:.4g} < 0; the "
                              "sampled responses are likelier under the reference than under the policy, which points "
                              "to a generation/scoring mismatch (temperature, padding) or too few episodes per batch")
        if ratio is not None and not RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1]:
            self.ratio_out_of_range_steps += 1
            if state.is_world_process_zero:
                warnings.warn(f"PPO step {state.global_step}: val/ratio (new/old policy probability) is {ratio:.4g}, "
                              f"outside {list(RATIO_RANGE)}: the policy moves too far per update; lower learning_rate "
                              "or num_ppo_epochs")


def tokenizer_fingerprint(tokenizer) -> dict:
    from align.tokenizer import tokenizer_hash

    try:
        vocab = tokenizer_hash(tokenizer)
    except (AttributeError, KeyError, ValueError):  # not a fast tokenizer
        vocab = hash(tuple(sorted(tokenizer.get_vocab().items())))
    return {"vocabulary": vocab, "size": len(tokenizer), "eos": tokenizer.eos_token, "pad": tokenizer.pad_token}


def check_same_tokenizer(policy_tokenizer, reward_tokenizer, policy_path: str, reward_path: str) -> None:
    """PPO feeds the policy's token ids straight into the reward model, so both must use one tokenizer."""
    a, b = tokenizer_fingerprint(policy_tokenizer), tokenizer_fingerprint(reward_tokenizer)
    if a != b:
        differ = ", ".join(f"{k} {b[k]!r} vs {a[k]!r}" for k in a if a[k] != b[k])
        raise StageError(
            f"the reward model {reward_path} uses a different tokenizer than the policy {policy_path} (reward vs "
            f"policy: {differ}); PPO "
            "passes the policy's token ids to the reward model unchanged. Train the reward model from this SFT model: "
            f"align reward --model_name_or_path {policy_path}"
        )


def prompt_room(context: int | None, response_length: int, max_prompt_length: int | None) -> int | None:
    """The longest prompt PPO can take: a prompt and its response must fit the policy's `context` positions
    (past them a model with learned positions fails mid-run, one with RoPE extrapolates)."""
    if context is None:
        return max_prompt_length
    if response_length >= context:
        raise StageError(f"response_length {response_length} leaves no room for a prompt in the model's {context} "
                         "positions; lower --response_length")
    room = context - response_length
    if max_prompt_length is None or max_prompt_length > room:
        log(f"prompts over {room} tokens are dropped: with response_length {response_length} longer ones would not "
            f"fit the model's {context} positions (max_prompt_length was {max_prompt_length or 'unset'})")
        return room
    return max_prompt_length


def check_ppo_config(training_args: PPOConfig, tokenizer) -> None:
    """Refuse PPOConfig combinations that trl 1.12's PPOTrainer gets silently wrong."""
    if resume_arg(training_args) is not None:
        raise StageError("PPOTrainer (trl<1.13) cannot resume from a checkpoint; start a new --output_dir")
    if training_args.gradient_accumulation_steps > 1 and training_args.num_mini_batches > 1:
        # The trainer sizes its per-update statistics by gradient_accumulation_steps but fills only
        # gradient_accumulation_steps / num_mini_batches of them per mini-batch, and Accelerate's accumulation spans
        # mini-batches: logged losses, KL-to-old and val/ratio are diluted by zeros and updates are merged.
        raise StageError(
            f"gradient_accumulation_steps={training_args.gradient_accumulation_steps} with num_mini_batches="
            f"{training_args.num_mini_batches}: trl 1.12's PPOTrainer then merges mini-batch updates and logs "
            "statistics diluted by zeros. Use gradient_accumulation_steps: 1 with per_device_train_batch_size as the "
            "rollout batch and num_mini_batches for updates per PPO epoch, or num_mini_batches: 1"
        )
    if training_args.stop_token_id is not None and training_args.stop_token_id != tokenizer.eos_token_id:
        raise StageError(
            f"stop_token_id={training_args.stop_token_id} is not eos ({tokenizer.eos_token_id}): trl 1.12 applies "
            "missing_eos_penalty by looking for eos, not the stop token (TRL #3750), and the reward model reads its "
            "score at eos; keep stop_token: eos"
        )
    if training_args.stop_token is None and training_args.stop_token_id is None:
        training_args.stop_token = "eos"


def tokenize_prompts(rows: list[dict], tokenizer):
    """input_ids of each prompt exactly as SFT and the reward model saw it: chat template + generation prompt."""
    return to_dataset([{"input_ids": prompt_ids(tokenizer, row["prompt"])} for row in rows])


def build_trainer(script_args: PPOArguments, training_args: PPOConfig, model_args: ModelConfig):
    """The PPOTrainer for a recipe, with the output directory prepared; returns (trainer, output_dir, monitor)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if model_args.model_name_or_path:
        raise StageError("PPO reads --sft_model_path (policy and reference) and --reward_model_path, not "
                         "--model_name_or_path")
    sft_path = check_model_dir(training_args.sft_model_path, "SFT model", "sft_model_path")
    reward_path = check_model_dir(training_args.reward_model_path, "reward model", "reward_model_path", kind="reward")
    tokenizer = load_tokenizer(sft_path, padding_side="left")  # PPO generates from left-padded queries
    require_pad(tokenizer, sft_path, "ppo")
    check_same_tokenizer(tokenizer, load_tokenizer(reward_path), sft_path, reward_path)
    check_ppo_config(training_args, tokenizer)
    context = getattr(AutoConfig.from_pretrained(sft_path), "max_position_embeddings", None)
    script_args.max_prompt_length = prompt_room(context, training_args.response_length, script_args.max_prompt_length)
    out = start_run(training_args, script_args, can_resume=False)  # refused by check_ppo_config

    policy = AutoModelForCausalLM.from_pretrained(sft_path, **model_kwargs(model_args))
    fit_model_to_tokenizer(policy, tokenizer)  # generation pads with pad and stops at eos
    peft_config = peft_config_for(model_args)
    # Under LoRA the reference is the policy with its adapter disabled, except in multi-process runs: trl 1.12 then
    # reaches `model.policy` through the DDP wrapper, which fails, so the reference is a second copy of the SFT
    # model there (the same weights the disabled adapter would give).
    ref = None
    if peft_config is None or PartialState().num_processes > 1:
        ref = AutoModelForCausalLM.from_pretrained(sft_path, **model_kwargs(model_args))
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1,
                                                                      **model_kwargs(model_args))
    value_model = AutoModelForSequenceClassification.from_pretrained(reward_path, num_labels=1,
                                                                     **model_kwargs(model_args))
    for model in (reward_model, value_model):
        model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token: eos

    train, evaluation = load_stage_data(script_args, training_args, "prompt", out, tokenizer,
                                        columns={"prompt": script_args.dataset_prompt_field},
                                        max_prompt_length=script_args.max_prompt_length)
    evaluation = evaluation or train[: script_args.eval_prompts]
    monitor = PPOMonitor(out / LOG_FILE)
    trainer = PPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref,
        reward_model=reward_model,
        train_dataset=tokenize_prompts(train, tokenizer),
        value_model=value_model,
        eval_dataset=tokenize_prompts(evaluation, tokenizer),  # required by trl even with num_sample_generations=0
        callbacks=[NonFiniteGuard("ppo"), monitor],
        peft_config=peft_config,
    )
    return trainer, out, monitor


def run(script_args: PPOArguments, training_args: PPOConfig, model_args: ModelConfig) -> dict:
    trainer, out, monitor = build_trainer(script_args, training_args, model_args)
    start = time.time()
    if unsharded := unsharded_warning(trainer.accelerator.distributed_type):
        log(f"warning: {unsharded}")
    try:
        with sigterm_unwinds():  # nothing to save: a checkpoint of trl's PPOTrainer cannot be resumed
            trainer.train()
    except Terminated:  # written by each process that got the signal: the others may only see it end
        sys.stderr.write(f"align ppo: terminated (SIGTERM) after step {trainer.state.global_step} of "
                         f"{trainer.state.max_steps}; no model was saved, and PPO cannot resume: start again with "
                         "--overwrite true\n")
        raise
    metrics = {k: v for k, v in trainer.state.log_history[-1].items()} if trainer.state.log_history else {}
    metrics.update({
        "train_runtime": time.time() - start,
        "step": trainer.state.global_step,
        "episodes": trainer.state.episode,
        "guard/negative_kl_steps": monitor.negative_kl_steps,
        "guard/ratio_out_of_range_steps": monitor.ratio_out_of_range_steps,
    })
    wrapper = trainer.accelerator.unwrap_model(trainer.model)  # PolicyAndValueWrapper(policy, value_model)
    tokenizer = trainer.processing_class
    tokenizer.padding_side = "right"  # as every other stage saves it; generation pads on the left by itself
    save_model(trainer, wrapper.policy, tokenizer, out, script_args.merge_lora)
    if PartialState().is_main_process:
        wrapper.value_model.save_pretrained(out / VALUE_DIR, safe_serialization=True)
        tokenizer.save_pretrained(out / VALUE_DIR)
    finish_run(out, "ppo", metrics, (script_args, training_args, model_args), training_args.sft_model_path,
               script_args.dataset_name)
    return metrics


def main(argv: list[str] | None = None) -> int:
    return stage_main("ppo", run, (PPOArguments, PPOConfig, ModelConfig), argv)

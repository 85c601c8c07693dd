"""Alignment stages end to end on the tiny model: SFT -> reward -> PPO, DPO and GRPO, in-process and as 2-process
`accelerate launch` jobs; outputs load with AutoModel classes and generate through `pipeline` with chat messages."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import conftest
import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig,
                          pipeline)

from align.stages import dpo, grpo, ppo, reward, sft

ROOT = Path(__file__).resolve().parents[1]
CPU_DDP = ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"
QUESTION = [{"role": "user", "content": "Question: Tom has 3 apples and gets 4 more. How many apples does Tom have now?"
                                        "\nAnswer:"}]
FAST = ["--report_to", "none", "--save_strategy", "no", "--activation_checkpointing", "false", "--logging_steps", "1",
        "--dataloader_num_workers", "0"]


def demo_args(data_dir):
    """Small demo data shared by every stage of a test run."""
    return ["--dataset_name", "demo", "--data_dir", str(data_dir), "--demo_n_sft", "48", "--demo_n_preference", "16",
            "--demo_n_prompts", "32", "--demo_n_heldout", "8"]


def sft_args(base, out, data_dir):
    return ["--config", str(ROOT / "recipes/tiny/sft.yaml"), "--model_name_or_path", str(base), "--output_dir",
            str(out), "--max_steps", "2", "--per_device_train_batch_size", "8", "--eval_fraction", "0.2",
            *demo_args(data_dir), *FAST]


def reward_args(sft_dir, out, data_dir):
    return ["--config", str(ROOT / "recipes/tiny/reward.yaml"), "--model_name_or_path", str(sft_dir), "--output_dir",
            str(out), "--max_steps", "2", "--per_device_train_batch_size", "8", "--eval_fraction", "0.25",
            "--self_negative_samples", "2", "--self_negative_max_new_tokens", "8", *demo_args(data_dir), *FAST]


def ppo_args(sft_dir, reward_dir, out, data_dir, batch=8):
    return ["--config", str(ROOT / "recipes/tiny/ppo.yaml"), "--sft_model_path", str(sft_dir), "--reward_model_path",
            str(reward_dir), "--output_dir", str(out), "--total_episodes", str(2 * batch),
            "--per_device_train_batch_size", str(batch), "--local_rollout_forward_batch_size", str(batch),
            "--per_device_eval_batch_size", str(batch), "--response_length", "8", "--eval_prompts", "8",
            "--num_ppo_epochs", "2", *demo_args(data_dir), *FAST]


def dpo_args(sft_dir, out, data_dir):
    return ["--config", str(ROOT / "recipes/tiny/dpo.yaml"), "--model_name_or_path", str(sft_dir), "--output_dir",
            str(out), "--max_steps", "2", "--per_device_train_batch_size", "4", "--eval_fraction", "0.25",
            *demo_args(data_dir), *FAST]


def grpo_args(sft_dir, out, data_dir):
    return ["--config", str(ROOT / "recipes/tiny/grpo.yaml"), "--model_name_or_path", str(sft_dir), "--output_dir",
            str(out), "--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "4",
            "--max_completion_length", "8", *demo_args(data_dir), *FAST]


def read_metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


def assert_generates(model_dir):
    """The directory loads as a causal LM and answers chat messages through pipeline('text-generation')."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template and tokenizer.pad_token_id != tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    generate = pipeline("text-generation", model=str(model_dir), device="cpu")
    out = generate(QUESTION, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert out[-1]["role"] == "assistant" and isinstance(out[-1]["content"], str)


def assert_run_files(out):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "metrics.json",
                 "recipe.yaml", "data_report.json", "README.md"):
        assert (Path(out) / name).is_file(), name


# ----------------------------------------------------------------------------------------------------------------
# One process, in this process: the chain SFT -> reward -> PPO, plus DPO and GRPO


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="module")
def sft_dir(tiny_hf_dir, run_dir):
    out = run_dir / "sft"
    assert sft.main(sft_args(tiny_hf_dir, out, run_dir / "data")) == 0
    return out


@pytest.fixture(scope="module")
def reward_dir(sft_dir, run_dir):
    out = run_dir / "reward"
    assert reward.main(reward_args(sft_dir, out, run_dir / "data")) == 0
    return out


def test_sft_writes_a_chat_model(sft_dir, run_dir):
    assert_run_files(sft_dir)
    for name in ("sft.jsonl", "preferences.jsonl", "prompts.jsonl", "heldout.jsonl"):
        assert (run_dir / "data" / name).is_file()  # the demo data users can copy the format from
    metrics = read_metrics(sft_dir)
    assert metrics["stage"] == "sft" and metrics["num_processes"] == 1
    assert "train_loss" in metrics and "eval_loss" in metrics
    assert_generates(sft_dir)


def test_the_saved_recipe_repeats_the_run(sft_dir, tmp_path):
    """A stage's recipe.yaml is a recipe: every resolved field (TRL's nested configs too) parses back."""
    import yaml

    again = tmp_path / "again"
    assert sft.main(["--config", str(sft_dir / "recipe.yaml"), "--output_dir", str(again), "--max_steps", "1"]) == 0
    first, second = (yaml.safe_load((d / "recipe.yaml").read_text()) for d in (sft_dir, again))
    changed = {k for k in first if first[k] != second[k]}
    assert changed <= {"output_dir", "max_steps", "logging_dir"}, changed
    assert not {"overwrite", "resume_from_checkpoint"} & set(first)  # how a run treated its directory, not the run


def test_sft_loss_is_on_the_answer_only(tiny_hf_dir, tmp_path):
    """Prompt/completion and messages data both mask everything but the assistant's tokens (and its eos)."""
    from trl import ModelConfig, SFTConfig

    from align.stages.common import parse_stage_args

    rows = [{"messages": [{"role": "system", "content": "Be brief."}, *QUESTION,
                          {"role": "assistant", "content": "3 + 4 = 7\n#### 7"}]}] * 4
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for dataset in (data, None):
        args = sft_args(tiny_hf_dir, tmp_path / f"out-{dataset is None}", tmp_path / "data")
        if dataset is not None:
            args += ["--dataset_name", str(dataset), "--eval_fraction", "0"]
        trainer, _ = sft.build_trainer(*parse_stage_args((sft.SFTArguments, SFTConfig, ModelConfig), args))
        example = trainer.train_dataset[0]
        tokenizer = trainer.processing_class
        trained = [i for i, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
        text = tokenizer.decode(trained)
        assert text.endswith(tokenizer.eos_token) and "#### " in text
        assert "Question" not in text and "<|assistant|>" not in text and "<|user|>" not in text


def test_sft_on_a_chat_template_without_generation_markers(tiny_hf_dir, tmp_path):
    """Most hub templates lack {% generation %}, without which TRL cannot find assistant tokens: every assistant
    turn becomes a prompt/completion row of its own, trained on that turn only."""
    import shutil

    from trl import ModelConfig, SFTConfig

    from align.stages.common import parse_stage_args

    base = tmp_path / "plain-template"
    shutil.copytree(tiny_hf_dir, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    tokenizer.save_pretrained(base)
    turns = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4"},
             {"role": "user", "content": "And 3 + 5?"}, {"role": "assistant", "content": "3 + 5 = 8"}]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": turns}) + "\n")
    args = sft_args(base, tmp_path / "out", tmp_path / "data") + ["--dataset_name", str(data), "--eval_fraction", "0",
                                                                 "--max_dropped_fraction", "0"]
    trainer, _ = sft.build_trainer(*parse_stage_args((sft.SFTArguments, SFTConfig, ModelConfig), args))
    assert len(trainer.train_dataset) == 2
    for example, answer in zip(trainer.train_dataset, ("2 + 2 = 4", "3 + 5 = 8"), strict=True):
        trained = [i for i, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
        assert answer in tokenizer.decode(trained) and "What" not in tokenizer.decode(trained)
        # the prompt is the conversation before this turn: the answer is not in it too
        prompt = [i for i, label in zip(example["input_ids"], example["labels"], strict=True) if label == -100]
        assert answer not in tokenizer.decode(prompt) and tokenizer.decode(prompt).count("What is 2 + 2?") == 1


def test_reward_model_scores_at_eos(reward_dir):
    assert_run_files(reward_dir)
    metrics = read_metrics(reward_dir)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0  # held-out pairwise accuracy
    assert metrics["eval_pairs"] == json.loads((reward_dir / "data_report.json").read_text())["rows"]["eval"]
    assert (reward_dir / "train_self_negatives.jsonl").is_file()  # the SFT model's own wrong answers
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    text = tokenizer.apply_chat_template(QUESTION + [{"role": "assistant", "content": "#### 7"}], tokenize=False)
    assert text.endswith(tokenizer.eos_token)  # the score is read at the eos that closes the answer
    batch = tokenizer([text, text[:-len(tokenizer.eos_token)]], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 1)


def test_ppo_logs_and_saves_policy_and_value(sft_dir, reward_dir, run_dir):
    out = run_dir / "ppo"
    assert ppo.main(ppo_args(sft_dir, reward_dir, out, run_dir / "data")) == 0
    assert_run_files(out)
    rows = [json.loads(line) for line in (out / ppo.LOG_FILE).read_text().splitlines()]
    assert len(rows) == 2
    for key in ("objective/kl", "objective/scores", "objective/rlhf_reward", "val/ratio", "episode"):
        assert all(key in row for row in rows), key
    metrics = read_metrics(out)
    assert metrics["episodes"] == 16 and "guard/negative_kl_steps" in metrics
    assert_generates(out)
    value = AutoModelForSequenceClassification.from_pretrained(out / ppo.VALUE_DIR)
    assert value.config.num_labels == 1


def test_dpo(sft_dir, run_dir):
    out = run_dir / "dpo"
    assert dpo.main(dpo_args(sft_dir, out, run_dir / "data")) == 0
    assert "eval_rewards/accuracies" in read_metrics(out)
    assert_generates(out)


def test_grpo_with_exact_answer_reward(sft_dir, run_dir):
    assert grpo.exact_answer_reward([[{"role": "assistant", "content": "3 + 4 = 7\n#### 7"}], "#### 8"],
                                    answer=["7", "7"]) == [1.0, 0.0]
    out = run_dir / "grpo"
    assert grpo.main(grpo_args(sft_dir, out, run_dir / "data")) == 0
    assert "rewards/exact_answer_reward/mean" in read_metrics(out)
    assert_generates(out)


def test_sft_lora_exports_a_merged_model(tiny_hf_dir, run_dir):
    out = run_dir / "sft-lora"
    args = sft_args(tiny_hf_dir, out, run_dir / "data") + ["--use_peft", "true", "--lora_r", "4",
                                                          "--lora_alpha", "8", "--learning_rate", "0.05"]
    assert sft.main(args) == 0
    assert not (out / "adapter_config.json").exists()  # merged: a plain checkpoint any tool can load
    base = AutoModelForCausalLM.from_pretrained(tiny_hf_dir)
    merged = AutoModelForCausalLM.from_pretrained(out)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(base.state_dict()[name], merged.state_dict()[name])  # the adapter was merged in
    assert_generates(out)


def test_ppo_with_lora_uses_the_disabled_adapter_as_reference(sft_dir, reward_dir, run_dir):
    out = run_dir / "ppo-lora"
    args = ppo_args(sft_dir, reward_dir, out, run_dir / "data") + ["--use_peft", "true", "--lora_r", "4",
                                                                  "--total_episodes", "8"]
    assert ppo.main(args) == 0
    assert not (out / "adapter_config.json").exists()
    assert_generates(out)


@pytest.fixture(scope="module")
def foreign_gpt2(run_dir, sft_dir):
    """A GPT-2-style checkpoint made with transformers whose tokenizer has only <|endoftext|> (no pad, no template)."""
    corpus = [json.loads(line)["completion"][0]["content"] for line in
              (run_dir / "data" / "sft.jsonl").read_text().splitlines()] * 4 + ["Question: How many apples?"] * 4
    return conftest.foreign_gpt2(run_dir / "foreign-gpt2", corpus, ["<|endoftext|>"], eos_token="<|endoftext|>",
                                 bos_token="<|endoftext|>")


def test_bring_your_own_gpt2_without_pad_or_chat_template(foreign_gpt2, tmp_path, run_dir):
    """SFT adds a pad token, the role tokens and a chat template, grows the embeddings, and the result runs
    through pipeline with chat messages."""
    out = tmp_path / "sft"
    assert sft.main(sft_args(foreign_gpt2, out, run_dir / "data")) == 0
    tuned = AutoTokenizer.from_pretrained(out)
    assert tuned.pad_token == "<|pad|>" and "<|assistant|>" in tuned.get_vocab()
    assert AutoModelForCausalLM.from_pretrained(out).get_input_embeddings().weight.shape[0] == len(tuned)
    # its generation config had no length: half the 128 positions (prompt + 256 new tokens would overrun them)
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 64
    grown = "tokens added to the base model's tokenizer (embedding rows grown, mean-initialised): "
    assert grown + "<|pad|>, <|system|>, <|user|>, <|assistant|>" in (out / "recipe.yaml").read_text()
    assert grown + "`<|pad|>`, `<|system|>`, `<|user|>`, `<|assistant|>`." in (out / "README.md").read_text()
    assert_generates(out)


def test_lora_on_a_model_whose_tokenizer_sft_extends(foreign_gpt2, tmp_path, run_dir, capsys):
    # The new rows stay trainable through PEFT's wrapper of the tied head (TRL's chunked loss cannot read it); an
    # unmerged adapter would need a grown base model that exists nowhere, so it is refused before training.
    lora = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8"]
    out = tmp_path / "lora"
    assert sft.main(sft_args(foreign_gpt2, out, run_dir / "data") + lora) == 0
    assert_generates(out)
    assert sft.main(sft_args(foreign_gpt2, tmp_path / "adapter", run_dir / "data") + lora
                    + ["--merge_lora", "false"]) == 2
    assert "with merge_lora false: it would need a base model with those tokens" in capsys.readouterr().err


def test_dpo_and_grpo_from_a_model_whose_tokenizer_they_extend(foreign_gpt2, tmp_path, run_dir):
    # TRL loads their reference model again from the model's path, which lacks the added tokens: the reference
    # must be the grown start model itself (DPO's first loss is then exactly log 2: policy == reference).
    out = tmp_path / "dpo"
    assert dpo.main(dpo_args(foreign_gpt2, out, run_dir / "data")) == 0
    first = json.loads((out / "dpo_log.jsonl").read_text().splitlines()[0])
    assert first["rewards/chosen"] == 0.0 and abs(first["loss"] - math.log(2)) < 1e-6
    assert not (out / "start-model").exists()
    assert_generates(out)
    out = tmp_path / "grpo"
    assert grpo.main(grpo_args(foreign_gpt2, out, run_dir / "data")) == 0
    assert not (out / "start-model").exists()
    assert_generates(out)


# ----------------------------------------------------------------------------------------------------------------
# Two processes: `accelerate launch --config_file recipes/accelerate/cpu_ddp.yaml scripts/<stage>.py` (gloo DDP)


def launch(script, args, timeout=600, check=True):
    """`script`: a name in scripts/, or the path of one elsewhere (it imports this checkout's align through
    PYTHONPATH, as scripts/ does: the virtual environment may hold another checkout's)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(CPU_DDP),
           "--main_process_port", str(conftest.free_port()), str(ROOT / "scripts" / script), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "dpo", "grpo"])
def test_two_process_launch(stage, tiny_hf_dir, sft_dir, reward_dir, run_dir):
    data_dir = run_dir / "data"
    out = run_dir / f"ddp-{stage}"
    args = {
        "sft": lambda: sft_args(tiny_hf_dir, out, data_dir) + ["--packing", "true"],
        "reward": lambda: reward_args(sft_dir, out, data_dir) + ["--self_negatives", "0.25",
                                                                 "--per_device_eval_batch_size", "3"],
        "ppo": lambda: ppo_args(sft_dir, reward_dir, out, data_dir, batch=4) + ["--total_episodes", "16"],
        "dpo": lambda: dpo_args(sft_dir, out, data_dir),
        "grpo": lambda: grpo_args(sft_dir, out, data_dir) + ["--per_device_train_batch_size", "2"],
    }[stage]()
    launch(f"{stage}.py", args)
    metrics = read_metrics(out)
    assert metrics["num_processes"] == 2
    if stage == "reward":
        assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1
        # every eval pair counted once, though the two processes' shares were padded to the same length
        assert metrics["eval_pairs"] == json.loads((out / "data_report.json").read_text())["rows"]["eval"]
    else:
        AutoModelForCausalLM.from_pretrained(out)


# ----------------------------------------------------------------------------------------------------------------
# SIGTERM (`kill`, a Slurm preemption): the step finishes, checkpoint-N is saved, exit 143; --resume_from_checkpoint
# true continues


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_from_it(tiny_hf_dir, tmp_path, monkeypatch, capsys):
    from trl import SFTTrainer

    def args(out):
        return sft_args(tiny_hf_dir, out, tmp_path / "data") + ["--max_steps", "4", "--warmup_steps", "0"]

    original = SFTTrainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == 1 and not training_step.sent:
            training_step.sent = True
            os.kill(os.getpid(), signal.SIGTERM)  # arrives during step 2: the step finishes, then it saves
        return original(self, *args, **kwargs)

    training_step.sent = False
    monkeypatch.setattr(SFTTrainer, "training_step", training_step)
    out = tmp_path / "sft"
    before = signal.getsignal(signal.SIGTERM)
    assert sft.main(args(out)) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back
    assert (f"SIGTERM: saved {out / 'checkpoint-2'} at step 2 of 4; continue with the same command and "
            "--resume_from_checkpoint true") in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()  # not finished
    monkeypatch.setattr(SFTTrainer, "training_step", original)
    assert sft.main(args(out) + ["--resume_from_checkpoint", "true"]) == 0
    metrics = read_metrics(out)
    assert metrics["resumed_from_step"] == 2 and metrics["step"] == 4 and "eval_loss" in metrics
    assert_generates(out)
    assert sft.main(args(tmp_path / "uninterrupted")) == 0
    logs = [list(map(json.loads, (d / "sft_log.jsonl").read_text().splitlines()))
            for d in (out, tmp_path / "uninterrupted")]
    losses = [[(r["step"], r["loss"]) for r in log if "loss" in r] for log in logs]
    assert losses[0] == losses[1] and len(losses[0]) == 4  # the steps after the checkpoint run as they would have
    assert [sorted(r) for r in logs[0]] == [sorted(r) for r in logs[1]]  # and log no more rows than it did


def test_a_sigterm_during_a_periodic_save_stops_at_that_checkpoint(tiny_hf_dir, tmp_path, monkeypatch, capsys):
    """The signal came after the step's vote: the run stops at the checkpoint being written, not one step and one
    save later; save_total_limit counts the checkpoints as usual."""
    from trl import SFTTrainer

    original = SFTTrainer._save_checkpoint

    def _save_checkpoint(self, *args, **kwargs):
        if self.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "_save_checkpoint", _save_checkpoint)
    out = tmp_path / "sft"
    assert sft.main(sft_args(tiny_hf_dir, out, tmp_path / "data") + [
        "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "1"]) == 143
    assert f"SIGTERM: saved {out / 'checkpoint-2'} at step 2 of 4" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_ctrl_c_saves_like_sigterm_and_a_second_one_stops_at_once(tiny_hf_dir, tmp_path, monkeypatch, capsys):
    from trl import SFTTrainer

    original = SFTTrainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == 1:
            for _ in range(training_step.presses):
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", training_step)
    before = signal.getsignal(signal.SIGINT)
    for presses, status in ((1, 130), (2, 130)):
        training_step.presses, out = presses, tmp_path / f"sft-{presses}"
        assert sft.main(sft_args(tiny_hf_dir, out, tmp_path / "data") + ["--max_steps", "4"]) == status
        assert signal.getsignal(signal.SIGINT) is before
        captured = capsys.readouterr()
        assert "Ctrl-C: saving a checkpoint after this step (Ctrl-C again to stop at once)" in captured.err
        saved = sorted(p.name for p in out.glob("checkpoint-*"))
        if presses == 1:
            assert f"Ctrl-C: saved {out / 'checkpoint-2'} at step 2 of 4" in captured.out and saved == ["checkpoint-2"]
        else:
            assert "align sft: interrupted; what was not saved in a checkpoint-N is lost" in captured.err
            assert saved == [] and not (out / "metrics.json").exists()


def test_ppo_stops_on_sigterm_with_a_message_and_no_model(sft_dir, reward_dir, run_dir, monkeypatch, capsys):
    """trl's PPOTrainer cannot resume, so there is nothing to save: it stops at once and says so."""
    original = ppo.PPOMonitor.on_log

    def on_log(self, *args, **kwargs):
        original(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # once step 1 is logged

    monkeypatch.setattr(ppo.PPOMonitor, "on_log", on_log)
    out = run_dir / "ppo-terminated"
    before = signal.getsignal(signal.SIGTERM)
    assert ppo.main(ppo_args(sft_dir, reward_dir, out, run_dir / "data")) == 143
    assert signal.getsignal(signal.SIGTERM) is before
    assert ("align ppo: terminated (SIGTERM) after step 1 of 2; no model was saved, and PPO cannot resume: start "
            "again with --overwrite true") in capsys.readouterr().err
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()


SIGTERM_TO_RANK_1 = """
import os, signal, sys
from trl import SFTTrainer
from align.stages import sft
original = SFTTrainer.training_step
def training_step(self, *args, **kwargs):  # rank 1 alone gets a SIGTERM, during step 2
    if os.environ["RANK"] == "1" and self.state.global_step == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, *args, **kwargs)
SFTTrainer.training_step = training_step
sys.exit(sft.main(sys.argv[1:]))
"""


def test_a_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tiny_hf_dir, tmp_path):
    script = tmp_path / "sigterm_to_rank_1.py"
    script.write_text(SIGTERM_TO_RANK_1)
    out = tmp_path / "ddp-sft"
    result = launch(script, sft_args(tiny_hf_dir, out, tmp_path / "data") + ["--max_steps", "4"], check=False)
    assert f"SIGTERM: saved {out / 'checkpoint-2'} at step 2 of 4" in result.stdout, result.stderr[-3000:]
    # Both stop there with 143; the one still exiting when the other has gone may be ended by torchrun (-15)
    exits = result.stderr.count("exitcode  : 143") + result.stderr.count("exitcode  : -15")
    assert "Connection closed" not in result.stderr and exits == 2, result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()

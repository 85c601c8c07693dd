"""Bad input to the stages: each is a clear error naming the file, line, column or field and what to do, or, for
rows, a printed and saved count of dropped rows that fails above a threshold; never a silent zero loss."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from align.data.validate import DataError, enforce, read_records, validate
from align.stages import ppo, reward, sft
from align.stages.common import NonFiniteGuard, NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]
USER = [{"role": "user", "content": "Question: Ann has 2 cups and gets 3 more. How many cups does Ann have now?"
                                    "\nAnswer:"}]
GOOD = {"prompt": USER, "completion": [{"role": "assistant", "content": "2 + 3 = 5\n#### 5"}]}
FAST = ["--report_to", "none", "--save_strategy", "no", "--gradient_checkpointing", "false", "--logging_steps", "1"]


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def sft_main(base, out, data, *extra):
    return sft.main(["--model_name_or_path", str(base), "--output_dir", str(out), "--dataset_name", str(data),
                     "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_length", "64", *FAST, *extra])


def copy_model(src, dst, tokenizer_change=None):
    shutil.copytree(src, dst)
    if tokenizer_change:
        tokenizer = AutoTokenizer.from_pretrained(src)
        tokenizer_change(tokenizer)
        tokenizer.save_pretrained(dst)
    return dst


def reward_dir_from(base, dst):
    """A one-label sequence classifier with the base's tokenizer: the shape of what `align reward` writes."""
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(base).save_pretrained(dst)
    return dst


# ----------------------------------------------------------------------------------------------------------------
# Rows and columns


def test_missing_columns_name_the_file_and_what_was_found(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": USER, "chosen": GOOD["completion"]}])
    with pytest.raises(DataError, match=r"pairs\.jsonl: missing column\(s\) 'rejected' \(found: chosen, prompt\)"):
        validate(read_records(data), "preference", str(data))
    with pytest.raises(DataError, match=r"no 'messages' column and no 'prompt' \+ 'completion'.*found: text"):
        validate(read_records(write_jsonl(tmp_path / "t.jsonl", [{"text": "hi"}])), "sft", "t.jsonl")
    with pytest.raises(DataError, match=r"missing column\(s\) 'answer'"):
        validate(read_records(write_jsonl(tmp_path / "p.jsonl", [{"prompt": USER}])), "prompt", "p.jsonl",
                 extra_columns=("answer",))


def test_bad_rows_are_dropped_with_file_line_and_reason(tmp_path):
    rows = [GOOD] * 6 + [
        {"prompt": [{"role": "human", "content": "hi"}], "completion": GOOD["completion"]},       # line 7
        {"prompt": USER, "completion": [{"role": "assistant", "content": "  "}]},                 # line 8
        {"prompt": USER, "completion": [{"role": "user", "content": "#### 5"}]},                  # line 9
        '{"prompt": [',                                                                           # line 10
        {"prompt": USER},                                                                         # line 11
        {"prompt": "Question: plain text?", "completion": "#### 1"},                              # line 12
        {"messages": [*USER, {"role": "assistant", "content": "#### 5"}]},                        # line 13
    ]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    kept, report = validate(read_records(data), "sft", str(data))
    assert len(kept) == 6 and report.total == 13
    assert report.dropped == {"wrong_role": 2, "empty_completion": 1, "unreadable": 1, "missing_column": 2,
                              "mixed_format": 1}
    text = "\n".join(report.examples)
    assert f"{data}:7: prompt[0].role is 'human'; roles are system, user, assistant" in text
    assert f"{data}:8: 'completion' is empty" in text
    assert f"{data}:9: completion[0].role is 'user'" in text
    assert f"{data}:10: invalid JSON" in text
    assert f"{data}:11: missing 'completion'" in text
    with pytest.raises(DataError, match=r"dropped, more than max_dropped_fraction=0.05.*--max_dropped_fraction 0.54"):
        enforce(report, 0.05)
    enforce(report, 0.6)  # accepted when the user says so


def test_messages_and_preference_checks(tmp_path):
    convo = [{"messages": [{"role": "system", "content": "Be brief."}, *USER, {"role": "assistant", "content": "5"}]},
             {"messages": [*USER]},
             {"messages": [{"role": "assistant", "content": "5"}]}]
    kept, report = validate(read_records(write_jsonl(tmp_path / "m.jsonl", convo)), "sft", "m.jsonl")
    assert len(kept) == 1 and report.dropped == {"wrong_role": 2}
    answer = [{"role": "assistant", "content": "#### 5"}]
    pairs = [{"prompt": USER, "chosen": answer, "rejected": [{"role": "assistant", "content": "#### 6"}]},
             {"prompt": USER, "chosen": answer, "rejected": answer},
             {"prompt": [*USER, *answer], "chosen": answer, "rejected": answer}]
    kept, report = validate(read_records(write_jsonl(tmp_path / "p.jsonl", pairs)), "preference", "p.jsonl")
    assert len(kept) == 1 and report.dropped == {"identical_pair": 1, "wrong_role": 1}
    assert "prompt ends with a 'assistant' turn" in report.examples[1]


def test_rows_truncated_to_nothing_or_too_long(tiny_tokenizer, tmp_path):
    long_prompt = [{"role": "user", "content": "Question: " + "apples and pears " * 40 + "\nAnswer:"}]
    rows = [GOOD, {"prompt": long_prompt, "completion": GOOD["completion"]}]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    kept, report = validate(read_records(data), "sft", str(data), tokenizer=tiny_tokenizer, max_length=64)
    assert len(kept) == 1 and report.dropped == {"truncated_to_nothing": 1}
    assert f"{data}:2: the prompt alone is" in report.examples[0] and "raise max_length" in report.examples[0]
    pairs = [{"prompt": USER, "chosen": GOOD["completion"], "rejected": [{"role": "assistant", "content": "x " * 80}]}]
    _, report = validate(read_records(write_jsonl(tmp_path / "p.jsonl", pairs)), "preference", "p.jsonl",
                         tokenizer=tiny_tokenizer, max_length=64, long_rows="drop")
    assert report.dropped == {"too_long": 1} and "would silently skip it" in report.examples[0]
    _, report = validate(read_records(write_jsonl(tmp_path / "q.jsonl", [{"prompt": long_prompt}])), "prompt",
                         "q.jsonl", tokenizer=tiny_tokenizer, max_prompt_length=32)
    assert report.dropped == {"too_long": 1}


def test_stage_saves_the_report_and_fails_above_the_threshold(tiny_hf_dir, tmp_path):
    bad = {"prompt": USER, "completion": [{"role": "assistant", "content": ""}]}
    data = write_jsonl(tmp_path / "sft.jsonl", [GOOD] * 8 + [bad] * 2)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=rf"align sft: error: .*{data.name}: kept 8 of 10 rows, dropped 2 "
                                         r"\(2 empty_completion\)(.|\n)*sft.jsonl:9: 'completion' is empty"):
        sft_main(tiny_hf_dir, out, data)
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["dropped"] == {"empty_completion": 2} and report["train"]["kept"] == 8
    assert not (out / "model.safetensors").exists()
    # Within the threshold the run goes on, and the count is still saved.
    assert sft_main(tiny_hf_dir, tmp_path / "ok", data, "--max_dropped_fraction", "0.25") == 0
    assert json.loads((tmp_path / "ok" / "data_report.json").read_text())["train"]["kept"] == 8


def test_demo_data_settings_must_agree_across_stages(tiny_hf_dir, tmp_path):
    common = ["--dataset_name", "demo", "--data_dir", str(tmp_path / "data"), "--demo_n_sft", "16",
              "--demo_n_preference", "8", "--demo_n_prompts", "8", "--demo_n_heldout", "4"]
    assert sft_main(tiny_hf_dir, tmp_path / "a", "demo", *common) == 0
    with pytest.raises(SystemExit, match=r"holds demo data made with .*use the same demo_\* settings"):
        sft_main(tiny_hf_dir, tmp_path / "b", "demo", *common, "--demo_seed", "1")


# ----------------------------------------------------------------------------------------------------------------
# Models, tokenizers, output directories


def test_model_directory_missing_or_not_a_causal_lm(tiny_hf_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [GOOD] * 4)
    with pytest.raises(SystemExit, match=r"base model .*nope does not exist \(--model_name_or_path\)"):
        sft_main(tmp_path / "nope", tmp_path / "o1", data)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "gpt_config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"no config.json.*align export CKPT --out DIR"):
        sft_main(tmp_path / "ckpt", tmp_path / "o2", data)
    classifier = reward_dir_from(tiny_hf_dir, tmp_path / "rm")
    with pytest.raises(SystemExit, match=r"is a sequence classifier .* not a causal LM"):
        sft_main(classifier, tmp_path / "o3", data)
    with pytest.raises(SystemExit, match=r"is not a reward model .*pass the directory `align reward` wrote"):
        ppo.main(["--sft_model_path", str(tiny_hf_dir), "--reward_model_path", str(tiny_hf_dir),
                  "--output_dir", str(tmp_path / "o4"), *FAST])


def test_reward_and_ppo_refuse_a_tokenizer_without_a_distinct_pad(tiny_hf_dir, tmp_path):
    def pad_is_eos(tok):
        tok.pad_token = tok.eos_token

    same = copy_model(tiny_hf_dir, tmp_path / "pad-eos", pad_is_eos)
    with pytest.raises(SystemExit, match=r"uses the eos token '<\|endoftext\|>' as pad.*Run `align sft`"):
        reward.main(["--model_name_or_path", str(same), "--output_dir", str(tmp_path / "r"), *FAST])
    none = copy_model(tiny_hf_dir, tmp_path / "no-pad")
    config = json.loads((none / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (none / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(none).pad_token is None
    with pytest.raises(SystemExit, match=r"has no pad token; run `align sft`"):
        ppo.main(["--sft_model_path", str(none), "--reward_model_path",
                  str(reward_dir_from(tiny_hf_dir, tmp_path / "rm")), "--output_dir", str(tmp_path / "p"), *FAST])


def test_ppo_refuses_a_reward_model_with_another_tokenizer(tiny_hf_dir, tmp_path):
    rm = reward_dir_from(tiny_hf_dir, tmp_path / "rm")
    policy = copy_model(tiny_hf_dir, tmp_path / "policy", lambda tok: tok.add_tokens(["<|tool|>"]))
    with pytest.raises(SystemExit, match=r"uses a different tokenizer than the policy .*size 513 vs 512.*align reward "
                                         r"--model_name_or_path"):
        ppo.main(["--sft_model_path", str(policy), "--reward_model_path", str(rm), "--output_dir",
                  str(tmp_path / "p"), *FAST])


def test_ppo_refuses_what_trl_1_12_gets_wrong(tiny_hf_dir, tmp_path):
    rm = reward_dir_from(tiny_hf_dir, tmp_path / "rm")
    args = ["--sft_model_path", str(tiny_hf_dir), "--reward_model_path", str(rm), "--output_dir",
            str(tmp_path / "p"), *FAST]
    with pytest.raises(SystemExit, match=r"gradient_accumulation_steps=2 with num_mini_batches=2"):
        ppo.main(args + ["--gradient_accumulation_steps", "2", "--num_mini_batches", "2"])
    with pytest.raises(SystemExit, match=r"cannot resume"):
        ppo.main(args + ["--resume_from_checkpoint", "true"])
    with pytest.raises(SystemExit, match=r"stop_token_id=5 is not eos.*TRL #3750"):
        ppo.main(args + ["--stop_token_id", "5"])
    with pytest.raises(SystemExit, match=r"reads --sft_model_path"):
        ppo.main(args + ["--model_name_or_path", str(tiny_hf_dir)])
    assert not (tmp_path / "p").exists()  # refused before anything was written


def test_existing_output_dir_is_refused_unless_overwrite(tiny_hf_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [GOOD] * 4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("finished work")
    with pytest.raises(SystemExit, match=r"already exists and is not empty; pass --overwrite true"):
        sft_main(tiny_hf_dir, out, data)
    assert sft_main(tiny_hf_dir, out, data, "--overwrite", "true") == 0
    backups = list(tmp_path.glob("out.old-*"))
    assert len(backups) == 1 and (backups[0] / "keep.txt").read_text() == "finished work"


def test_non_finite_loss_stops_the_run(tiny_hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = copy_model(tiny_hf_dir, tmp_path / "nan")
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    data = write_jsonl(tmp_path / "sft.jsonl", [GOOD] * 4)
    with pytest.raises(SystemExit, match=r"align sft: error: sft: (loss|grad_norm) is nan at step 1; training stopped"):
        sft_main(broken, tmp_path / "out", data)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    guard = NonFiniteGuard("ppo")  # PPO logs its own losses and objectives
    with pytest.raises(NonFiniteLossError, match=r"ppo: loss/value_avg is inf"):
        guard.on_log(type("A", (), {"output_dir": "x"})(), type("S", (), {"global_step": 3})(), None,
                     logs={"objective/kl": 0.1, "loss/value_avg": math.inf})


def test_ppo_monitor_warns_on_negative_kl_and_ratio_drift(tmp_path):
    monitor = ppo.PPOMonitor(tmp_path / "log.jsonl")
    state = type("S", (), {"global_step": 1, "is_world_process_zero": True})()
    with pytest.warns(UserWarning, match=r"KL\(policy \|\| reference\) estimate is -0.5 < 0"):
        monitor.on_log(None, state, None, logs={"objective/kl": -0.5, "val/ratio": 1.0})
    with pytest.warns(UserWarning, match=r"val/ratio .* is 3, outside \[0.5, 2.0\]"):
        monitor.on_log(None, state, None, logs={"objective/kl": 0.2, "val/ratio": 3.0})
    assert (monitor.negative_kl_steps, monitor.ratio_out_of_range_steps) == (1, 1)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------------------------------------------
# Recipes and hub datasets


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").glob("*/*.yaml")
                                          if p.stem in ("sft", "reward", "ppo", "dpo", "grpo")))
def test_every_stage_recipe_parses(recipe, tmp_path):
    from trl import DPOConfig, GRPOConfig, ModelConfig, RewardConfig, SFTConfig
    from trl.experimental.ppo import PPOConfig

    from align.stages import dpo, grpo
    from align.stages.common import parse_stage_args

    stage = Path(recipe).stem
    types = {"sft": (sft.SFTArguments, SFTConfig), "reward": (reward.RewardArguments, RewardConfig),
             "ppo": (ppo.PPOArguments, PPOConfig), "dpo": (dpo.DPOArguments, DPOConfig),
             "grpo": (grpo.GRPOArguments, GRPOConfig)}[stage]
    script_args, training_args, _ = parse_stage_args((*types, ModelConfig),
                                                     ["--config", str(ROOT / recipe), "--output_dir", str(tmp_path)])
    assert script_args.dataset_name and training_args.output_dir == str(tmp_path)
    if torch.cuda.is_available() is False:
        assert training_args.use_cpu and not training_args.bf16  # chosen from the machine, whatever the YAML says


def test_hub_dataset_names_and_splits(monkeypatch, tmp_path):
    """The hub path (offline here): a clear error, and with datasets answering, UltraFeedback-style implicit-prompt
    pairs are read from the named splits and their prompt is split out."""
    import datasets

    from align.stages.common import DataArguments, load_stage_data

    args = DataArguments(dataset_name="HuggingFaceH4/no_such_dataset_offline", dataset_test_split="test")
    training_args = type("T", (), {"output_dir": str(tmp_path / "o")})()
    with pytest.raises(DataError, match=r"could not load the Hugging Face dataset (.|\n)*no network\? pass a local"):
        load_stage_data(args, training_args, "preference", tmp_path)

    user = {"role": "user", "content": "What is 2 + 2?"}
    rows = {split: [{"prompt": "What is 2 + 2?", "chosen": [user, {"role": "assistant", "content": "4"}],
                     "rejected": [user, {"role": "assistant", "content": "5"}], "score_chosen": 9.0}] * n
            for split, n in (("train_prefs", 6), ("test_prefs", 2))}
    calls = []

    def local_copy(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(rows[split])

    monkeypatch.setattr(datasets, "load_dataset", local_copy)
    args = DataArguments(dataset_name="HuggingFaceH4/ultrafeedback_binarized", dataset_train_split="train_prefs",
                         dataset_test_split="test_prefs")
    train, evaluation = load_stage_data(args, training_args, "preference", tmp_path)
    assert calls == [("HuggingFaceH4/ultrafeedback_binarized", None, "test_prefs"),
                     ("HuggingFaceH4/ultrafeedback_binarized", None, "train_prefs")]
    assert len(train) == 6 and len(evaluation) == 2
    assert train[0] == {"prompt": [user], "chosen": [{"role": "assistant", "content": "4"}],
                        "rejected": [{"role": "assistant", "content": "5"}]}
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["train"]["source"] == "HuggingFaceH4/ultrafeedback_binarized[train_prefs]"


def test_eval_fraction_splits_conversations_that_share_a_system_prompt():
    from align.stages.common import split_eval

    system = {"role": "system", "content": "Answer with a number."}
    rows = [{"messages": [system, {"role": "user", "content": f"What is {i} plus 1?"},
                          {"role": "assistant", "content": str(i + 1)}]} for i in range(200)]
    train, held = split_eval(rows, 0.2)
    assert 20 <= len(held) <= 60 and len(train) + len(held) == 200
    pairs = [{"prompt": [{"role": "user", "content": f"q{i // 2}"}], "chosen": "a", "rejected": f"b{i}"}
             for i in range(100)]
    train, held = split_eval(pairs, 0.3)
    held_prompts = {json.dumps(r["prompt"]) for r in held}
    assert held and not any(json.dumps(r["prompt"]) in held_prompts for r in train)  # a prompt stays on one side

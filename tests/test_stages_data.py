"""Bad input to the stages: each is a clear error naming the file, line, column or field and what to do, or, for
rows, a printed and saved count of dropped rows that fails above a threshold; never a silent zero loss."""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from align.data.validate import DataError, enforce, read_records, validate
from align.stages import ppo, reward, sft
from align.stages.common import NonFiniteGuard, NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]
USER = [{"role": "user", "content": "Question: Ann has 2 cups and gets 3 more. How many cups does Ann have now?"
                                    "\nAnswer:"}]
GOOD = {"prompt": USER, "completion": [{"role": "assistant", "content": "2 + 3 = 5\n#### 5"}]}
FAST = ["--report_to", "none", "--save_strategy", "no", "--activation_checkpointing", "false", "--logging_steps", "1"]


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


def assert_refused(capsys, call, pattern) -> str:
    """`call()` refuses as a user error should: exit status 2 (returned by a stage's main, or SystemExit(2) from
    the recipe parser) and a message on stderr matching `pattern`, with no traceback. Returns stderr."""
    try:
        code = call()
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and re.search(pattern, err) and "Traceback" not in err, err
    return err


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
    # a string prompt beside answers given as turns: said as such, not as an empty prompt extracted from them
    mixed = [{"prompt": "What is 2 + 3?", "chosen": answer, "rejected": [{"role": "assistant", "content": "#### 6"}]}]
    _, report = validate(read_records(write_jsonl(tmp_path / "x.jsonl", mixed)), "preference", "x.jsonl")
    assert report.dropped == {"mixed_format": 1} and "'chosen' is a list" in report.examples[0], report.examples


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


def test_kept_rows_that_the_trainer_truncates_are_counted(tiny_tokenizer, tmp_path, capsys):
    """A conversation whose later turns lie past max_length keeps its row but loses their loss: said and saved."""
    turn = [{"role": "user", "content": "Question: What is 3 + 4?"}, {"role": "assistant", "content": "#### 7"}]
    rows = [{"messages": turn}, {"messages": turn * 6}, GOOD]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    kept, report = validate(read_records(data), "sft", str(data), tokenizer=tiny_tokenizer, max_length=64)
    assert len(kept) == 2 and report.n_dropped == 1 and report.truncated == 1  # GOOD is prompt/completion: dropped
    assert report.as_dict()["truncated"] == 1
    enforce(report, max_dropped_fraction=0.5)
    out = capsys.readouterr().out
    assert "1 kept row(s) are longer than max_length=64 and are truncated" in out and f"First: {data}:2 (" in out
    _, report = validate(read_records(data), "sft", str(data), tokenizer=tiny_tokenizer, max_length=1024)
    assert report.truncated == 0


def test_stage_saves_the_report_and_fails_above_the_threshold(tiny_hf_dir, tmp_path, capsys):
    bad = {"prompt": USER, "completion": [{"role": "assistant", "content": ""}]}
    data = write_jsonl(tmp_path / "sft.jsonl", [GOOD] * 8 + [bad] * 2)
    out = tmp_path / "out"
    assert_refused(capsys, lambda: sft_main(tiny_hf_dir, out, data),
                   rf"align sft: error: .*{data.name}: kept 8 of 10 rows, dropped 2 \(2 empty_completion\)(.|\n)*"
                   r"sft.jsonl:9: 'completion' is empty")
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["dropped"] == {"empty_completion": 2} and report["train"]["kept"] == 8
    assert not (out / "model.safetensors").exists()
    # Within the threshold the run goes on, and the count is still saved; the stopped run's directory, which
    # holds nothing but its report, takes the next attempt without --overwrite.
    assert sft_main(tiny_hf_dir, out, data, "--max_dropped_fraction", "0.25") == 0
    assert json.loads((out / "data_report.json").read_text())["train"]["kept"] == 8
    assert (out / "model.safetensors").exists() and not list(tmp_path.glob("out.old-*"))


def test_demo_data_settings_must_agree_across_stages(tiny_hf_dir, tmp_path, capsys):
    common = ["--dataset_name", "demo", "--data_dir", str(tmp_path / "data"), "--demo_n_sft", "16",
              "--demo_n_preference", "8", "--demo_n_prompts", "8", "--demo_n_heldout", "4"]
    assert sft_main(tiny_hf_dir, tmp_path / "a", "demo", *common) == 0
    assert_refused(capsys, lambda: sft_main(tiny_hf_dir, tmp_path / "b", "demo", *common, "--demo_seed", "1"),
                   r"holds demo data made with .*use the same demo_\* settings")


def test_a_demo_data_dir_that_is_a_file_is_refused(tiny_hf_dir, tmp_path, capsys):
    data_dir = tmp_path / "data"
    data_dir.write_text("a file\n")
    assert_refused(capsys, lambda: sft_main(tiny_hf_dir, tmp_path / "out", "demo", "--data_dir", str(data_dir)),
                   r"align sft: error: data_dir .*data is a file; give a directory for the demo data")


def sft_two_processes(base, out, *extra):
    """`align sft` as a 2-process gloo DDP job (recipes/accelerate/cpu_ddp.yaml)."""
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = str(free.getsockname()[1])
    free.close()
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", port,
           str(ROOT / "scripts" / "sft.py"), "--model_name_or_path", str(base), "--output_dir", str(out), *FAST,
           *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_demo_data_settings_that_disagree_stop_every_process_with_the_message(tiny_hf_dir, tmp_path):
    """Under 2 processes the main process checks the demo data first while the other waits: its refusal must end
    the other rank with the same message, not a dropped connection in the barrier."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo.json").write_text(json.dumps({"seed": 1, "n_sft": 16, "n_preference": 8,
                                                             "n_prompts": 8, "n_heldout": 4, "n_rejected": 2}))
    result = sft_two_processes(tiny_hf_dir, tmp_path / "out", "--dataset_name", "demo", "--data_dir",
                               str(tmp_path / "data"))
    assert result.returncode != 0
    assert result.stderr.count("align sft: error: ") == 2 and "holds demo data made with" in result.stderr
    assert "[rank1]" not in result.stderr and "Connection closed" not in result.stderr, result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------------
# Models, tokenizers, output directories


def test_a_stage_error_is_written_in_one_piece(tmp_path, monkeypatch):
    """(print's two writes ran the ranks' messages, sharing stderr under a launch, together on one line)"""
    writes = []
    monkeypatch.setattr(sys.stderr, "write", writes.append)
    assert sft_main(tmp_path / "nope", tmp_path / "out", tmp_path / "sft.jsonl") == 2
    errors = [w for w in writes if "error:" in w]
    assert len(errors) == 1 and errors[0].startswith("align sft: error: ") and errors[0].endswith("\n"), writes


def test_an_output_path_that_is_a_file_stops_every_process_with_the_message(tiny_hf_dir, tmp_path):
    """The main process creates output_dir while the others wait: its refusal must reach them too."""
    (tmp_path / "out").write_text("a file, not a directory\n")
    data = write_jsonl(tmp_path / "sft.jsonl", [GOOD] * 4)
    result = sft_two_processes(tiny_hf_dir, tmp_path / "out", "--dataset_name", str(data))
    assert result.returncode != 0
    assert result.stderr.count("align sft: error: output path") == 2 and "is a file" in result.stderr
    assert "[rank1]" not in result.stderr and "Connection closed" not in result.stderr, result.stderr[-3000:]


def test_model_directory_missing_or_not_a_causal_lm(tiny_hf_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", [GOOD] * 4)
    assert_refused(capsys, lambda: sft_main(tmp_path / "nope", tmp_path / "o1", data),
                   r"base model .*nope does not exist \(--model_name_or_path\)")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "gpt_config.json").write_text("{}")
    assert_refused(capsys, lambda: sft_main(tmp_path / "ckpt", tmp_path / "o2", data),
                   r"no config.json.*align export CKPT --out DIR")
    classifier = reward_dir_from(tiny_hf_dir, tmp_path / "rm")
    assert_refused(capsys, lambda: sft_main(classifier, tmp_path / "o3", data),
                   r"is a sequence classifier .* not a causal LM")
    args = ["--sft_model_path", str(tiny_hf_dir), "--reward_model_path", str(tiny_hf_dir), "--output_dir",
            str(tmp_path / "o4"), *FAST]
    assert_refused(capsys, lambda: ppo.main(args), r"is not a reward model .*pass the directory `align reward` wrote")
    (tmp_path / "adapter").mkdir()  # what a stage writes with --use_peft true --merge_lora false
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    args[args.index("--reward_model_path") + 1] = str(tmp_path / "adapter")
    assert_refused(capsys, lambda: ppo.main(args), r"reward model .*adapter has no config.json.*is a LoRA adapter "
                                                   r"\(a stage run with merge_lora false\).*--merge_lora true")


def test_reward_and_ppo_refuse_a_tokenizer_without_a_distinct_pad(tiny_hf_dir, tmp_path, capsys):
    def pad_is_eos(tok):
        tok.pad_token = tok.eos_token

    same = copy_model(tiny_hf_dir, tmp_path / "pad-eos", pad_is_eos)
    assert_refused(capsys, lambda: reward.main(["--model_name_or_path", str(same), "--output_dir",
                                                str(tmp_path / "r"), *FAST]),
                   r"uses the eos token '<\|endoftext\|>' as pad.*Run `align sft`")
    none = copy_model(tiny_hf_dir, tmp_path / "no-pad")
    config = json.loads((none / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (none / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(none).pad_token is None
    rm = reward_dir_from(tiny_hf_dir, tmp_path / "rm")
    assert_refused(capsys, lambda: ppo.main(["--sft_model_path", str(none), "--reward_model_path", str(rm),
                                             "--output_dir", str(tmp_path / "p"), *FAST]),
                   r"has no pad token; run `align sft`")


def test_ppo_refuses_a_reward_model_with_another_tokenizer(tiny_hf_dir, tmp_path, capsys):
    rm = reward_dir_from(tiny_hf_dir, tmp_path / "rm")
    policy = copy_model(tiny_hf_dir, tmp_path / "policy", lambda tok: tok.add_tokens(["<|tool|>"]))
    # The reward model is named first in the message, so its figure comes first: 512 (reward) vs 513 (policy).
    assert_refused(capsys, lambda: ppo.main(["--sft_model_path", str(policy), "--reward_model_path", str(rm),
                                             "--output_dir", str(tmp_path / "p"), *FAST]),
                   r"uses a different tokenizer than the policy .*reward vs policy: .*size 512 vs 513.*align reward "
                   r"--model_name_or_path")


def test_ppo_refuses_what_trl_1_12_gets_wrong(tiny_hf_dir, tmp_path, capsys):
    rm = reward_dir_from(tiny_hf_dir, tmp_path / "rm")
    args = ["--sft_model_path", str(tiny_hf_dir), "--reward_model_path", str(rm), "--output_dir",
            str(tmp_path / "p"), *FAST]
    assert_refused(capsys, lambda: ppo.main(args + ["--gradient_accumulation_steps", "2", "--num_mini_batches", "2"]),
                   r"gradient_accumulation_steps=2 with num_mini_batches=2")
    assert_refused(capsys, lambda: ppo.main(args + ["--resume_from_checkpoint", "true"]), r"cannot resume")
    assert_refused(capsys, lambda: ppo.main(args + ["--stop_token_id", "5"]),
                   r"stop_token_id=5 is not eos.*TRL #3750")
    assert_refused(capsys, lambda: ppo.main(args + ["--model_name_or_path", str(tiny_hf_dir)]),
                   r"reads --sft_model_path")
    assert_refused(capsys, lambda: ppo.main(args + ["--response_length", "128"]),
                   r"response_length 128 leaves no room for a prompt in the model's 128 positions")
    assert not (tmp_path / "p").exists()  # refused before anything was written
    # PPO cannot resume, so its refusal of a finished output_dir offers only --overwrite or another --output_dir.
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "keep.txt").write_text("finished work")
    err = assert_refused(capsys, lambda: ppo.main(args), r"already exists and is not empty; pass --overwrite true.*"
                                                          r"or choose another --output_dir")
    assert "--resume_from_checkpoint" not in err


def test_ppo_prompts_are_capped_to_what_fits_beside_the_response(capsys):
    """A prompt and its response must fit the policy's positions (a GPT-2 fails mid-run past them)."""
    assert ppo.prompt_room(128, 18, 512) == 110 and "prompts over 110 tokens are dropped" in capsys.readouterr().out
    assert ppo.prompt_room(128, 18, None) == 110 and "(max_prompt_length was unset)" in capsys.readouterr().out
    assert ppo.prompt_room(128, 18, 64) == 64 and ppo.prompt_room(None, 18, 64) == 64
    assert capsys.readouterr().out == ""


def test_existing_output_dir_is_refused_unless_overwrite(tiny_hf_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", [GOOD] * 4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("finished work")
    assert_refused(capsys, lambda: sft_main(tiny_hf_dir, out, data),
                   r"already exists and is not empty; pass --overwrite true")
    # no checkpoint there: the refusal does not suggest resuming, and resuming says why it cannot
    assert "--resume_from_checkpoint" not in capsys.readouterr().err
    assert_refused(capsys, lambda: sft_main(tiny_hf_dir, out, data, "--resume_from_checkpoint", "true"),
                   r"holds no checkpoint-N to continue from")
    # a mistyped model path is refused before --overwrite moves the finished run aside
    assert_refused(capsys, lambda: sft_main(tmp_path / "typo", out, data, "--overwrite", "true"), "does not exist")
    assert (out / "keep.txt").is_file() and not list(tmp_path.glob("out.old-*"))
    assert sft_main(tiny_hf_dir, out, data, "--overwrite", "true") == 0
    backups = list(tmp_path.glob("out.old-*"))
    assert len(backups) == 1 and (backups[0] / "keep.txt").read_text() == "finished work"
    (tmp_path / "afile").write_text("x")
    assert_refused(capsys, lambda: sft_main(tiny_hf_dir, tmp_path / "afile", data), "afile exists and is a file")
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_hf_dir, weightless)
    (weightless / "model.safetensors").unlink()
    assert_refused(capsys, lambda: sft_main(weightless, tmp_path / "o5", data), "has a config.json but no weights")


def test_a_resumed_stage_logs_each_step_once_and_says_where_it_resumed(tiny_hf_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [GOOD] * 8)
    out = tmp_path / "out"
    save = ["--save_strategy", "steps", "--save_steps", "1", "--max_steps", "3", "--save_total_limit", "5"]
    assert sft_main(tiny_hf_dir, out, data, *save) == 0
    logged = [json.loads(line)["step"] for line in (out / "sft_log.jsonl").read_text().splitlines()]
    shutil.rmtree(out / "checkpoint-3")  # as if killed after step 3 was logged but before it was saved
    (out / "metrics.json").unlink()
    assert sft_main(tiny_hf_dir, out, data, *save, "--resume_from_checkpoint", "true") == 0
    assert [json.loads(line)["step"] for line in (out / "sft_log.jsonl").read_text().splitlines()] == logged
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 2


def test_resuming_from_a_path_that_is_no_checkpoint_is_refused_first(tiny_hf_dir, tmp_path, capsys):
    # transformers would find out only once the models and data were loaded, with a traceback, after data_report.json
    # of the finished run in output_dir had been rewritten
    from align.stages import dpo

    out = tmp_path / "out"
    out.mkdir()
    (out / "data_report.json").write_text("finished run's report")
    (out / "model.safetensors").write_text("finished run's model")
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": USER, "chosen": GOOD["completion"],
                                                   "rejected": [{"role": "assistant", "content": "#### 6"}]}] * 4)
    typo = tmp_path / "out" / "checkpoint-5"
    args = ["--model_name_or_path", str(tiny_hf_dir), "--output_dir", str(out), "--dataset_name", str(data),
            "--max_steps", "1", "--resume_from_checkpoint", str(typo), *FAST]
    assert_refused(capsys, lambda: dpo.main(args),
                   rf"--resume_from_checkpoint {typo}: not a checkpoint directory \(no trainer_state.json there\)")
    assert (out / "data_report.json").read_text() == "finished run's report"


def test_a_grpo_recipe_repeats_its_run(tmp_path):
    # GRPOConfig derives generation_batch_size from steps_per_generation and refuses to be given both
    from trl import GRPOConfig

    from align.recipe import parse_recipe, save_recipe
    from align.stages.common import RECIPE_SKIP

    config = GRPOConfig(output_dir=str(tmp_path / "g"), per_device_train_batch_size=8, num_generations=4,
                        report_to="none", bf16=False)
    save_recipe(tmp_path, config, skip=RECIPE_SKIP)
    (again,) = parse_recipe((GRPOConfig,), ["--config", str(tmp_path / "recipe.yaml")])
    assert (again.generation_batch_size, again.steps_per_generation) == (8, 1)


def test_overwrite_of_the_current_directory_is_refused(tiny_hf_dir, tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "sft.jsonl", [GOOD] * 4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("finished work")
    monkeypatch.chdir(out)
    assert_refused(capsys, lambda: sft_main(tiny_hf_dir, Path("."), data, "--overwrite", "true"),
                   r"is \(or holds\) the current directory")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not list(tmp_path.glob("out.old-*"))


def test_non_finite_loss_stops_the_run(tiny_hf_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = copy_model(tiny_hf_dir, tmp_path / "nan")
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    data = write_jsonl(tmp_path / "sft.jsonl", [GOOD] * 4)
    assert_refused(capsys, lambda: sft_main(broken, tmp_path / "out", data),
                   r"align sft: error: sft: (loss|grad_norm) is nan at step 1; training stopped")
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


def test_a_downloaded_copy_of_a_hub_dataset_repository(tmp_path):
    """`hf download --repo-type dataset NAME --local-dir DIR` puts the splits in data/<split>-00000-of-00001.parquet."""
    from datasets import Dataset

    from align.stages.common import DataArguments, load_stage_data

    (tmp_path / "repo" / "data").mkdir(parents=True)
    for split, n in (("train", 6), ("test", 2)):
        Dataset.from_list([GOOD] * n).to_parquet(str(tmp_path / "repo" / "data" / f"{split}-00000-of-00001.parquet"))
    args = DataArguments(dataset_name=str(tmp_path / "repo"), dataset_test_split="test")
    training_args = type("T", (), {"output_dir": str(tmp_path / "o")})()
    train, evaluation = load_stage_data(args, training_args, "sft", tmp_path)
    assert len(train) == 6 and len(evaluation) == 2 and train[0] == GOOD


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


def test_an_eval_fraction_that_holds_out_every_row_is_refused(tiny_hf_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", [GOOD] * 4)
    assert_refused(capsys, lambda: sft_main(tiny_hf_dir, tmp_path / "out", data, "--eval_fraction", "1.0"),
                   r"align sft: error: .*sft\.jsonl: eval_fraction=1.0 held out every row, leaving none to train on")


def test_a_data_file_with_a_byte_order_mark_reads_its_first_row(tmp_path):
    jsonl, as_json = tmp_path / "bom.jsonl", tmp_path / "bom.json"
    jsonl.write_bytes(("\ufeff" + json.dumps(GOOD) + "\r\n" + json.dumps(GOOD) + "\r\n").encode())
    as_json.write_bytes(("\ufeff" + json.dumps([GOOD, GOOD])).encode())
    for path in (jsonl, as_json):
        kept, report = validate(read_records(path), "sft", str(path))
        assert len(kept) == 2 and report.n_dropped == 0, report.examples


# ----------------------------------------------------------------------------------------------------------------
# Recipes and flags: one-line errors naming the flag, file or field, exit status 2


def test_unknown_flags_recipe_keys_and_bad_values_are_named(tmp_path, capsys):
    recipe = ROOT / "recipes" / "smoke" / "sft.yaml"
    smoke = recipe.read_text()
    err = assert_refused(capsys, lambda: sft.main(["--config", str(recipe), "--max_stepz", "2"]),
                         r"align sft: error: unknown option\(s\) --max_stepz \(did you mean --max_steps for "
                         r"--max_stepz\?\); see `align sft --help`")
    assert "HfArgumentParser" not in err and len(err.strip().splitlines()) == 1
    typo = tmp_path / "typo.yaml"
    typo.write_text(smoke + "max_stepz: 3\nlearning_rat: 0.1\n")
    err = assert_refused(capsys, lambda: sft.main(["--config", str(typo)]),
                         rf"align sft: error: recipe {typo}: unknown key\(s\) max_stepz, learning_rat \(did you mean "
                         r"max_steps for max_stepz\?; did you mean learning_rate for learning_rat\?\); check the "
                         r"spelling against `align sft --help`")
    assert "fail_with_unknown_args" not in err
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(smoke + "per_device_train_batch_size: sixteen\n")
    assert_refused(capsys, lambda: sft.main(["--config", str(wrong)]),
                   rf"align sft: error: recipe {wrong}: field per_device_train_batch_size: invalid int value: "
                   r"'sixteen'")
    # The same value on the command line is the flag's error, not the recipe's; a flag overrides a bad recipe value.
    err = assert_refused(capsys, lambda: sft.main(["--config", str(recipe), "--max_steps", "two"]),
                         r"align sft: error: argument --max_steps.*invalid int value: 'two'")
    assert "recipe" not in err
    assert sft.main(["--config", str(wrong), "--per_device_train_batch_size", "16", "--output_dir",
                     str(tmp_path / "x"), "--eval_strategy", "steps"]) == 2  # parsed; refused later for its eval set
    assert "--eval_strategy steps needs eval data" in capsys.readouterr().err


def test_pretrain_and_stage_commands_name_themselves(monkeypatch, capsys):
    """Each command passes its name to the recipe parser, however it was started (`align pretrain`, `python -m
    align.cli pretrain`, scripts/pretrain.py under accelerate): it heads --help and every error."""
    from align import pretrain

    monkeypatch.setattr(sys, "argv", ["/venv/bin/align", "pretrain", "--config", "x.yaml"])
    assert_refused(capsys, lambda: pretrain.main(["--config", str(ROOT / "recipes/smoke/pretrain.yaml"),
                                                  "--max_stepz", "2"]),
                   r"^align pretrain: error: unknown option\(s\) --max_stepz \(did you mean --max_steps for "
                   r"--max_stepz\?\); see `align pretrain --help`")
    # Another toolkit's name for an option is pointed to this one's
    assert_refused(capsys, lambda: pretrain.main(["--config", str(ROOT / "recipes/smoke/pretrain.yaml"),
                                                  "--gradient_accumulation_steps", "4", "--lr", "1"]),
                   r"unknown option\(s\) --gradient_accumulation_steps --lr \(for --gradient_accumulation_steps, "
                   r"accumulation here follows from --micro_batch_size: .*; for --lr, here it is --learning_rate\)")
    monkeypatch.setattr(sys, "argv", ["/repo/align/cli.py", "pretrain", "--help"])  # python -m align.cli (pipeline)
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: align pretrain [-h]")
    with pytest.raises(SystemExit) as e:
        sft.main(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: align sft [-h]")


def test_unknown_flag_from_the_command_line_has_no_traceback():
    result = subprocess.run([str(Path(sys.executable).with_name("align")), "sft", "--config", "recipes/smoke/sft.yaml",
                             "--max_stepz", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "align sft: error: unknown option(s) --max_stepz (did you mean --max_steps" in result.stderr


def test_config_checks_while_parsing_are_one_line_errors(tmp_path, capsys):
    from align.stages import grpo

    assert_refused(capsys, lambda: grpo.main(["--config", str(ROOT / "recipes/tiny/grpo.yaml"), "--output_dir",
                                              str(tmp_path / "g"), "--per_device_train_batch_size", "8",
                                              "--num_generations", "3"]),
                   r"^align grpo: error: generation_batch_size \(8\) must be divisible by num_generations \(3\)")
    data = write_jsonl(tmp_path / "sft.jsonl", [GOOD] * 4)
    # Checked before the model is even looked at, so no model is needed here.
    err = assert_refused(capsys, lambda: sft_main(tmp_path / "no-model", tmp_path / "s", data, "--eval_strategy",
                                                  "steps"),
                         r"^align sft: error: --eval_strategy steps needs eval data.*pass --dataset_test_split "
                         r"\(a split name, or an eval data file")
    assert "eval_dataset" not in err and not (tmp_path / "s").exists()  # refused before anything was written


def test_a_misspelt_dpo_loss_type_is_refused_before_anything_loads(tmp_path, capsys):
    # TRL checks it only when it computes the first loss, with a traceback
    from align.stages import dpo

    args = ["--config", str(ROOT / "recipes/tiny/dpo.yaml"), "--model_name_or_path", str(tmp_path / "no-model"),
            "--output_dir", str(tmp_path / "d"), "--loss_type", "sigmoid", "ipoo"]
    assert_refused(capsys, lambda: dpo.main(args), r"^align dpo: error: loss_type ipoo is not a DPO loss; TRL's are "
                                                   r"sigmoid, hinge, ipo, ")
    assert not (tmp_path / "d").exists()


def test_a_dataset_saved_with_save_to_disk(tmp_path, capsys):
    """What an online machine saved with save_to_disk (a DatasetDict or one Dataset) reads offline like a hub
    dataset: the named splits; a missing split or a split asked of one Dataset is a clear error."""
    import datasets

    from align.stages.common import DataArguments, load_stage_data

    rows = [{"prompt": [{"role": "user", "content": f"Question: What is {i} + 2?"}],
             "completion": [{"role": "assistant", "content": f"#### {i + 2}"}], "source": "x"} for i in range(8)]
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(rows[:6]),
                          "test_sft": datasets.Dataset.from_list(rows[6:])}).save_to_disk(tmp_path / "dict")
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "one")
    training_args = type("T", (), {"output_dir": str(tmp_path / "o")})()
    args = DataArguments(dataset_name=str(tmp_path / "dict"), dataset_train_split="train_sft",
                         dataset_test_split="test_sft", eval_fraction=0.5)
    train, evaluation = load_stage_data(args, training_args, "sft", tmp_path)
    assert (len(train), len(evaluation)) == (6, 2) and train[0] == {k: rows[0][k] for k in ("prompt", "completion")}
    assert "eval_fraction=0.5 is not used: the eval set is the test split" in capsys.readouterr().out
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["train"]["source"] == f"{tmp_path / 'dict'}[train_sft]"
    train, evaluation = load_stage_data(DataArguments(dataset_name=str(tmp_path / "one")), training_args, "sft",
                                        tmp_path)
    assert (len(train), len(evaluation)) == (8, 0)
    with pytest.raises(DataError, match=r"has no split 'train' \(its splits: train_sft, test_sft\)"):
        load_stage_data(DataArguments(dataset_name=str(tmp_path / "dict")), training_args, "sft", tmp_path)
    with pytest.raises(DataError, match="holds one saved Dataset, with no splits: drop --dataset_test_split test"):
        load_stage_data(DataArguments(dataset_name=str(tmp_path / "one"), dataset_test_split="test"), training_args,
                        "sft", tmp_path)


def test_sft_of_plain_text_points_at_pretraining(tmp_path, tiny_hf_dir, capsys):
    write_jsonl(tmp_path / "text.jsonl", [{"text": "To be or not to be"}] * 4)
    assert sft_main(tiny_hf_dir, tmp_path / "a", tmp_path / "text.jsonl") == 2
    assert "continues a model's pretraining on it" in capsys.readouterr().err
    assert sft_main(tiny_hf_dir, tmp_path / "b", tmp_path / "text.jsonl", "--dataset_text_field", "content") == 2
    assert "--dataset_text_field is for plain-text data, which align sft does not read" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_directory_dataset_evaluates_on_its_test_file_and_metrics_record_the_step(tiny_hf_dir, tmp_path):
    """train.jsonl + test.jsonl in a directory: the test file is the eval set (as a hub dataset's test split would
    be) unless --dataset_test_split or eval_fraction says otherwise; metrics.json has the final step even when no
    step was logged (max_steps < logging_steps)."""
    from align.stages.common import DataArguments, load_stage_data, require_eval_data

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": [{"role": "user", "content": f"Question: Ann has {i} cups and gets 3 more. How many cups?"
                                                 "\nAnswer:"}],
             "completion": [{"role": "assistant", "content": f"#### {i + 3}"}]} for i in range(9)]
    write_jsonl(data / "train.jsonl", rows[:6])
    write_jsonl(data / "test.jsonl", rows[6:])
    training_args = type("T", (), {"output_dir": str(tmp_path / "o"), "eval_strategy": "steps"})()
    require_eval_data(DataArguments(dataset_name=str(data)), training_args)  # the test file counts as eval data
    train, evaluation = load_stage_data(DataArguments(dataset_name=str(data)), training_args, "sft", tmp_path)
    assert (len(train), len(evaluation)) == (6, 3)
    train, evaluation = load_stage_data(DataArguments(dataset_name=str(data), eval_fraction=0.5), training_args, "sft",
                                        tmp_path)
    assert len(train) + len(evaluation) == 6 and evaluation  # held out of train.jsonl; the test file is not read

    out = tmp_path / "sft"
    assert sft_main(tiny_hf_dir, out, data, "--eval_strategy", "steps", "--logging_steps", "5") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 1 and "eval_loss" in metrics
    assert json.loads((out / "data_report.json").read_text())["rows"] == {"train": 6, "eval": 3}


def test_a_missing_model_path_says_neither_local_nor_hub(tmp_path, monkeypatch):
    """A two-part name may be a hub repo (org/name), so it is tried there; when that fails too, the message says
    there is no such local directory as well as why the hub could not provide it."""
    from align.stages.common import check_model_dir

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"base model smoke/nobase \(--model_name_or_path\): there is no local "
                                                r"directory smoke/nobase .*and the Hugging Face Hub could not provide"):
        check_model_dir("smoke/nobase", "base model", "model_name_or_path")
    with pytest.raises(FileNotFoundError, match=r"reward model nope_rw \(--reward_model_path\): there is no local "
                                                r"directory nope_rw .*offline"):
        check_model_dir("nope_rw", "reward model", "reward_model_path", kind="reward")


def test_reward_eval_accuracy_counts_every_pair(tiny_hf_dir, tmp_path):
    """eval_accuracy is the share of all eval pairs scored chosen > rejected, not TRL's mean of per-batch means:
    7 pairs at eval batch 4 make a short last batch that would otherwise weigh as much as a full one."""
    def pair(i, chosen, rejected):
        prompt = [{"role": "user", "content": f"Question: Ann has {i} cups and gets 3 more. How many cups?\nAnswer:"}]
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}

    train = write_jsonl(tmp_path / "train.jsonl", [pair(i, f"#### {i + 3}", f"#### {i + 4}") for i in range(8)])
    pairs = [pair(i, f"{i} + 3 = {i + 3}\n#### {i + 3}", f"#### {i * 7}") for i in range(7)]
    test = write_jsonl(tmp_path / "test.jsonl", pairs)
    out = tmp_path / "rm"
    assert reward.main(["--model_name_or_path", str(tiny_hf_dir), "--output_dir", str(out), "--dataset_name",
                        str(train), "--dataset_test_split", str(test), "--max_steps", "1",
                        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_length", "64",
                        *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()

    def score(messages):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

    wins = sum(score(p["prompt"] + p["chosen"]) > score(p["prompt"] + p["rejected"]) for p in pairs)
    assert metrics["eval_pairs"] == 7
    assert metrics["eval_accuracy"] == pytest.approx(wins / 7)
    assert "eval_accuracy_batch_mean" in metrics  # TRL's own figure, kept under its own name
    # the model card shows how to score with it (not to generate text) and its snippet runs as written
    snippet = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    assert "AutoModelForSequenceClassification" in snippet and "pipeline" not in snippet
    exec(snippet.replace("PATH/TO/THIS/DIR", str(out)), {})


def test_reward_pairs_end_at_the_eos_when_the_template_writes_more_after_it(tiny_hf_dir, tmp_path):
    """A Qwen-style template ("<|im_end|>\\n") would put the reward model's score on the newline; PPO reads it at
    eos."""
    from align.stages.common import parse_stage_args

    def newline_after_eos(tok):
        tok.chat_template = tok.chat_template.replace("'<|endoftext|>'", "'<|endoftext|>\\n'")
        assert tok.chat_template != AutoTokenizer.from_pretrained(tiny_hf_dir).chat_template

    model = copy_model(tiny_hf_dir, tmp_path / "newline", newline_after_eos)
    pair = {"prompt": USER, "chosen": GOOD["completion"], "rejected": [{"role": "assistant", "content": "#### 6"}]}
    data = write_jsonl(tmp_path / "pairs.jsonl", [pair] * 4)
    argv = ["--model_name_or_path", str(model), "--output_dir", str(tmp_path / "rm"), "--dataset_name", str(data),
            "--eval_fraction", "0", "--max_steps", "1", *FAST]
    trainer, _ = reward.build_trainer(*parse_stage_args((reward.RewardArguments, reward.RewardConfig,
                                                         reward.ModelConfig), argv))
    eos = trainer.processing_class.eos_token_id
    assert all(row["chosen_ids"][-1] == eos and row["rejected_ids"][-1] == eos for row in trainer.train_dataset)


def test_the_same_seed_gives_the_same_reward_model(tiny_hf_dir, tmp_path):
    """The reward model's new score head is drawn before the Trainer seeds anything: without seeding first, two runs
    of the same recipe start from different heads (and the tiny pipeline's result would change from run to run)."""
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"prompt": [{"role": "user", "content": f"Question: {i} + 3?\nAnswer:"}],
         "chosen": [{"role": "assistant", "content": f"#### {i + 3}"}],
         "rejected": [{"role": "assistant", "content": f"#### {i + 4}"}]} for i in range(8)])
    weights = []
    for name in ("a", "b"):
        torch.randn(7)  # whatever ran before in the process must not matter
        assert reward.main(["--model_name_or_path", str(tiny_hf_dir), "--output_dir", str(tmp_path / name),
                            "--dataset_name", str(train), "--max_steps", "2", "--per_device_train_batch_size", "4",
                            "--max_length", "64", *FAST]) == 0
        weights.append(load_file(str(tmp_path / name / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_self_negative_too_long_for_the_reward_model_keeps_the_rows_own(tiny_tokenizer, tmp_path, capsys):
    # Sampled wrong answers replace rejected ones after validation; one that makes the pair longer than max_length
    # would be skipped by the trainer without a word, so the pair keeps its synthetic negative instead.
    from types import SimpleNamespace

    from align.data.validate import full_tokens
    from align.stages.reward import SELF_NEGATIVES_FILE, add_self_negatives

    prompt = [{"role": "user", "content": "Question: What is 2 + 3?\nAnswer:"}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "2 + 3 = 5\n#### 5"}],
             "rejected": [{"role": "assistant", "content": "2 + 3 = 6\n#### 6"}]} for _ in range(2)]
    sampled = ["2 + 3 = 7\n#### 7", "2 + 3 = 1" + " + 1" * 60 + "\n#### 61"]
    (tmp_path / f"train_{SELF_NEGATIVES_FILE}").write_text("".join(
        json.dumps({"row": i, "prompt": prompt, "rejected": answer}) + "\n" for i, answer in enumerate(sampled)))
    max_length = full_tokens(tiny_tokenizer, prompt, rows[0]["rejected"]) + 8
    out = add_self_negatives(SimpleNamespace(), SimpleNamespace(max_length=max_length), SimpleNamespace(),
                             tiny_tokenizer, rows, tmp_path, "train")
    assert out[0]["rejected"][0]["content"] == sampled[0]
    assert out[1]["rejected"] == rows[1]["rejected"]
    assert f"1 of 2 train pairs now reject the SFT model's own wrong answer (1 more would exceed max_length" in \
        capsys.readouterr().out


def test_exact_answer_reward_compares_numbers_and_reads_gsm8k_solutions():
    """The dataset's answer may be a number in any spelling, or GSM8K's worked solution ending in "#### N"."""
    from align.stages.grpo import exact_answer_reward

    completions = ["so 1000 in all\n#### 1,000", "#### 7", "#### 72", "#### 7.5", "#### 7", "#### 3"]
    answers = ["1000", "7.0", "She sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "7.50", "seven", "-3"]
    assert exact_answer_reward(completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_grpo_and_ppo_read_prompts_and_answers_from_named_columns(tiny_hf_dir, tmp_path, capsys):
    """GSM8K's schema (question, and an answer that is a worked solution) trains GRPO without preprocessing, via
    --dataset_prompt_field / --dataset_answer_field; a column that is not there is named."""
    from trl import GRPOConfig, ModelConfig

    from align.stages import grpo
    from align.stages.common import parse_stage_args

    rows = [{"question": f"Tom has {n} apples and buys 2 more. How many now?", "prompt": "a stale column",
             "solution": f"{n} + 2 = <<{n}+2={n + 2}>>{n + 2}\n#### {n + 2}"} for n in range(8)]
    data = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    args = ["--model_name_or_path", str(tiny_hf_dir), "--output_dir", str(tmp_path / "g"), "--dataset_name", str(data),
            "--dataset_prompt_field", "question", "--dataset_answer_field", "solution", "--num_generations", "2",
            "--per_device_train_batch_size", "4", "--max_completion_length", "8", *FAST]
    trainer, _ = grpo.build_trainer(*parse_stage_args((grpo.GRPOArguments, GRPOConfig, ModelConfig), args))
    assert trainer.train_dataset["prompt"] == [row["question"] for row in rows]
    assert "are plain strings: the model generates from them as text, without its chat template" in \
        capsys.readouterr().out
    answers = trainer.train_dataset["answer"]
    assert grpo.exact_answer_reward(["#### 2", "#### 4"], answer=answers[:2]) == [1.0, 0.0]

    assert_refused(capsys, lambda: grpo.main(args[:-len(FAST)] + ["--dataset_answer_field", "final", "--output_dir",
                                                                  str(tmp_path / "g2"), *FAST]),
                   r"gsm8k\.jsonl: no column 'final' to read as 'answer' \(--dataset_answer_field; found: prompt, "
                   r"question, solution\)")
    rm = reward_dir_from(tiny_hf_dir, tmp_path / "rm")
    ppo_args = ["--sft_model_path", str(tiny_hf_dir), "--reward_model_path", str(rm), "--output_dir",
                str(tmp_path / "p"), "--dataset_name", str(data), "--dataset_prompt_field", "question",
                "--response_length", "8", "--eval_prompts", "2", *FAST]
    from trl.experimental.ppo import PPOConfig

    trainer, _, _ = ppo.build_trainer(*parse_stage_args((ppo.PPOArguments, PPOConfig, ModelConfig), ppo_args))
    tokenizer = trainer.processing_class
    assert tokenizer.decode(trainer.train_dataset[0]["input_ids"]) == rows[0]["question"]

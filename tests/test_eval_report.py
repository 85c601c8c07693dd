"""`align compare`: summary.json, report.md, self-contained index.html, noise-aware marks, reward-hacking flag."""

import json
import re

import pytest

from align.evaluation import report


def results_file(path, metrics: dict, model=None):
    """An `align eval` results file with the given summary rows {metric: (value, stderr, n)}."""
    rows = [{"task": m.split("_")[0], "metric": m, "value": v, "stderr": se, "n": n,
             "chance": 0.25 if m.startswith("arc") else None, "higher_is_better": "perplexity" not in m}
            for m, (v, se, n) in metrics.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"align": {"model": str(model) if model else "/gone"}, "summary": rows, "lm_eval": {}}))
    return path


def test_compare_marks_only_differences_beyond_noise_and_flags_reward_hacking(tmp_path):
    sft = results_file(tmp_path / "sft" / "eval" / "results.json", {
        "demo_accuracy": (0.75, 0.02, 400), "arc_easy_acc": (0.30, 0.02, 500),
        "lambada_word_perplexity": (120.0, 3.0, 100)})
    ppo = results_file(tmp_path / "ppo" / "eval" / "results.json", {
        "demo_accuracy": (0.33, 0.02, 400), "arc_easy_acc": (0.31, 0.02, 500),
        "lambada_word_perplexity": (100.0, 3.0, 100)})
    (tmp_path / "sft" / "eval" / "extra_metrics.json").write_text(
        json.dumps({"reward_mean": {"value": 0.49, "stderr": 0.01}}))
    (tmp_path / "ppo" / "ppo_log.jsonl").write_text(
        "".join(json.dumps({"step": s, "objective/kl": 0.1 * s, "objective/scores": 0.4 + 0.01 * s, "note": "x"}) + "\n"
                for s in range(10)) + "{not json\n")
    out = tmp_path / "report"
    summary = report.build_report(
        [sft, ppo], out, extra_metrics={"ppo": {"reward_mean": {"value": 0.75, "stderr": 0.01}, "win_rate": 0.8}},
        prompts=None)

    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary
    assert saved["models"]["sft"]["metrics"] == {"demo_accuracy": 0.75, "arc_easy_acc": 0.30,
                                                 "lambada_word_perplexity": 120.0, "reward_mean": 0.49}
    assert saved["models"]["ppo"]["metrics"]["win_rate"] == 0.8
    assert len(saved["flags"]) == 1 and saved["flags"][0].startswith("reward hacking: sft -> ppo")

    md = (out / "report.md").read_text()
    row = lambda name: next(line for line in md.splitlines() if line.startswith(f"| {name} "))  # noqa: E731
    assert "▼" in row("demo_accuracy")  # 0.75 -> 0.33, far beyond noise
    assert "▲" not in row("arc_easy_acc") and "▼" not in row("arc_easy_acc")  # 0.30 -> 0.31, within noise
    assert "▲" in row("lambada_word_perplexity")  # lower is better
    assert "ppo_log.jsonl" in md

    page = (out / "index.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 2  # metric bars, and the PPO curves
    assert "reward hacking" in page and "<script" not in page and "http" not in page


def test_a_difference_is_marked_when_it_exceeds_the_combined_standard_error():
    a, b = {"value": 0.50, "stderr": 0.03}, {"value": 0.56, "stderr": 0.04}  # combined standard error 0.05
    assert report.difference(a, b) == pytest.approx({"diff": 0.06, "se": 0.05, "significant": True, "better": True})
    assert not report.difference(a, {**b, "value": 0.54})["significant"]  # 0.04: within noise
    lower = report.difference(a, {**b, "higher_is_better": False})
    assert lower["significant"] and not lower["better"] and report.mark(lower) == " ▼"
    assert not report.difference(a, {"value": 0.9})["significant"]  # no stderr: never marked


def test_win_rate_counts_the_challengers_wins_and_ties_half():
    """rewards.win_rate(challenger, incumbent), as the pipeline's win_rate_vs_<previous> uses it: the share of
    prompts on which the reward model scores the challenger's answer higher, with its (sample) standard error."""
    import statistics

    from align.evaluation.rewards import mean_entry, win_rate

    result = win_rate([0.9, 0.2, 0.5, 0.7], [0.1, 0.8, 0.5, 0.3])  # won, lost, tied, won
    assert result["value"] == pytest.approx(0.625) and result["n"] == 4
    assert result["stderr"] == pytest.approx(statistics.stdev([1.0, 0.0, 0.5, 1.0]) / 2)
    assert win_rate([0.1, 0.8, 0.5, 0.3], [0.9, 0.2, 0.5, 0.7])["value"] == pytest.approx(0.375)  # the other way
    assert mean_entry([0.25]) == {"value": 0.25, "stderr": 0.0, "n": 1}


def test_no_flag_when_accuracy_holds(tmp_path):
    a = results_file(tmp_path / "a.json", {"demo_accuracy": (0.75, 0.02, 400)})
    b = results_file(tmp_path / "b.json", {"demo_accuracy": (0.74, 0.02, 400)})
    summary = report.build_report([a, b], tmp_path / "r", names=["sft", "ppo"],
                                  extra_metrics={"sft": {"reward_mean": 0.5}, "ppo": {"reward_mean": 0.7}},
                                  prompts=None)
    assert summary["flags"] == []


@pytest.mark.parametrize("win_rate, flagged", [((0.531, 0.011), True), ((0.505, 0.011), False)])
def test_paired_win_rate_is_evidence_of_reward_hacking(tmp_path, win_rate, flagged):
    """The means of the reward are within noise (0.687 -> 0.704, stderr 0.047), as in a tiny pipeline run, but
    the reward model prefers PPO's answer on the same prompts more often than not, beyond its standard error."""
    a = results_file(tmp_path / "a.json", {"demo_accuracy": (0.82, 0.019, 400)})
    b = results_file(tmp_path / "b.json", {"demo_accuracy": (0.7475, 0.022, 400)})
    extra = {"sft": {"reward_mean": {"value": 0.687, "stderr": 0.047}},
             "ppo": {"reward_mean": {"value": 0.704, "stderr": 0.047},
                     "win_rate_vs_sft": {"value": win_rate[0], "stderr": win_rate[1]}}}
    summary = report.build_report([a, b], tmp_path / "r", names=["sft", "ppo"], extra_metrics=extra, prompts=None)
    if flagged:
        assert len(summary["flags"]) == 1
        assert "prefers ppo's answers (win rate 0.531 ± 0.011)" in summary["flags"][0]
        assert "reward_mean rose" not in summary["flags"][0]
    else:
        assert summary["flags"] == []


def test_generations_side_by_side_for_model_dirs(tiny_hf_dir, tmp_path):
    results_file(tiny_hf_dir / "eval" / "results.json", {"demo_accuracy": (0.0, 0.0, 10)}, model=tiny_hf_dir)
    try:
        assert report.main([str(tiny_hf_dir), str(tiny_hf_dir), "--out", str(tmp_path / "r"),
                            "--max_new_tokens", "5"]) == 0
    finally:
        (tiny_hf_dir / "eval" / "results.json").unlink()
        (tiny_hf_dir / "eval").rmdir()
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert list(summary["models"]) == ["tiny", "tiny-2"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Generations (greedy)" in md and "**tiny-2**" in md
    assert "ROMEO:" in (tmp_path / "r" / "index.html").read_text()


def test_names_prompts_and_generations_cannot_break_the_report(tiny_hf_dir, tmp_path):
    """A name with a pipe, a prompt with a code fence and terminal escapes: the markdown keeps its table and its
    blocks, and neither file carries a raw control character (invalid in HTML, live in a terminal)."""
    results_file(tiny_hf_dir / "eval" / "results.json", {"demo_accuracy": (0.0, 0.0, 10)}, model=tiny_hf_dir)
    prompt = "ROMEO:\n```\n\x1b[31mred\x07 | done"
    try:
        report.build_report([tiny_hf_dir, tiny_hf_dir], tmp_path / "r", names=["a|b", "c"], prompts=[prompt],
                            max_new_tokens=3)
    finally:
        (tiny_hf_dir / "eval" / "results.json").unlink()
        (tiny_hf_dir / "eval").rmdir()
    md = (tmp_path / "r" / "report.md").read_text()
    page = (tmp_path / "r" / "index.html").read_text()
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", md + page)
    assert "| metric | a\\|b | c | n | chance |" in md
    assert "````\nROMEO:\n```\n\\x1b[31mred\\x07 | done\n````" in md and "\\x1b[31mred" in page


def test_compare_bad_inputs(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "run `align eval --model" in capsys.readouterr().err
    good = results_file(tmp_path / "good.json", {"demo_accuracy": (0.5, 0.05, 100)})
    (tmp_path / "bad.json").write_text("{bad")
    assert report.main([str(good), str(tmp_path / "bad.json"), "--out", str(tmp_path / "r")]) == 2
    assert "bad.json: not a readable JSON file" in capsys.readouterr().err
    (tmp_path / "other.json").write_text('{"a": 1}')
    assert report.main([str(good), str(tmp_path / "other.json"), "--out", str(tmp_path / "r")]) == 2
    assert "other.json is not a results file of `align eval`" in capsys.readouterr().err
    (tmp_path / "trainer").mkdir()  # a directory holding another program's eval_results.json, and no model
    (tmp_path / "trainer" / "eval_results.json").write_text('{"eval_loss": 1.2}')
    assert report.main([str(good), str(tmp_path / "trainer"), "--out", str(tmp_path / "r")]) == 2
    assert "eval_results.json is another program's" in capsys.readouterr().err
    with pytest.raises(report.CompareError, match="2 --names for 1 inputs"):
        report.build_report([results_file(tmp_path / "x.json", {})], tmp_path / "r", names=["a", "b"], prompts=None)


def pipeline_run(run, names=("base", "sft", "ppo")):
    """What `align pipeline` leaves: RUN/NAME model directories, RUN/eval/NAME/{results,extra_metrics}.json."""
    for i, name in enumerate(names):
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text("{}")  # a model directory (no generations in these tests)
        results_file(run / "eval" / name / "results.json", {"demo_accuracy": ((0.1, 0.2, 0.3)[i], 0.01, 100)},
                     model=run / name)
        (run / "eval" / name / "extra_metrics.json").write_text(json.dumps({"reward_mean": (0.0, 0.2, 0.4)[i]}))


def test_readme_compare_command_on_a_pipeline_run(tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    pipeline_run(run)
    # the README's `align compare runs/x/base runs/x/sft runs/x/ppo --out runs/x/report`
    assert report.main([str(run / "base"), str(run / "sft"), str(run / "ppo"), "--out", str(run / "report"),
                        "--no_generations"]) == 0
    models = json.loads((run / "report" / "summary.json").read_text())["models"]
    assert list(models) == ["base", "sft", "ppo"]
    assert models["ppo"]["metrics"] == {"demo_accuracy": 0.3, "reward_mean": 0.4}  # extra_metrics.json picked up
    assert models["sft"]["results"] == str(run / "eval" / "sft" / "results.json")
    assert "warning" not in capsys.readouterr().err


def test_model_without_results_is_an_error_without_generations_and_a_warning_with_them(tmp_path, capsys, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert report.main([str(tmp_path / "m"), "--out", str(tmp_path / "r"), "--no_generations"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"align compare: error: {tmp_path / 'm'} is a model directory without evaluation results")
    assert f"run `align eval --model {tmp_path / 'm'}` first" in err and not (tmp_path / "r").exists()

    monkeypatch.setattr(report, "generate", lambda model_dir, prompts, chat, n, peft=None: ["ok"] * len(prompts))
    assert report.main([str(tmp_path / "m"), "--out", str(tmp_path / "r")]) == 0  # generations only: documented
    assert "align compare: warning: m: " in capsys.readouterr().err


def test_out_holding_anything_but_a_previous_report_needs_overwrite(tmp_path, capsys, monkeypatch):
    a = results_file(tmp_path / "a.json", {"demo_accuracy": (0.5, 0.01, 100)})
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert report.main([str(a), "--out", str(out), "--no_generations"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"align compare: error: --out {out} is not empty and is not a previous report (it holds "
                          "notes.txt)") and "pass --overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    assert report.main([str(a), "--out", str(out), "--no_generations", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "report.md", "summary.json"]
    (backup,) = tmp_path.glob("r.old-*")  # moved aside, not deleted
    assert (backup / "notes.txt").read_text() == "mine"

    # a previous report is replaced without --overwrite (the pipeline's report stage relies on this) ...
    b = results_file(tmp_path / "b.json", {"demo_accuracy": (0.7, 0.01, 100)})
    assert report.main([str(b), "--out", str(out), "--no_generations"]) == 0
    assert list(json.loads((out / "summary.json").read_text())["models"]) == ["b"]
    # ... and only once the new one is complete: a failure leaves it as it was, and no temporary directory
    monkeypatch.setattr(report, "html_page", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        report.build_report([a], out, prompts=None)
    assert list(json.loads((out / "summary.json").read_text())["models"]) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.json", "b.json", "r", backup.name])


def test_out_that_is_the_current_directory_is_refused(tmp_path, capsys, monkeypatch):
    # The report replaces its directory by a rename: done to the cwd it would leave the shell in a deleted directory.
    a = results_file(tmp_path / "a.json", {"demo_accuracy": (0.5, 0.01, 100)})
    out = tmp_path / "r"
    out.mkdir()
    monkeypatch.chdir(out)
    for flags in ([], ["--overwrite"]):
        assert report.main([str(a), "--out", ".", "--no_generations", *flags]) == 2
        assert "is (or holds) the current directory" in capsys.readouterr().err
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "r"]
    monkeypatch.chdir(tmp_path)
    assert report.main([str(a), "--out", "r", "--no_generations"]) == 0  # the same directory, named from outside


def test_extra_for_an_unknown_name_is_an_error(tmp_path, capsys):
    a = results_file(tmp_path / "sft.json", {"demo_accuracy": (0.5, 0.01, 100)})
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"reward_mean": 0.5}))
    assert report.main([str(a), "--out", str(tmp_path / "r"), "--extra", f"nobody={extra}", "--no_generations"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("align compare: error: --extra nobody=") and "'nobody'" in err and "the models are sft" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content, message", [
    ("[0.5]", "expected a JSON object {metric: value}"),
    ('{"reward_mean": "high"}', "reward_mean is 'high', not a number"),
    ('{"reward_mean": {"value": 0.5, "stderr": "0.1"}}', "reward_mean.stderr is '0.1', not a number"),
    ('{"reward_mean": 0.5', "not a readable JSON file"), ("caf\xe9", "not a readable JSON file"),
])
def test_malformed_extra_metrics_are_an_error_naming_the_file(tmp_path, capsys, content, message):
    """--extra and an extra_metrics.json beside the results: were tracebacks (AttributeError, matplotlib's TypeError,
    JSONDecodeError, UnicodeDecodeError) after the other inputs were read."""
    a = results_file(tmp_path / "sft" / "eval" / "results.json", {"demo_accuracy": (0.5, 0.01, 100)})
    extra = tmp_path / "extra.json"
    extra.write_bytes(content.encode("latin-1"))
    assert report.main([str(a), "--out", str(tmp_path / "r"), "--extra", f"sft={extra}", "--no_generations"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("align compare: error: --extra ") and str(extra) in err and message in err, err
    assert "Traceback" not in err
    (a.parent / "extra_metrics.json").write_bytes(content.encode("latin-1"))
    assert report.main([str(tmp_path / "sft"), "--out", str(tmp_path / "r"), "--no_generations"]) == 2
    err = capsys.readouterr().err
    assert f"{a.parent / 'extra_metrics.json'}" in err and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("content", ['{"a": "b"}', '"one prompt"', "[1, 2]", "[]", '["Hi", ""]'])
def test_prompts_that_are_not_a_list_of_strings_are_an_error(tmp_path, capsys, content):
    """Were silently the object's keys or the string's characters as prompts, a tokenizer traceback, (empty)
    "generations are off" for a model directory, or (an empty prompt) a traceback from generate on no tokens."""
    a = results_file(tmp_path / "a.json", {"demo_accuracy": (0.5, 0.01, 100)})
    prompts = tmp_path / "prompts.json"
    prompts.write_text(content)
    assert report.main([str(a), "--out", str(tmp_path / "r"), "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert (f"--prompts {prompts}: expected a non-empty JSON list of non-empty prompt strings" in err
            and "Traceback" not in err)
    assert not (tmp_path / "r").exists()


def test_generation_budget_beyond_the_context_is_capped_and_zero_is_refused(tiny_hf_dir, tmp_path, capsys):
    """--max_new_tokens 200 on a 128-position model cut the prompt away (an IndexError in generate); 0 was
    transformers' traceback."""
    out = tmp_path / "r"
    assert report.main([str(tiny_hf_dir), "--out", str(out), "--max_new_tokens", "200"]) == 0
    assert "has 128 positions; generating at most 64 tokens instead of 200" in capsys.readouterr().err
    assert "ROMEO:" in (out / "report.md").read_text()
    with pytest.raises(SystemExit) as exit_:
        report.main([str(tiny_hf_dir), "--out", str(tmp_path / "r0"), "--max_new_tokens", "0"])
    assert exit_.value.code == 2 and "argument --max_new_tokens: must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("summary", [["demo_accuracy"], [{"value": 0.5}]])
def test_results_whose_summary_rows_are_not_metric_rows_are_an_error(tmp_path, capsys, summary):
    """Another tool's results.json with a 'summary' list of something else: was a TypeError or KeyError traceback."""
    good = results_file(tmp_path / "good.json", {"demo_accuracy": (0.5, 0.05, 100)})
    (tmp_path / "other.json").write_text(json.dumps({"summary": summary}))
    assert report.main([str(good), str(tmp_path / "other.json"), "--out", str(tmp_path / "r"), "--no_generations"]) == 2
    err = capsys.readouterr().err
    assert "other.json is not a results file of `align eval`" in err and "Traceback" not in err


def test_generations_of_a_model_evaluated_with_a_peft_adapter_use_the_adapter(tiny_hf_dir, tmp_path):
    """Were the base model's: the results record --peft, and compare generated from --model alone."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_hf_dir),
                           LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 1.0)
    model.save_pretrained(tmp_path / "adapter")
    base = results_file(tmp_path / "base.json", {"demo_accuracy": (0.1, 0.01, 100)}, model=tiny_hf_dir)
    lora = results_file(tmp_path / "lora.json", {"demo_accuracy": (0.2, 0.01, 100)}, model=tiny_hf_dir)
    data = json.loads(lora.read_text())
    data["align"]["peft"] = str(tmp_path / "adapter")
    lora.write_text(json.dumps(data))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["ROMEO:", "Question: 1 + 2?\nAnswer:"]))
    assert report.main([str(base), str(lora), "--names", "base", "lora", "--out", str(tmp_path / "r"),
                        "--prompts", str(prompts), "--max_new_tokens", "12"]) == 0
    first = (tmp_path / "r" / "report.md").read_text().split("## Generations (greedy)")[1].split("### Prompt 2")[0]
    base_text, lora_text = first.split("**base**")[1].split("**lora**")
    assert base_text.strip() and lora_text.strip() and base_text != lora_text
    (tmp_path / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(report.CompareError, match="was evaluated with the PEFT adapter .* not there any more"):
        report.build_report([base, lora], tmp_path / "r", prompts=["ROMEO:"], max_new_tokens=4)


def test_paired_win_rate_is_found_when_names_rename_the_models(tmp_path):
    """The pipeline keys the win rate by the previous model's directory (win_rate_vs_sft); --names must not hide it."""
    run = tmp_path / "run"
    for name, acc, extra in [("sft", 0.82, {"reward_mean": 0.7}),
                             ("ppo", 0.70, {"reward_mean": 0.7, "win_rate_vs_sft": {"value": 0.6, "stderr": 0.01}})]:
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text("{}")
        results_file(run / "eval" / name / "results.json", {"demo_accuracy": (acc, 0.02, 400)}, model=run / name)
        (run / "eval" / name / "extra_metrics.json").write_text(json.dumps(extra))
    summary = report.build_report([run / "sft", run / "ppo"], tmp_path / "r", names=["SFT", "PPO"], prompts=None)
    assert len(summary["flags"]) == 1 and "prefers PPO's answers (win rate 0.600" in summary["flags"][0]


def test_renamed_duplicates_do_not_collide_with_another_name(tmp_path):
    files = [results_file(tmp_path / f"{i}.json", {"demo_accuracy": (0.5, 0.05, 100)}) for i in range(3)]
    summary = report.build_report(files, tmp_path / "r", names=["a", "a", "a-2"], prompts=None)
    assert list(summary["models"]) == ["a", "a-3", "a-2"]

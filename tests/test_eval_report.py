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
    (tmp_path / "sft" / "eval" / "extra_metrics.json").write_text(json.dumps({"reward_mean": {"value": 0.49, "stderr": 0.01}}))
    (tmp_path / "ppo" / "ppo_log.jsonl").write_text(
        "".join(json.dumps({"step": s, "objective/kl": 0.1 * s, "objective/scores": 0.4 + 0.01 * s, "note": "x"}) + "\n"
                for s in range(10)) + "{not json\n")
    out = tmp_path / "report"
    summary = report.build_report([sft, ppo], out, extra_metrics={"ppo": {"reward_mean": {"value": 0.75, "stderr": 0.01},
                                                                          "win_rate": 0.8}}, prompts=None)

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


def test_no_flag_when_accuracy_holds(tmp_path):
    a = results_file(tmp_path / "a.json", {"demo_accuracy": (0.75, 0.02, 400)})
    b = results_file(tmp_path / "b.json", {"demo_accuracy": (0.74, 0.02, 400)})
    summary = report.build_report([a, b], tmp_path / "r", names=["sft", "ppo"],
                                  extra_metrics={"sft": {"reward_mean": 0.5}, "ppo": {"reward_mean": 0.7}}, prompts=None)
    assert summary["flags"] == []


def test_generations_side_by_side_for_model_dirs(tiny_hf_dir, tmp_path):
    results_file(tiny_hf_dir / "eval" / "results.json", {"demo_accuracy": (0.0, 0.0, 10)}, model=tiny_hf_dir)
    try:
        assert report.main([str(tiny_hf_dir), str(tiny_hf_dir), "--out", str(tmp_path / "r"), "--max_new_tokens", "5"]) == 0
    finally:
        (tiny_hf_dir / "eval" / "results.json").unlink()
        (tiny_hf_dir / "eval").rmdir()
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert list(summary["models"]) == ["tiny", "tiny-2"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Generations (greedy)" in md and "**tiny-2**" in md
    assert "ROMEO:" in (tmp_path / "r" / "index.html").read_text()


def test_compare_bad_inputs(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "run `align eval --model" in capsys.readouterr().err
    with pytest.raises(report.CompareError, match="2 --names for 1 inputs"):
        report.build_report([results_file(tmp_path / "x.json", {})], tmp_path / "r", names=["a", "b"], prompts=None)

"""`align pipeline --preset smoke`: every stage in order, outputs that load, skipping and rerunning, the report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def run_pipeline(out: Path, home: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ALIGN_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "align.cli", "pipeline", "--preset", "smoke", "--out", str(out),
                           *extra], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    out, home = root / "run", root / "home"
    result = run_pipeline(out, home)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, home, result.stdout


def test_every_stage_writes_its_directory(smoke_run):
    out, home, _ = smoke_run
    for stage in ("base", "sft", "ppo"):
        assert (out / stage / "config.json").is_file() and (out / stage / "model.safetensors").is_file()
        assert (out / stage / "tokenizer.json").is_file()
    for stage in ("sft", "reward", "ppo"):
        metrics = json.loads((out / stage / "metrics.json").read_text())
        assert metrics["stage"] == stage
        assert (out / stage / "recipe.yaml").is_file()
    assert (out / "pretrain" / "train_log.jsonl").is_file() and (out / "ppo" / "ppo_log.jsonl").is_file()
    assert {p.name for p in (out / "data").iterdir()} >= {"sft.jsonl", "preferences.jsonl", "prompts.jsonl",
                                                         "heldout.jsonl"}
    assert (home / "data").is_dir()  # the prepared corpus went to ALIGN_HOME, not into the repository
    timings = json.loads((out / "pipeline.json").read_text())["seconds"]
    assert set(timings) == {"pretrain", "base", "sft", "reward", "ppo", "eval", "report"}


def test_aligned_models_load_and_generate(smoke_run):
    from transformers import AutoModelForSequenceClassification, pipeline

    out, _, _ = smoke_run
    chat = pipeline("text-generation", model=str(out / "ppo"), device="cpu")
    reply = chat([{"role": "user", "content": "Question: Tom has 3 apples and gets 4 more. How many?\nAnswer:"}],
                 max_new_tokens=12, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"
    reward = AutoModelForSequenceClassification.from_pretrained(out / "reward")
    assert reward.config.num_labels == 1


def test_report_compares_base_sft_and_ppo(smoke_run):
    out, _, stdout = smoke_run
    report = out / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert list(summary["models"]) == ["base", "sft", "ppo"]
    for name in ("base", "sft", "ppo"):
        metrics = summary["models"][name]["metrics"]
        assert 0.0 <= metrics["demo_accuracy"] <= 1.0
        assert "reward_mean" in metrics and "corpus_bits_per_byte" in metrics
    assert 0.0 <= summary["models"]["ppo"]["metrics"]["win_rate_vs_sft"] <= 1.0
    html = (report / "index.html").read_text()
    assert html.count("data:image/png;base64,") >= 3  # metric bars, pretraining and PPO curves
    assert "demo_accuracy" in (report / "report.md").read_text()
    assert "| model | demo_accuracy" in stdout and str(report / "index.html") in stdout


def test_eval_is_redone_when_its_settings_change(smoke_run, tmp_path, monkeypatch):
    import shutil

    from align.pipeline import Pipeline, PipelineConfig

    out, _, _ = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    ran = []
    monkeypatch.setattr(Pipeline, "stage_eval", lambda self: ran.append("eval"))
    smoke = dict(eval_suite="smoke", eval_batch_size=16, fetch_benchmarks=False, reward_prompts=16, max_new_tokens=24)
    Pipeline("smoke", copy, PipelineConfig(**{**smoke, "eval_batch_size": 4}), None)(None, "eval")
    assert ran == []  # the batch size does not change the results
    Pipeline("smoke", copy, PipelineConfig(**{**smoke, "reward_prompts": 8}), None)(None, "eval")
    assert ran == ["eval"]  # was skipped as complete, its results still from 16 prompts


def test_rerun_skips_finished_stages_and_from_reruns(smoke_run):
    out, home, _ = smoke_run
    again = run_pipeline(out, home)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("complete, skipped") == 7
    before = (out / "report" / "summary.json").stat().st_mtime_ns
    rerun = run_pipeline(out, home, "--from", "report")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.count("complete, skipped") == 6
    assert (out / "report" / "summary.json").stat().st_mtime_ns > before


def test_stages_older_than_a_rerun_stage_are_run_again(smoke_run):
    out, home, _ = smoke_run
    only_ppo = run_pipeline(out, home, "--from", "ppo", "--to", "ppo")
    assert only_ppo.returncode == 0, only_ppo.stderr[-2000:]
    assert "ppo ..." in only_ppo.stdout and "eval ..." not in only_ppo.stdout  # --to ppo stopped there
    assert list(out.glob("ppo.old-*"))  # the previous PPO model was moved aside, not deleted
    again = run_pipeline(out, home)  # eval and report were built from the old PPO model: both must be redone
    assert again.returncode == 0, again.stderr[-2000:]
    assert "eval: older than the stages before it" in again.stdout
    assert "report: older than the stages before it" in again.stdout
    ppo_done = (out / "ppo" / "metrics.json").stat().st_mtime
    assert (out / "eval" / "ppo" / "results.json").stat().st_mtime > ppo_done
    assert (out / "report" / "summary.json").stat().st_mtime > ppo_done


def test_a_stage_redone_outside_the_pipeline_or_damaged_is_not_taken_as_complete(smoke_run, tmp_path):
    import shutil

    from align.pipeline import Pipeline, PipelineConfig

    out, home, _ = smoke_run
    metrics = out / "reward" / "metrics.json"  # what `align reward ... --overwrite true` by hand would rewrite
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "redone": True}))
    again = run_pipeline(out, home, "--to", "ppo")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "ppo: reward changed since it was built" in again.stdout and "ppo ..." in again.stdout
    shutil.copytree(out / "sft", tmp_path / "copy" / "sft")
    assert Pipeline("smoke", tmp_path / "copy", PipelineConfig(), None).complete("sft")  # a copy is complete
    (tmp_path / "copy" / "sft" / "model.safetensors").unlink()
    assert not Pipeline("smoke", tmp_path / "copy", PipelineConfig(), None).complete("sft")


def test_unknown_preset_is_refused(tmp_path):
    result = run_pipeline(tmp_path / "x", tmp_path / "home", "--preset", "huge")
    assert result.returncode != 0 and "preset 'huge'" in result.stderr and "tiny" in result.stderr


def test_report_renders_in_headless_chromium(smoke_run, tmp_path):
    import screenshot_report

    if screenshot_report.find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    out, _, _ = smoke_run
    png = screenshot_report.screenshot(out / "report" / "index.html", tmp_path / "report.png", height=1600)
    # The plots are the only coloured things on the page: without them the share is ~0.
    assert screenshot_report.coloured_share(png) > 0.02


def test_accelerate_config_runs_training_stages_as_two_processes(tmp_path):
    out = tmp_path / "run"
    result = run_pipeline(out, tmp_path / "home", "--to", "sft", "--accelerate_config",
                          str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((out / "sft" / "metrics.json").read_text())["num_processes"] == 2
    assert not (out / "reward").exists() and not (out / "report").exists()  # --to sft stopped there


def test_config_is_refused_with_a_pointer_to_preset(tmp_path):
    result = run_pipeline(tmp_path / "x", tmp_path / "home", "--config", str(ROOT / "recipes" / "smoke" / "sft.yaml"))
    assert result.returncode == 2 and "--config is not an option here: --preset" in result.stderr
    assert "more than once" not in result.stderr and not (tmp_path / "x").exists()


def test_missing_accelerate_config_is_refused(tmp_path):
    result = run_pipeline(tmp_path / "x", tmp_path / "home", "--accelerate_config", "nope.yaml")
    assert result.returncode != 0 and "nope.yaml: no such file" in result.stderr
    assert not (tmp_path / "x").exists()


def test_out_that_is_a_file_or_not_a_run_directory_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_pipeline(tmp_path / "file", tmp_path / "home")
    assert result.returncode == 2 and "--out" in result.stderr and "is a file" in result.stderr
    assert "Traceback" not in result.stderr
    project = tmp_path / "project"
    (project / "report").mkdir(parents=True)
    (project / "report" / "index.html").write_text("mine")  # would be taken for the pipeline's report
    (project / "notes.txt").write_text("mine")
    result = run_pipeline(project, tmp_path / "home")
    assert result.returncode == 2 and "not a pipeline run directory" in result.stderr and "notes.txt" in result.stderr
    assert sorted(p.name for p in project.iterdir()) == ["notes.txt", "report"]


def test_unknown_eval_suite_is_refused_before_any_stage(tmp_path):
    result = run_pipeline(tmp_path / "run", tmp_path / "home", "--eval_suite", "nosuch")
    assert result.returncode == 2 and "eval_suite 'nosuch'" in result.stderr and "'smoke'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()



def test_sigterm_during_a_stage_stops_the_stage_too(smoke_run, tmp_path):
    import shutil
    import signal
    import time

    out, home, _ = smoke_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    env = {**os.environ, "ALIGN_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        process = subprocess.Popen([sys.executable, "-m", "align.cli", "pipeline", "--preset", "smoke", "--out",
                                    str(copy), "--from", "sft"], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.time() + 120
        while "align.cli sft" not in log.read_text() and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(3)
        process.send_signal(signal.SIGTERM)  # `kill PID`, or scancel: to the pipeline only, not the stage
        assert process.wait(timeout=120) == 143
    assert "terminated (SIGTERM)" in log.read_text()

    def cmdline(proc: Path) -> bytes:
        try:
            return (proc / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            return b""

    stage = [p for p in Path("/proc").glob("[0-9]*") if str(copy / "sft").encode() in cmdline(p)]
    assert stage == [], "the sft stage is still running without its pipeline"


def test_a_second_pipeline_on_the_same_run_is_refused(tmp_path):
    from align.runs import lock_run_dir

    run = tmp_path / "run"
    run.mkdir()
    with lock_run_dir(run):  # what a pipeline still running on it holds
        result = run_pipeline(run, tmp_path / "home", "--to", "pretrain")
    assert result.returncode == 2 and "in use by a run still going" in result.stderr, result.stdout[-2000:]
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_help_lists_the_pipeline_yaml_settings(capsys):
    """The unknown-option error sends users to --help, which must then name the settings they can override."""
    from align.pipeline import PipelineConfig, main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for name in PipelineConfig.__dataclass_fields__:
        assert f"--{name}: " in out, name


def test_a_failed_stage_names_its_signal_and_the_command_that_continues(tmp_path):
    from align.pipeline import Pipeline, PipelineConfig

    pipeline = Pipeline("smoke", tmp_path, PipelineConfig(), None)
    pipeline.start = "sft"  # as `--from sft` sets it: the same command would redo sft, not continue
    with pytest.raises(SystemExit, match=r"failed \(killed by SIGKILL\); fix the cause and run the same command "
                                         r"without --from again: finished stages are skipped"):
        pipeline.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    pipeline.start = None
    with pytest.raises(SystemExit, match=r"failed \(exit 3\); fix the cause and run the same command again"):
        pipeline.run([sys.executable, "-c", "raise SystemExit(3)"])


STAGE_WITH_A_WORKER = """
import sys
from pathlib import Path
from align.pipeline import Pipeline, PipelineConfig
stage = (  # a launcher whose worker runs in a session of its own, as torchrun's do, and both ignore Ctrl-C
    "import signal, subprocess, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "worker = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
    "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)'], start_new_session=True); "
    "print(worker.pid, flush=True); worker.wait()"
)
Pipeline("smoke", Path(sys.argv[1]), PipelineConfig(), None).run([sys.executable, "-c", stage])
"""


def test_a_third_ctrl_c_kills_the_stage_with_its_workers(tmp_path):
    import signal
    import time

    script = tmp_path / "pipeline_with_a_stage.py"
    script.write_text(STAGE_WITH_A_WORKER)
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True,
                               stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = iter(process.stdout.readline, "")
    next(line for line in lines if line.startswith("[pipeline] $"))
    worker = int(next(lines))
    for _ in range(3):  # in quick succession: a press while the one before is handled must count too
        process.send_signal(signal.SIGINT)
        time.sleep(0.1)
    process.wait(timeout=30)

    def alive(pid: int) -> bool:
        try:
            return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has ended
        except FileNotFoundError:
            return False

    deadline = time.time() + 10
    try:
        while alive(worker):
            assert time.time() < deadline, "the stage's worker outlived its pipeline"
            time.sleep(0.2)
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_an_unfinished_stage_continues_from_its_checkpoint_where_it_can(tmp_path, monkeypatch):
    """A stage stopped by SIGTERM left checkpoint-N: SFT and the reward model resume from it; PPO, which cannot
    resume, and a stage without a checkpoint start again (the old directory moved aside by --overwrite)."""
    from align.pipeline import Pipeline, PipelineConfig

    pipeline = Pipeline("smoke", tmp_path, PipelineConfig(), None)
    commands = []
    monkeypatch.setattr(pipeline, "run", commands.append)
    for stage in ("sft", "reward", "ppo"):
        (tmp_path / stage / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "train_log.jsonl").write_text("")
    for stage in ("sft", "reward", "ppo", "pretrain"):
        pipeline.train_stage(stage)
    assert [cmd[-2:] for cmd in commands] == [["--resume_from_checkpoint", "true"]] * 2 + [["--overwrite", "true"]] * 2


def test_an_unfinished_stage_is_not_continued_from_checkpoints_older_than_its_upstream(tmp_path, monkeypatch):
    """SFT stopped with a checkpoint, then the base model was rebuilt: the checkpoint continues the old model, so the
    stage starts again (moved aside) instead of resuming from it."""
    import time

    from align.pipeline import Pipeline, PipelineConfig

    for stale in (True, False):
        out = tmp_path / str(stale)
        (out / "sft" / "checkpoint-3").mkdir(parents=True)
        pipeline = Pipeline("smoke", out, PipelineConfig(), None)
        pipeline.finished = {"pretrain": 1.0, "base": time.time() + (1 if stale else -1)}
        monkeypatch.setattr(pipeline, "complete", lambda stage: stage in ("pretrain", "base"))
        commands = []
        monkeypatch.setattr(pipeline, "run", commands.append)
        pipeline(None, "sft")
        assert ("--resume_from_checkpoint" in commands[0]) != stale
        assert (out / "sft" / "checkpoint-3").exists() != stale  # moved aside, not deleted:
        assert [p.name for p in out.glob("sft.old-*/checkpoint-3")] == (["checkpoint-3"] if stale else [])

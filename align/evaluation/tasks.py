"""The lm-eval tasks in evals/: selection by suite or name, rendering with absolute data paths, headline metrics."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

EVALS_DIR = Path(__file__).resolve().parents[2] / "evals"
# Tasks whose data is a file given at run time (option name), not the benchmark pack.
RUNTIME_FILES = {"demo": "demo_file", "ppl_corpus": "corpus_file"}
PLACEHOLDERS = {"pack": "${PACK}", "demo_file": "${DEMO_FILE}", "corpus_file": "${CORPUS_FILE}"}
UNSAFE_TASKS = {"humaneval"}  # tasks that execute model-written code
TAGS = {"perplexity": ["ppl_lambada", "ppl_corpus"], "ai2_arc": ["arc_easy", "arc_challenge"]}

# task -> [(lm-eval result key, summary name)]; other tasks report every metric as "{task}_{metric}".
HEADLINE = {
    "mmlu": [("acc,none", "mmlu_acc")],
    "arc_easy": [("acc,none", "arc_easy_acc"), ("acc_norm,none", "arc_easy_acc_norm")],
    "arc_challenge": [("acc,none", "arc_challenge_acc"), ("acc_norm,none", "arc_challenge_acc_norm")],
    "gsm8k": [("exact_match,strict-match", "gsm8k_exact_match"),
              ("exact_match,flexible-extract", "gsm8k_exact_match_flexible")],
    "gsm8k_cot": [("exact_match,strict-match", "gsm8k_cot_exact_match"),
                  ("exact_match,flexible-extract", "gsm8k_cot_exact_match_flexible")],
    "humaneval": [("pass@1,create_test", "humaneval_pass@1")],
    "lambada_openai": [("acc,none", "lambada_acc"), ("perplexity,none", "lambada_perplexity")],
    "ppl_lambada": [("word_perplexity,none", "lambada_word_perplexity"),
                    ("bits_per_byte,none", "lambada_bits_per_byte")],
    "ppl_corpus": [("word_perplexity,none", "corpus_word_perplexity"), ("bits_per_byte,none", "corpus_bits_per_byte")],
    "demo": [("exact_match,strict-match", "demo_accuracy")],
}
# What a model guessing uniformly scores (ARC: most questions have 4 choices, a few 3 or 5).
CHANCE = {"mmlu_acc": 0.25, "arc_easy_acc": 0.25, "arc_easy_acc_norm": 0.25, "arc_challenge_acc": 0.25,
          "arc_challenge_acc_norm": 0.25, "gsm8k_exact_match": 0.0, "gsm8k_exact_match_flexible": 0.0,
          "gsm8k_cot_exact_match": 0.0, "gsm8k_cot_exact_match_flexible": 0.0, "humaneval_pass@1": 0.0,
          "demo_accuracy": 0.0, "lambada_acc": 0.0}


PERPLEXITIES = {"word_perplexity", "byte_perplexity", "bits_per_byte"}


def chance_level(task: str, metric: str, name: str) -> float | None:
    """A headline metric's chance level; every MMLU task and group (mmlu_stem, mmlu_anatomy, ...) has 4 choices."""
    if name in CHANCE:
        return CHANCE[name]
    return 0.25 if task.startswith("mmlu") and metric in ("acc", "acc_norm") else None


class EvalError(ValueError):
    """A problem the user can fix: unknown task, missing file or pack, unloadable model."""


@dataclass
class Selection:
    task: str
    num_fewshot: int | None = None
    limit: int | None = None


def suites() -> dict[str, dict[str, dict]]:
    return yaml.safe_load((EVALS_DIR / "suites.yaml").read_text())


def available_tasks() -> list[str]:
    """Every task, group and tag name defined in evals/ (what `--tasks` accepts)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(EVALS_DIR), include_defaults=False).all_tasks


def user_tasks(include_path: str | None) -> list[str]:
    """The task, group and tag names of the user's own lm-eval YAMLs in `include_path` (none without one)."""
    from lm_eval.tasks import TaskManager

    if not include_path:
        return []
    if not Path(include_path).is_dir():
        raise EvalError(f"--include_path {include_path}: no such directory (it holds your lm-eval task YAMLs)")
    names = TaskManager(include_path=str(include_path), include_defaults=False).all_tasks
    if not names:
        raise EvalError(f"--include_path {include_path}: no lm-eval task YAML (with a `task:` name) found in it")
    clash = sorted(set(names) & set(available_tasks()))
    if clash:
        raise EvalError(f"--include_path {include_path}: task(s) {', '.join(clash)} have the name of align's own "
                        "tasks; rename them (their `task:` field)")
    return names


def select(suite: str | None, tasks: list[str] | None, files: dict[str, str | None],
           extra_tasks: list[str] = ()) -> list[Selection]:
    """The tasks to run. A suite's tasks that read a run-time file not given are skipped; a task named
    explicitly without its file is an error. With both a suite and tasks, the named tasks of the suite run with
    the suite's settings. `extra_tasks` (the user's own, from --include_path) may be named in `tasks` too."""
    if suite and tasks:
        chosen = [s for s in select(suite, None, files) if s.task in tasks]
        missing = [t for t in tasks if t not in {s.task for s in chosen}]
        if missing:
            raise EvalError(f"task(s) {', '.join(missing)} are not in suite {suite!r} (or their file was not given); "
                            f"its tasks: {', '.join(suites()[suite])}")
        return chosen
    if tasks:
        known = set(available_tasks()) | set(extra_tasks)
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise EvalError(f"unknown task(s) {', '.join(unknown)}; available: {', '.join(sorted(known))}")
        chosen = []
        for name in tasks:
            for task in TAGS.get(name, [name]):
                option = RUNTIME_FILES.get(task)
                if option and not files.get(option):
                    if name == task:
                        raise EvalError(f"task {task} reads the file given with --{option}")
                    continue  # part of a tag: skip quietly, like a suite does
                chosen.append(Selection(task))
        return chosen
    all_suites = suites()
    name = suite or "core"
    if name not in all_suites:
        raise EvalError(f"unknown suite {name!r}; available suites: {', '.join(all_suites)}")
    return [
        Selection(task, settings.get("num_fewshot"), settings.get("limit"))
        for task, settings in all_suites[name].items()
        if not (RUNTIME_FILES.get(task) and not files.get(RUNTIME_FILES[task]))
    ]


def render(out_dir: Path, pack: Path | None, demo_file: str | None = None, corpus_file: str | None = None) -> Path:
    """Copy evals/ to out_dir with every data path made absolute; YAMLs whose data is unavailable are left out."""
    values = {"pack": pack, "demo_file": demo_file, "corpus_file": corpus_file}
    values = {k: str(Path(v).resolve()) if v else None for k, v in values.items()}
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for src in sorted(EVALS_DIR.rglob("*")):
        if src.is_dir() or "__pycache__" in src.parts or src.name == "suites.yaml":
            continue
        dst = out_dir / src.relative_to(EVALS_DIR)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix == ".yaml" or src.name.endswith("_yaml"):
            text = src.read_text()
            for key, placeholder in PLACEHOLDERS.items():
                if placeholder in text:
                    if values[key] is None:
                        break
                    text = text.replace(placeholder, values[key])
            else:
                dst.write_text(text)
        else:
            shutil.copy2(src, dst)
    return out_dir


def read_utf8(path: Path, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise EvalError(f"--{option} {path}, line {line}: not UTF-8 (byte {err.object[err.start]:#x}); save the file "
                        "as UTF-8") from None


def json_lines(path: Path, option: str):
    """(line number, value) of each non-blank line of the JSON-lines file given as --option."""
    for i, line in enumerate(read_utf8(path, option).splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalError(f"--{option} {path}, line {i}: not JSON ({err.msg}); give one JSON object a line") from None
        yield i, value


def check_demo_file(path: str | Path) -> None:
    """Refuse a --demo_file that is not JSON lines of {"question": str, "answer": str or number} (GSM8K schema)."""
    path = Path(path)
    rows = 0
    for i, row in json_lines(path, "demo_file"):
        if not (isinstance(row, dict) and isinstance(row.get("question"), str)
                and isinstance(row.get("answer"), (str, int, float)) and not isinstance(row.get("answer"), bool)):
            raise EvalError(f"--demo_file {path}, line {i}: expected an object with a \"question\" string and an "
                            "\"answer\" (GSM8K schema, e.g. the heldout.jsonl the stages write beside their demo data)")
        rows += 1
    if not rows:
        raise EvalError(f"--demo_file {path} holds no problems")


def normalise_corpus(path: str | Path, out: Path) -> Path:
    """Held-out documents as {"text": ...} JSONL: a .jsonl/.json file with a "text" field (one document per
    line), or a text file whose documents are separated by blank lines."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"--corpus_file {path}: no such file")
    docs = []
    if path.suffix in (".jsonl", ".json"):
        for i, row in json_lines(path, "corpus_file"):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise EvalError(f"--corpus_file {path}, line {i}: expected an object with a \"text\" string")
            docs.append(row["text"])
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        docs = [block.strip() for block in text.split("\n\n") if block.strip()]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise EvalError(f"--corpus_file {path} holds no documents")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return out


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def ratio_stderr(pairs: list) -> float | None:
    """Standard error of sum(x)/sum(y) over documents (delta method), for the corpus-level perplexities lm-eval
    aggregates without one. `pairs` are lm-eval's per-document (log-likelihood, words-or-bytes) values."""
    if len(pairs) < 2:
        return None
    x = np.array([-float(p[0]) for p in pairs])
    y = np.array([float(p[1]) for p in pairs])
    ratio = x.sum() / y.sum()
    return float(np.std(x - ratio * y, ddof=1) / math.sqrt(len(x)) / y.mean())


def _perplexity_stderr(metric: str, value: float, pairs: list) -> float | None:
    se = ratio_stderr(pairs)
    if se is None:
        return None
    if metric == "bits_per_byte":
        return se / math.log(2)
    return value * se  # word/byte perplexity = exp(ratio): d exp(r) = exp(r) dr


def summarise(results: dict, samples: dict | None = None, order: list[str] | None = None) -> list[dict]:
    """One row per headline metric: task, metric, value, stderr, n, chance, higher_is_better. Perplexities get a
    delta-method stderr from the per-document samples when they are given."""
    rows = []
    n_samples = results.get("n-samples", {})
    subtasks = results.get("group_subtasks", {})
    shown = set()

    def count(task: str) -> int | None:
        if task in n_samples:
            return n_samples[task].get("effective")
        leaves = [count(t) for t in subtasks.get(task, [])]
        return sum(n for n in leaves if n) if leaves else None

    def leaves(task):
        kids = subtasks.get(task, [])
        return [t for k in kids for t in (leaves(k) or [k])] if kids else []

    # a group with an aggregate (mmlu, mmlu_stem) reports one number instead of its subtasks'
    aggregated = [g for g, m in results.get("results", {}).items()
                  if g in subtasks and any("," in k and "_stderr," not in k for k in m)]
    inside = {t for g in aggregated for t in leaves(g)} | {t for g in aggregated for t in subtasks.get(g, [])}
    for task, metrics in results.get("results", {}).items():
        if task in inside or task in shown:
            continue
        shown.add(task)
        higher = results.get("higher_is_better", {}).get(task, {})
        pairs = HEADLINE.get(task) or [
            (key, f"{task}_{key.split(',')[0]}" + ("" if key.endswith(",none") else "_" + key.split(",", 1)[1]))
            for key in metrics if "," in key and "_stderr," not in key
        ]
        for key, name in pairs:
            if key not in metrics:
                continue
            metric = key.split(",")[0]
            value, stderr = _number(metrics[key]), _number(metrics.get(key.replace(",", "_stderr,", 1)))
            task_samples = (samples or {}).get(task)
            if stderr is None and value is not None and task_samples and metric in PERPLEXITIES:
                stderr = _perplexity_stderr(metric, value, [s[metric] for s in task_samples if metric in s])
            rows.append({
                "task": task, "metric": name, "value": value, "stderr": stderr, "n": count(task),
                "chance": chance_level(task, metric, name),
                "higher_is_better": higher.get(metric, "perplexity" not in metric),
            })
    if order:
        rank = {t: i for i, t in enumerate(order)}
        rows.sort(key=lambda r: rank.get(r["task"], len(rank)))
    return rows

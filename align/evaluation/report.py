"""`align compare`: evaluated models side by side in report.md, a self-contained index.html and summary.json."""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

from align.evaluation.run import at_least
from align.runs import holds_cwd, prepare_output_dir, read_json

RESULT_FILES = ("eval/results.json", "results.json", "eval_results.json")
REPORT_FILES = ("summary.json", "report.md", "index.html")  # what build_report writes to its output directory
EXTRA_FILE = "extra_metrics.json"  # {metric: value or {"value", "stderr", "n", "higher_is_better"}}
LOG_FILES = ("train_log.jsonl", "ppo_log.jsonl", "grpo_log.jsonl", "dpo_log.jsonl", "sft_log.jsonl", "reward_log.jsonl")
REWARD_METRICS = ("reward_mean", "reward", "rlhf_reward")  # the first one present is the reward
ACCURACY_METRIC = "demo_accuracy"  # verifiable accuracy that reward hacking hurts
CURVE_HINTS = ("loss", "kl", "score", "reward", "accuracy", "entropy", "ppl")
PROMPTS = [
    "Question: Tom has 3 apples and gets 4 more. How many apples does Tom have now?\nAnswer:",
    "Question: A box holds 9 pencils. Sara takes 2 of them out. How many pencils are still in the box?\nAnswer:",
    "ROMEO:",
    "def add(a, b):\n",
]


class CompareError(ValueError):
    pass


# ----------------------------------------------------------------------------------------------------------------
# loading


def pipeline_results(model_dir: Path) -> Path:
    """Where `align pipeline` evaluates RUN/NAME: RUN/eval/NAME/results.json (extra_metrics.json beside it)."""
    model_dir = Path(os.path.abspath(model_dir))  # `.` and `..` have no name; symlinks are kept as given
    return model_dir.parent / "eval" / model_dir.name / "results.json"


def find_results(path: Path) -> tuple[Path | None, Path | None]:
    """(results JSON, model directory) for a results file or a directory holding one (or a model); a model
    without results of its own may have them in the pipeline's layout (see pipeline_results)."""
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise CompareError(f"{path}: no such file or directory")
    for name in RESULT_FILES:
        if (path / name).is_file():
            return path / name, path if (path / "config.json").is_file() else None
    if (path / "config.json").is_file():
        return (pipeline_results(path) if pipeline_results(path).is_file() else None), path
    raise CompareError(f"{path} holds no evaluation results ({', '.join(RESULT_FILES)}) and is not a model directory; "
                       f"run `align eval --model {path}` first")


def metric_entry(value) -> dict:
    if isinstance(value, dict):
        return {"value": value.get("value"), "stderr": value.get("stderr"), "n": value.get("n"),
                "chance": value.get("chance"), "higher_is_better": value.get("higher_is_better", True)}
    return {"value": value, "stderr": None, "n": None, "chance": None, "higher_is_better": True}


def check_extra(where: str, data) -> dict:
    """`data` if it is {metric: number or {"value", "stderr", ...}} with numbers (or null), else a CompareError."""
    if not isinstance(data, dict):
        raise CompareError(f"{where}: expected a JSON object {{metric: value}} or {{metric: {{\"value\": ..., "
                           f"\"stderr\": ...}}}}, got {type(data).__name__}")
    for metric, value in data.items():
        entry = metric_entry(value)
        for key in ("value", "stderr", "chance"):
            number = entry[key]
            if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float))):
                field = metric if not isinstance(value, dict) else f"{metric}.{key}"
                raise CompareError(f"{where}: {field} is {number!r}, not a number")
    return data


def read_log(path: Path) -> list[dict]:
    """Numeric fields of each JSON line (bad lines are skipped: a run may still be writing)."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append({k: float(v) for k, v in row.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
    return rows


def find_logs(dirs: list[Path]) -> dict[str, list[dict]]:
    """Training logs beside a model: our JSONL logs, and the log_history of a transformers trainer_state.json."""
    logs = {}
    for d in dirs:
        for name in LOG_FILES:
            if (d / name).is_file() and name not in logs:
                rows = read_log(d / name)
                if rows:
                    logs[name] = rows
        state = d / "trainer_state.json"
        if state.is_file() and "trainer_state.json" not in logs:
            try:
                history = json.loads(state.read_text()).get("log_history", [])
            except (json.JSONDecodeError, AttributeError):
                history = []
            rows = [{k: float(v) for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                    for r in history if isinstance(r, dict)]
            if rows:
                logs["trainer_state.json"] = rows
    return logs


def load_entry(path: str | Path, name: str | None = None) -> dict:
    path = Path(path)
    results_file, model_dir = find_results(path)
    report = read_json_arg("results", str(results_file)) if results_file else {}
    rows = report.get("summary") if isinstance(report, dict) else None
    if results_file and not (isinstance(rows, list)
                             and all(isinstance(r, dict) and isinstance(r.get("metric"), str) for r in rows)):
        if path.is_file():  # named as results: say it is not; found in a directory (a trainer's file): none here
            raise CompareError(f"{results_file} is not a results file of `align eval` (no 'summary' list of metric "
                               "rows, each with a 'metric' name)")
        if model_dir is None:  # nothing of ours to show: neither results nor a model to generate with
            raise CompareError(f"{path} holds no results of `align eval` ({results_file.name} is another program's) "
                               "and is not a model directory; run `align eval` first")
        results_file, report = None, {}
    if model_dir is None and report.get("align", {}).get("model") and Path(report["align"]["model"]).is_dir():
        model_dir = Path(report["align"]["model"])
    metrics = {row["metric"]: {k: row.get(k) for k in ("value", "stderr", "n", "chance", "higher_is_better")}
               for row in report.get("summary", [])}
    for place in [p for p in (results_file.parent if results_file else None, model_dir) if p]:
        if (place / EXTRA_FILE).is_file():
            extra_file = str(place / EXTRA_FILE)
            metrics |= {k: metric_entry(v) for k, v in check_extra(extra_file, read_json_arg("", extra_file)).items()}
    run_dir = None  # the run directory around a results file: RUN/eval/results.json or RUN/results.json
    if results_file:
        run_dir = results_file.parent.parent if results_file.parent.name == "eval" else results_file.parent
    log_dirs = [d for d in dict.fromkeys([model_dir, model_dir.parent if model_dir else None, run_dir]) if d]
    if model_dir:
        default_name = model_dir.name
    elif results_file.name in ("results.json", "eval_results.json"):
        default_name = run_dir.name
    else:
        default_name = results_file.stem
    return {
        "name": name or default_name, "default_name": default_name,
        "results": str(results_file) if results_file else None,
        "model_dir": str(model_dir) if model_dir else None, "metrics": metrics, "logs": find_logs(log_dirs),
        "chat": bool(report.get("align", {}).get("apply_chat_template")),
        "peft": report.get("align", {}).get("peft"),  # the adapter `align eval --peft` applied to the model
    }


# ----------------------------------------------------------------------------------------------------------------
# comparing


def difference(a: dict, b: dict) -> dict | None:
    """b - a, and whether it exceeds the combined standard error (unknown stderr: never marked)."""
    if a.get("value") is None or b.get("value") is None:
        return None
    diff = b["value"] - a["value"]
    se = None
    if a.get("stderr") is not None and b.get("stderr") is not None:
        se = math.sqrt(a["stderr"] ** 2 + b["stderr"] ** 2)
    significant = se is not None and abs(diff) > se
    better = significant and ((diff > 0) == bool(b.get("higher_is_better", True)))
    return {"diff": diff, "se": se, "significant": significant, "better": better}


def reward_hacking(entries: list[dict]) -> list[str]:
    """Flag each step (model i-1 -> i) where the reward rises while verifiable accuracy falls beyond noise.

    The reward rises when its mean does beyond the combined standard error, or when the paired comparison on the
    same prompts, `win_rate_vs_<previous>`, is above 1/2 by more than its own: the paired test sees a shift that
    the spread of scores across prompts hides in the means."""
    flags = []
    for prev, cur in zip(entries, entries[1:]):
        if ACCURACY_METRIC not in prev["metrics"] or ACCURACY_METRIC not in cur["metrics"]:
            continue
        acc = difference(prev["metrics"][ACCURACY_METRIC], cur["metrics"][ACCURACY_METRIC])
        if not acc or not (acc["diff"] < 0 and acc["significant"]):
            continue
        evidence = []
        reward = next((m for m in REWARD_METRICS if m in prev["metrics"] and m in cur["metrics"]), None)
        r = difference(prev["metrics"][reward], cur["metrics"][reward]) if reward else None
        if r and r["diff"] > (r["se"] or 0.0):
            evidence.append(f"{reward} rose by {r['diff']:+.3f}")
        # keyed by the name the pipeline knew (its directory), which --names may have changed
        win = next((cur["metrics"][f"win_rate_vs_{n}"] for n in (prev["name"], prev.get("default_name"))
                    if f"win_rate_vs_{n}" in cur["metrics"]), None)
        if win and win.get("value") is not None and win["value"] - 0.5 > (win.get("stderr") or 0.0):
            evidence.append(f"the reward model prefers {cur['name']}'s answers (win rate {win['value']:.3f}"
                            + (f" ± {win['stderr']:.3f})" if win.get("stderr") is not None else ")"))
        if evidence:
            flags.append(
                f"reward hacking: {prev['name']} -> {cur['name']}: {' and '.join(evidence)} while "
                f"{ACCURACY_METRIC} fell by {acc['diff']:+.3f} (beyond its standard error {acc['se']:.3f})"
            )
    return flags


def fmt(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    v = entry["value"]
    text = f"{v:.4g}" if abs(v) >= 1000 or abs(v) < 0.001 and v != 0 else f"{v:.4f}".rstrip("0").rstrip(".") or "0"
    if entry.get("stderr") is not None:
        text += f" ± {entry['stderr']:.2g}"
    return text


def mark(diff: dict | None) -> str:
    if not diff or not diff["significant"]:
        return ""
    return " ▲" if diff["better"] else " ▼"


# ----------------------------------------------------------------------------------------------------------------
# plots and generations


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plot_metrics(entries: list[dict], metrics: list[str]) -> str | None:
    """One panel per metric: a bar per model with its standard error, and the chance level as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics:
        return None
    cols = min(4, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, metrics):
        vals = [e["metrics"].get(metric, {}) for e in entries]
        heights = [v.get("value") if v.get("value") is not None else 0.0 for v in vals]
        errors = [v.get("stderr") or 0.0 for v in vals]
        ax.bar(range(len(entries)), heights, yerr=errors, capsize=4, color=colors[: len(entries)] * 4)
        chance = next((v.get("chance") for v in vals if v.get("chance") is not None), None)
        if chance is not None:
            ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
            ax.legend(fontsize=7, loc="upper right")
        if "perplexity" in metric and min(h for h in heights) > 0 and max(heights) / max(min(heights), 1e-9) > 100:
            ax.set_yscale("log")
        elif min(heights) >= 0:
            ax.set_ylim(bottom=0, top=max(max(h + e for h, e in zip(heights, errors)), chance or 0, 0.05) * 1.15)
        ax.set_title(metric, fontsize=9)
        ax.set_xticks(range(len(entries)), [e["name"] for e in entries], rotation=20, fontsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def curve_keys(rows: list[dict]) -> list[str]:
    keys = sorted({k for r in rows for k in r if k not in ("step", "epoch", "global_step")})
    keys = [k for k in keys if sum(k in r for r in rows) >= 2 and any(h in k.lower() for h in CURVE_HINTS)]
    return keys[:8]


def plot_curves(name: str, logs: dict[str, list[dict]]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    for log_name, rows in logs.items():
        keys = curve_keys(rows)
        if not keys:
            continue
        cols = min(4, len(keys))
        fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols,
                                 figsize=(3.6 * cols, 2.6 * math.ceil(len(keys) / cols)), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            points = [(r.get("step", r.get("global_step", i)), r[key]) for i, r in enumerate(rows) if key in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1.2)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle(f"{name}: {log_name}", fontsize=10)
        fig.tight_layout()
        images.append((f"{name}: {log_name}", _png(fig)))
        plt.close(fig)
    return images


def generate(model_dir: str, prompts: list[str], chat: bool, max_new_tokens: int, peft: str | None = None) -> list[str]:
    """Greedy completions of fixed prompts (by the model with its PEFT adapter, if it was evaluated with one), so a
    reader can see what the numbers mean."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if peft:
        from peft import PeftModel

        if not (Path(peft) / "adapter_config.json").is_file():
            raise CompareError(f"{model_dir} was evaluated with the PEFT adapter {peft}, which is not there any more; "
                               "pass --no_generations, or restore the adapter")
        model = PeftModel.from_pretrained(model, peft).eval()
    limit = getattr(model.config, "max_position_embeddings", None) or 1024
    if max_new_tokens > limit // 2:  # else the prompt would be cut away to make room (and past `limit`, fail)
        print(f"align compare: warning: {model_dir} has {limit} positions; generating at most {limit // 2} tokens "
              f"instead of {max_new_tokens}", file=sys.stderr)
        max_new_tokens = limit // 2
    outputs = []
    for prompt in prompts:
        if chat and tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        else:
            text = prompt
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, -(limit - max_new_tokens):]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        outputs.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return outputs


# ----------------------------------------------------------------------------------------------------------------
# the report

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but tab and newline (so also \r), DEL, C1


def visible(text: str) -> str:
    """`text` with its control characters, but tab and newline, written as \\xNN escapes."""
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def one_line(text: str) -> str:
    """visible(text) with newlines and tabs escaped too, for a table cell, a code span or a bold name."""
    return visible(text).replace("\n", "\\n").replace("\t", "\\t")


def cell(text: str) -> str:
    return one_line(text).replace("|", "\\|")


def backticks(text: str, least: int = 1) -> str:
    """A code delimiter `text` cannot close: more backticks than any run of them in it."""
    return "`" * max(least, max(map(len, re.findall("`+", text)), default=0) + 1)


def code_span(text: str) -> str:
    text = one_line(text)
    ticks, pad = backticks(text), " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def code_block(text: str) -> list[str]:
    """The lines of a fenced markdown block holding `text`."""
    return [backticks(text, 3), visible(text), backticks(text, 3)]


def is_previous_report(out: Path) -> bool:
    """Whether `out` holds nothing but a report build_report wrote (which a new report may replace)."""
    names = {p.name for p in out.iterdir()}
    return "summary.json" in names and names <= set(REPORT_FILES)


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output directory holding anything but a previous report, unless overwrite (before any work)."""
    if out.exists() and not out.is_dir():
        raise CompareError(f"--out {out} is a file; give a directory for the report")
    if out.is_dir() and holds_cwd(out):
        raise CompareError(f"--out {out} is (or holds) the current directory, which writing the report would replace; "
                           "give a new directory, e.g. --out ./report")
    if out.is_dir() and any(out.iterdir()) and not is_previous_report(out) and not overwrite:
        found = ", ".join(sorted(p.name for p in out.iterdir())[:5])
        raise CompareError(f"--out {out} is not empty and is not a previous report (it holds {found}); choose another "
                           f"--out, or pass --overwrite to move it aside to {out.name}.old-<time> and write the report")


def write_report(out: Path, files: dict[str, str]) -> None:
    """Write the report's files to a temporary directory beside `out`, then rename it into place, so `out` never
    holds half a report. A previous report in `out` is replaced; anything else there is moved aside, never
    deleted (check_out_dir has refused it unless --overwrite)."""
    out = Path(os.path.abspath(out))  # `--out .` has no name to put a temporary directory beside
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    old = None
    try:
        for name, text in files.items():
            (tmp / name).write_text(text)
        if out.is_dir() and any(out.iterdir()):
            if is_previous_report(out):
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out, old)
            else:
                prepare_output_dir(out, overwrite=True)  # moves it to <out>.old-<time>, leaves an empty `out`
        os.replace(tmp, out)  # onto a missing or empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_report(inputs: list[str | Path], out_dir: str | Path, names: list[str] | None = None,
                 extra_metrics: dict[str, dict] | None = None, prompts: list[str] | None = PROMPTS,
                 max_new_tokens: int = 40, overwrite: bool = False) -> dict:
    """Write report.md, index.html and summary.json to out_dir; returns the summary.

    extra_metrics: {model name: {metric: value or {"value", "stderr", "n", "higher_is_better"}}}, merged with
    each model's extra_metrics.json (e.g. the pipeline's reward_mean and PPO-vs-SFT win rate).
    out_dir may be missing, empty or hold a previous report (replaced); anything else needs overwrite."""
    if not inputs:
        raise CompareError("give at least one results file or model directory")
    if names and len(names) != len(inputs):
        raise CompareError(f"{len(names)} --names for {len(inputs)} inputs")
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    entries = []
    for i, path in enumerate(inputs):
        entry = load_entry(path, names[i] if names else None)
        entries.append(entry)
    seen: dict[str, int] = {}
    taken = {e["name"] for e in entries}
    for entry in entries:  # unique names: two runs' "final" directories become final, final-2
        seen[entry["name"]] = seen.get(entry["name"], 0) + 1
        if seen[entry["name"]] > 1:
            base, count = entry["name"], seen[entry["name"]]
            while f"{base}-{count}" in taken:  # another input may already be called final-2
                count += 1
            entry["name"] = f"{base}-{count}"
            taken.add(entry["name"])
    for path, entry in zip(inputs, entries):
        if entry["results"] is None and not prompts:
            raise CompareError(f"{path} is a model directory without evaluation results (none in it, nor at "
                               f"{pipeline_results(path)}) and generations are off: run `align eval --model {path}` "
                               "first")
    known = [e["name"] for e in entries]
    for name in extra_metrics or {}:
        if name not in known:
            raise CompareError(f"--extra {name}=...: no model is named {name!r}; the models are "
                               f"{', '.join(known)} (set them with --names)")
    for entry in entries:
        extra = check_extra(f"extra metrics of {entry['name']}", (extra_metrics or {}).get(entry["name"], {}))
        for metric, value in extra.items():
            entry["metrics"][metric] = metric_entry(value)

    metrics = list(dict.fromkeys(m for e in entries for m in e["metrics"]))
    metrics.sort(key=lambda m: 0 if m == ACCURACY_METRIC
                 else 1 if m in REWARD_METRICS or m.startswith("win_rate") else 2)
    flags = reward_hacking(entries)
    generations = {}
    if prompts:
        for e in entries:
            if e["model_dir"]:
                generations[e["name"]] = generate(e["model_dir"], prompts, e["chat"], max_new_tokens, e["peft"])

    summary = {
        "models": {e["name"]: {
            "metrics": {m: v["value"] for m, v in e["metrics"].items()},
            "stderr": {m: v["stderr"] for m, v in e["metrics"].items() if v.get("stderr") is not None},
            "n": {m: v["n"] for m, v in e["metrics"].items() if v.get("n") is not None},
            "results": e["results"], "model_dir": e["model_dir"],
        } for e in entries},
        "baseline": entries[0]["name"],
        "flags": flags,
    }
    bars = plot_metrics(entries, metrics)
    curves = [img for e in entries for img in plot_curves(e["name"], e["logs"])]
    write_report(out, {
        "summary.json": json.dumps(summary, indent=2, default=str) + "\n",
        "report.md": markdown(entries, metrics, flags, generations, prompts or []),
        "index.html": html_page(entries, metrics, flags, generations, prompts or [], bars, curves),
    })
    return summary


def table_rows(entries: list[dict], metrics: list[str]) -> list[list[str]]:
    base = entries[0]
    rows = []
    for m in metrics:
        cells = [m]
        for e in entries:
            entry = e["metrics"].get(m)
            cells.append(fmt(entry)
                         + (mark(difference(base["metrics"].get(m, {}), entry)) if e is not base and entry else ""))
        ns = [str(e["metrics"].get(m, {}).get("n") or "–") for e in entries]
        n = ns[0] if len(set(ns)) == 1 else " / ".join(ns)  # per model, when they differ
        chance = next((e["metrics"][m].get("chance") for e in entries
                       if e["metrics"].get(m, {}).get("chance") is not None), None)
        cells += ["" if n == "–" else n, "" if chance is None else f"{chance:g}"]
        rows.append(cells)
    return rows


def markdown(entries, metrics, flags, generations, prompts) -> str:
    header = ["metric", *[e["name"] for e in entries], "n", "chance"]
    lines = ["# Model comparison", "",
             f"Baseline: **{cell(entries[0]['name'])}**. ▲/▼: better/worse than the baseline by more than the "
             "combined standard error (no mark: within noise, or no standard error).", ""]
    if flags:
        lines += ["## Flags", ""] + [f"- **{cell(f)}**" for f in flags] + [""]
    lines += ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table_rows(entries, metrics)]
    lines += ["", "## Sources", ""]
    lines += [f"- {cell(e['name'])}: results {code_span(e['results'])}, model {code_span(e['model_dir'])}, logs: "
              f"{', '.join(e['logs']) or 'none'}" for e in entries]
    if generations:
        lines += ["", "## Generations (greedy)", ""]
        for i, prompt in enumerate(prompts):
            lines += [f"### Prompt {i + 1}", "", *code_block(prompt), ""]
            for name, outs in generations.items():
                lines += [f"**{cell(name)}**", "", *code_block(outs[i]), ""]
    return "\n".join(lines) + "\n"


def html_page(entries, metrics, flags, generations, prompts, bars, curves) -> str:
    def esc(text) -> str:
        return html.escape(visible(text))  # control characters are not valid in HTML text
    header = ["metric", *[e["name"] for e in entries], "n", "chance"]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>align: model comparison</title><style>",
             "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
             ".flag{color:#b00;font-weight:bold}pre{background:#f6f6f6;padding:6px;white-space:pre-wrap}"
             ".gen{display:grid;grid-template-columns:repeat(auto-fit,minmax(280px,1fr));gap:8px}",
             "</style></head><body><h1>Model comparison</h1>",
             f"<p>Baseline: <b>{esc(entries[0]['name'])}</b>. ▲/▼: better/worse than the baseline by more than the "
             "combined standard error.</p>"]
    if flags:
        parts += ["<h2>Flags</h2><ul>"] + [f"<li class='flag'>{esc(f)}</li>" for f in flags] + ["</ul>"]
    parts += ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in table_rows(entries, metrics)]
    parts += ["</table>"]
    if bars:
        parts += ["<h2>Metrics</h2>", f"<img alt='metrics' style='max-width:100%' src='data:image/png;base64,{bars}'>"]
    if curves:
        parts += ["<h2>Training curves</h2>"]
        parts += [f"<h3>{esc(title)}</h3><img alt='{esc(title)}' style='max-width:100%' "
                  f"src='data:image/png;base64,{data}'>" for title, data in curves]
    if generations:
        parts += ["<h2>Generations (greedy)</h2>"]
        for i, prompt in enumerate(prompts):
            parts += [f"<h3>Prompt {i + 1}</h3><pre>{esc(prompt)}</pre><div class='gen'>"]
            parts += [f"<div><b>{esc(name)}</b><pre>{esc(outs[i])}</pre></div>" for name, outs in generations.items()]
            parts += ["</div>"]
    parts += ["</body></html>"]
    return "\n".join(parts)


def read_json_arg(flag: str, file: str):
    try:
        return read_json(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CompareError(f"{flag + ' ' if flag else ''}{file}: not a readable JSON file ({err})") from err


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="align compare", description="compare evaluated models in a report")
    p.add_argument("inputs", nargs="+", help="results JSON files (from `align eval`) or model/run directories")
    p.add_argument("--out", required=True, help="report directory (report.md, index.html, summary.json)")
    p.add_argument("--names", nargs="+", help="display names, one per input (default: directory names)")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=FILE",
                   help="extra metrics JSON for the model named NAME (e.g. reward_mean, win_rate)")
    p.add_argument("--prompts", help="JSON list of prompts for side-by-side generations")
    p.add_argument("--no_generations", action="store_true", help="skip generating from model directories")
    p.add_argument("--max_new_tokens", type=at_least(1), default=40, help="tokens per greedy generation")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an --out that holds more than a previous report (it is moved aside, not deleted)")
    args = p.parse_args(argv)
    try:
        extra = {}
        for item in args.extra:
            name, sep, file = item.partition("=")
            if not sep or not Path(file).is_file():
                raise CompareError(f"--extra {item}: expected NAME=FILE with an existing JSON file")
            extra[name] = check_extra(f"--extra {item}", read_json_arg("--extra", file))
        prompts = (None if args.no_generations
                   else read_json_arg("--prompts", args.prompts) if args.prompts else PROMPTS)
        if args.prompts and prompts is not None and not (
                isinstance(prompts, list) and prompts and all(isinstance(p, str) and p for p in prompts)):
            raise CompareError(f"--prompts {args.prompts}: expected a non-empty JSON list of non-empty prompt strings, "
                               'e.g. ["Question: 2 + 3?\\nAnswer:"] (or pass --no_generations)')
        summary = build_report(args.inputs, args.out, args.names, extra, prompts, args.max_new_tokens, args.overwrite)
    except CompareError as err:
        print(f"align compare: error: {err}", file=sys.stderr)
        return 2
    for name, model in summary["models"].items():
        if model["results"] is None:
            print(f"align compare: warning: {name}: {model['model_dir']} has no evaluation results, so the report "
                  f"shows only its generations; run `align eval --model {model['model_dir']}` first", file=sys.stderr)
    for flag in summary["flags"]:
        print(f"WARNING {flag}")
    print(f"report: {Path(args.out) / 'index.html'} (and report.md, summary.json)")
    return 0

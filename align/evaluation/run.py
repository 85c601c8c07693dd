"""`align eval`: run lm-eval's `simple_evaluate` on a checkpoint with the offline task definitions in evals/."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from align.evaluation.tasks import (RUNTIME_FILES, UNSAFE_TASKS, EvalError, Selection, check_demo_file,
                                    normalise_corpus, render, select, user_tasks)

log = logging.getLogger("align.eval")


def at_least(low: int):
    """An argparse type: an integer >= low (argparse then says which option and exits with status 2)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its message for a non-integer
    return parse


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="align eval", description="evaluate a checkpoint with lm-evaluation-harness")
    p.add_argument("--model", required=True, help="Hugging Face model directory (what `align export`/stages write)")
    p.add_argument("--suite", help="named suite from evals/suites.yaml: core (default), quick, tiny or smoke")
    p.add_argument("--tasks", nargs="+", help="task, group or tag names instead of a suite (e.g. mmlu gsm8k); with "
                                              "--suite, only these of the suite's tasks, with its settings")
    p.add_argument("--include_path", help="directory of your own lm-eval task YAMLs, whose tasks --tasks may name")
    p.add_argument("--limit", type=at_least(1), help="at most N documents per task (overrides the suite's limits)")
    p.add_argument("--num_fewshot", type=at_least(0),
                   help="few-shot examples for every task (overrides suite and YAML)")
    p.add_argument("--max_new_tokens", type=at_least(1), help="cap on generated tokens for generation tasks")
    p.add_argument("--apply_chat_template", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--peft", help="PEFT adapter directory to apply on top of --model")
    p.add_argument("--batch_size", type=at_least(1), default=8)
    p.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the best available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 where supported, else float32")
    p.add_argument("--demo_file", help="held-out demo problems (heldout.jsonl, GSM8K schema) for the demo task")
    p.add_argument("--corpus_file", help="held-out pretraining documents (.jsonl with text, or .txt) for ppl_corpus")
    p.add_argument("--source", choices=["pack", "hub"], default="pack",
                   help="pack: offline data (`align benchmarks fetch`); hub: lm-eval's own tasks from the hub")
    p.add_argument("--confirm_run_unsafe_code", action="store_true",
                   help="allow tasks that execute model-written code (humaneval), in the sandbox")
    p.add_argument("--code_timeout", type=positive_float, default=10.0, help="seconds per generated program")
    p.add_argument("--log_samples", action="store_true", help="also write every prompt/response to OUT.samples.jsonl")
    p.add_argument("--bootstrap_iters", type=at_least(0), default=1000,
                   help="bootstrap iterations for non-mean stderrs")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", help="results JSON (default: MODEL/eval/results.json)")
    args = p.parse_args(argv)
    return args


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def load_model(model_dir: str, peft: str | None, device: str, dtype: str, chat_template: bool = False):
    """The model and tokenizer in `model_dir` (plus a PEFT adapter), or an EvalError saying what is wrong."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if path.is_file():
        raise EvalError(f"--model {path} is a file; give the model's directory (the one holding config.json)")
    if not path.is_dir():
        raise EvalError(f"--model {path}: no such directory")
    if not (path / "config.json").is_file() and (path / "hf" / "config.json").is_file():
        raise EvalError(f"--model {path} is a pretraining run directory; its exported model is --model {path / 'hf'}")
    if not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
        raise EvalError(f"--model {path} is a PEFT adapter, not a model; give its base model as --model and "
                        f"--peft {path}")
    if not (path / "config.json").is_file():
        raise EvalError(f"--model {path} is not a Hugging Face model directory (no config.json); "
                        "export a pretraining checkpoint with `align export CKPT --out DIR`")
    archs = json.loads((path / "config.json").read_text()).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):  # its LM head would be untrained, or missing
        raise EvalError(f"--model {path} is a sequence classifier ({archs[0]}, e.g. a reward model), not a language "
                        "model; evaluate the SFT or PPO model instead")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if not any((path / name).is_file() for name in TOKENIZER_FILES):  # transformers would blame sentencepiece
        raise EvalError(f"could not load the model in {path}: it holds no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                        "save the tokenizer beside the weights")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - any loading failure becomes one clear message
        raise EvalError(f"could not load the model in {path}: {type(err).__name__}: {err}") from err
    if chat_template and not tokenizer.chat_template:  # checked before the weights load
        raise EvalError(f"--apply_chat_template: the tokenizer in {path} has no chat template; drop "
                        "--apply_chat_template, or give a model whose tokenizer has one (e.g. one `align sft` wrote)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except Exception as err:  # noqa: BLE001 - any loading failure becomes one clear message
        raise EvalError(f"could not load the model in {path}: {type(err).__name__}: {err}") from err
    if peft:
        model = apply_adapter(model, path, Path(peft))
    # lm-eval sets each request's max_length itself; the export's default max_new_tokens (for pipelines) would
    # override it and make transformers warn on every generate call.
    model.generation_config.max_new_tokens = None
    return model.to(device).eval(), tokenizer


def check_device(device: str) -> None:
    """An EvalError unless `device` names a device this machine has."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise EvalError(f"--device {device}: not a device name; use cuda, cuda:N, mps or cpu") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: this machine (or this PyTorch build) has no CUDA GPU; use --device cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise EvalError(f"--device {device}: there are {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if parsed.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EvalError(f"--device {device}: MPS is not available here; use --device cpu")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise EvalError(f"--device {device}: use cuda, cuda:N, mps or cpu")


def harness_model(model, tokenizer, model_dir: str, device: str, batch_size: int):
    """lm-eval's HFLM on `model`, with stand-ins where lm-eval would use the eos (or bos) token a tokenizer lacks."""
    from lm_eval.models.huggingface import HFLM

    if tokenizer.eos_token_id is not None:
        return HFLM(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size)

    class WithoutEos(HFLM):
        def tok_decode(self, tokens, skip_special_tokens=True):
            # lm-eval adds tok_decode(eos) to every generation's stop strings; there is none to add
            return None if tokens is None else super().tok_decode(tokens, skip_special_tokens)

    log.warning("the tokenizer in %s has no eos token: generations end at the task's stop strings or after "
                "max_gen_toks", model_dir)
    prefix = tokenizer.bos_token_id
    if prefix is None:
        # lm-eval scores a document's first token (and an empty context) after bos, else eos: a newline stands in
        prefix = (tokenizer.encode("\n", add_special_tokens=False) or [0])[-1]
        log.warning("the tokenizer in %s has no bos or eos token: perplexity scores each document's first token "
                    "after %r (id %d)", model_dir, tokenizer.decode([prefix]), prefix)
    if tokenizer.pad_token_id is None and tokenizer.unk_token_id is None:
        tokenizer.pad_token_id = prefix  # else lm-eval adds a pad token the model has no embedding for
    return WithoutEos(pretrained=model, tokenizer=tokenizer, device=device, batch_size=batch_size,
                      prefix_token_id=prefix)


ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "intermediate_size", "n_embd", "n_layer", "n_head")


def apply_adapter(model, base_dir: Path, adapter: Path):
    from peft import PeftModel

    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise EvalError(f"--peft {adapter} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        adapter_config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvalError(f"--peft {adapter}: adapter_config.json is not valid JSON ({err})") from None
    if not isinstance(adapter_config, dict):
        raise EvalError(f"--peft {adapter}: adapter_config.json is not a JSON object")
    if not any((adapter / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise EvalError(f"--peft {adapter} has no adapter weights (adapter_model.safetensors or adapter_model.bin); "
                        "give the directory the LoRA training saved")
    adapter_base = adapter_config.get("base_model_name_or_path") or ""
    base_config = Path(adapter_base) / "config.json"
    if base_config.is_file():
        trained_on, given = json.loads(base_config.read_text()), json.loads((base_dir / "config.json").read_text())
        differ = [k for k in ARCH_KEYS if trained_on.get(k) != given.get(k)]
        if differ:
            detail = ", ".join(f"{k} {trained_on.get(k)} vs {given.get(k)}" for k in differ)
            raise EvalError(f"--peft {adapter} was trained on {adapter_base}, whose architecture differs from "
                            f"--model {base_dir} ({detail}); pass the adapter's base model as --model")
    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except Exception as err:  # noqa: BLE001 - shape mismatches and missing modules alike
        raise EvalError(f"--peft {adapter} does not fit --model {base_dir} (the adapter was trained on "
                        f"{adapter_base or 'another base'}): {type(err).__name__}: {str(err)[:300]}") from err


def build_tasks(task_manager, selections: list[Selection]) -> tuple[list, dict[str, list[int]] | None]:
    """lm-eval Task/Group objects with the suite's few-shot settings, and per-task document indices for its limits."""
    objects, samples = [], {}
    for sel in selections:
        loaded = task_manager.load([sel.task])
        obj = loaded["groups"].get(sel.task) or loaded["tasks"].get(sel.task)
        objects += [obj] if obj is not None else list(loaded["tasks"].values())
        for name, task in loaded["tasks"].items():
            if sel.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=sel.num_fewshot)
            if sel.limit is not None:
                samples[name] = list(range(min(sel.limit, len(task.eval_docs))))
    return objects, samples or None


def check_fewshot(objects, num_fewshot: int | None) -> None:
    """An EvalError when a task would be asked for more few-shot examples than it has (lm-eval fails mid-run)."""
    from lm_eval.api.group import Group

    for task in [t for o in objects for t in (o.get_all_tasks() if isinstance(o, Group) else [o])]:
        configured = task.get_config("num_fewshot")
        wanted = num_fewshot if num_fewshot is not None and configured != 0 else configured  # as simple_evaluate
        sampler = getattr(task, "sampler", None)
        if not wanted or sampler is None:
            continue
        # drawn from the test split itself, a document is never its own example
        available = len(sampler.df) - (task.fewshot_cfg.split == task.config.test_split)
        if wanted > available:
            option = "--num_fewshot" if num_fewshot is not None else "num_fewshot (of the suite or the task YAML)"
            raise EvalError(f"{option} {wanted}: task {task.config.task} has only {available} few-shot examples; "
                            f"ask for at most {available}")


def cap_generation(objects, max_length: int, max_new_tokens: int | None) -> None:
    """Apply --max_new_tokens, and keep every generation task's budget below the model's context (lm-eval
    asserts max_gen_toks < max_length; HumanEval asks for 1024, a small model may have 128 positions)."""
    from lm_eval.api.group import Group

    tasks = [t for o in objects for t in (o.get_all_tasks() if isinstance(o, Group) else [o])]
    for task in tasks:
        if task.get_config("output_type") != "generate_until":
            continue
        kwargs = dict(task.get_config("generation_kwargs") or {})
        wanted = max_new_tokens or kwargs.get("max_gen_toks", 256)
        if wanted >= max_length:
            log.warning("%s: the model has %d positions; generating at most %d tokens instead of %d",
                        task.config.task, max_length, max_length // 2, wanted)
            wanted = max_length // 2
        kwargs["max_gen_toks"] = wanted
        task.set_config(key="generation_kwargs", value=kwargs)


def task_names(objects) -> list[str]:
    from lm_eval.api.group import Group

    return [t.task_name for o in objects for t in (o.get_all_tasks() if isinstance(o, Group) else [o])]


def evaluate(args: argparse.Namespace, lm=None) -> tuple[dict, dict | None]:
    """Run the selected tasks; returns (results report, per-document samples when asked). `lm` replaces the
    model in --model with any lm-eval LM object (tests use an oracle)."""
    from align.evaluation import passk, sandbox
    from align.evaluation.pack import require_pack
    from align.evaluation.tasks import summarise
    from align.hardware import device_type

    if args.device:
        check_device(args.device)
    files = {"demo_file": args.demo_file, "corpus_file": args.corpus_file}
    for option, value in files.items():
        if value and not Path(value).is_file():
            raise EvalError(f"--{option} {value}: no such file")
    if args.source == "hub":
        selections = [Selection(t) for t in (args.tasks or [])]
        if not selections:
            raise EvalError("--source hub runs lm-eval's own tasks: name them with --tasks")
    else:
        extra_tasks = user_tasks(args.include_path)
        selections = select(args.suite, args.tasks, files, extra_tasks)
    if not selections:
        raise EvalError("no task to run")
    names = {s.task for s in selections}
    if "demo" in names:
        check_demo_file(args.demo_file)
    # Opt-in to running generated code is checked before anything is loaded or generated.
    unsafe = sorted(names & UNSAFE_TASKS)
    if unsafe and not args.confirm_run_unsafe_code:
        raise EvalError(f"{', '.join(unsafe)} executes model-written code: pass --confirm_run_unsafe_code to run it "
                        "in the sandbox (see docs/evaluation.md), or choose tasks with --tasks")
    isolation = None
    if unsafe:
        passk.LIMITS = sandbox.Limits(timeout=args.code_timeout)
        isolation = sandbox.selftest().isolation
        if "netns" not in isolation and "landlock-tcp" not in isolation:
            log.warning("the code sandbox has no network isolation on this machine (no unshare, no Landlock)")
        if os.geteuid() == 0 and "landlock-signals" not in isolation:
            log.warning("running generated code as root without Landlock signal scoping (Linux >= 6.12): a program "
                        "could signal any process here; prefer an unprivileged user")

    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="align-eval-") as tmp:
        if args.source == "hub":
            task_manager = TaskManager(include_path=args.include_path)
        else:
            needs_pack = any(s.task not in extra_tasks and s.task not in RUNTIME_FILES for s in selections)
            corpus = normalise_corpus(args.corpus_file, Path(tmp) / "corpus.jsonl") if args.corpus_file else None
            include = render(Path(tmp) / "tasks", require_pack() if needs_pack else None, args.demo_file, corpus)
            paths = [str(include)] + ([args.include_path] if args.include_path else [])
            task_manager = TaskManager(include_path=paths, include_defaults=False)
        try:
            objects, samples = build_tasks(task_manager, selections)
        except KeyError as err:  # a name lm-eval does not know (with the pack, select() has checked them)
            if args.source != "hub":
                raise
            raise EvalError(f"--tasks: {err.args[0] if err.args else err}; `lm-eval ls tasks` lists lm-eval's "
                            "own tasks") from None
        except (ConnectionError, OSError) as err:
            if args.source != "hub":
                raise
            raise EvalError(f"lm-eval's own tasks load their data from the Hugging Face hub, which is unreachable "
                            f"({err}); use the offline pack (the default, `--source pack`)") from err
        check_fewshot(objects, args.num_fewshot)
        device = args.device or device_type()
        if lm is None:
            model, tokenizer = load_model(args.model, args.peft, device, args.dtype, args.apply_chat_template)
            lm = harness_model(model, tokenizer, args.model, device, args.batch_size)
        if args.limit is not None:
            samples = None
        cap_generation(objects, lm.max_length, args.max_new_tokens)
        start = time.time()
        results = lm_eval.simple_evaluate(
            model=lm, tasks=objects, task_manager=task_manager, num_fewshot=args.num_fewshot, limit=args.limit,
            samples=samples, device=device, batch_size=args.batch_size, log_samples=True,
            apply_chat_template=args.apply_chat_template, confirm_run_unsafe_code=args.confirm_run_unsafe_code,
            bootstrap_iters=args.bootstrap_iters, random_seed=args.seed, numpy_random_seed=args.seed,
            torch_random_seed=args.seed, fewshot_random_seed=args.seed,
        )
        seconds = time.time() - start
    samples_out = results.pop("samples", None)
    order = [s.task for s in selections]
    return {
        "align": {
            "model": str(Path(args.model).resolve()), "peft": str(Path(args.peft).resolve()) if args.peft else None,
            "suite": args.suite or (None if args.tasks else "core"),
            "tasks": order, "lm_eval_tasks": len(task_names(objects)), "limit": args.limit,
            "num_fewshot": args.num_fewshot,
            "apply_chat_template": args.apply_chat_template, "device": device, "batch_size": args.batch_size,
            "source": args.source, "seconds": round(seconds, 2), "sandbox_isolation": isolation,
            "max_length": lm.max_length,
        },
        "summary": summarise(results, samples_out, order),
        "lm_eval": results,
    }, samples_out if args.log_samples else None


class OncePerKind(logging.Filter):
    """lm-eval warns once per request when a context is truncated to the model's length (thousands of lines for
    few-shot MMLU on a small model): keep the first, count the rest."""

    def __init__(self):
        super().__init__()
        self.truncated = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "Truncating" in str(record.msg) or "Truncating" in record.getMessage():
            self.truncated += 1
            if self.truncated == 1:
                record.msg = f"{record.getMessage()} (further truncation warnings are counted, not shown)"
                record.args = ()
                return True
            return False
        return True


def check_out(out: Path) -> None:
    """Refuse, before any work, an --out that cannot take the results or holds a file of something else."""
    if out.is_dir():
        raise EvalError(f"--out {out} is a directory; give a file path, e.g. --out {out / 'results.json'}")
    if out.is_file() and out.stat().st_size > 0:
        try:
            previous = json.loads(out.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            previous = None
        if not (isinstance(previous, dict) and "align" in previous and "summary" in previous):
            raise EvalError(f"--out {out} exists and is not a results file of `align eval`, which is all it would "
                            "replace; choose another --out")
    parent = next(p for p in out.absolute().parents if p.exists())  # the nearest one that exists
    if not parent.is_dir():
        raise EvalError(f"--out {out}: {parent} is a file, not a directory; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EvalError(f"--out {out}: {parent} is not writable; choose another --out")


def main(argv: list[str] | None = None) -> int:
    from align.evaluation.pack import PackError
    from align.runs import write_json

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    truncation = OncePerKind()
    logging.getLogger("lm_eval.models.huggingface").addFilter(truncation)
    out = Path(args.out) if args.out else Path(args.model) / "eval" / "results.json"
    try:
        if args.out or Path(args.model).is_dir():  # else evaluate says what is wrong with --model
            check_out(out)
        report, samples = evaluate(args)
    except (EvalError, PackError) as err:
        print(f"align eval: error: {err}", file=sys.stderr)
        return 2
    write_json(out, report)
    if samples is not None:
        with out.with_suffix(".samples.jsonl").open("w") as f:
            for task, rows in samples.items():
                for row in rows:
                    f.write(json.dumps({"task": task, **row}, default=str) + "\n")
    print_summary(report["summary"])
    if truncation.truncated > 1:
        print(f"{truncation.truncated} contexts were longer than the model's {report['align'].get('max_length')} "
              "positions and were truncated from the left")
    print(f"results: {out}")
    return 0


def print_summary(rows: list[dict]) -> None:
    print(f"\n{'metric':<34} {'value':>10} {'stderr':>9} {'n':>6} {'chance':>7}")
    for r in rows:
        value = "n/a" if r["value"] is None else f"{r['value']:.4f}"
        stderr = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
        chance = "" if r["chance"] is None else f"{r['chance']:.2f}"
        print(f"{r['metric']:<34} {value:>10} {stderr:>9} {r['n'] or '':>6} {chance:>7}")

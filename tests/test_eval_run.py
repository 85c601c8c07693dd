"""`align eval` end to end with lm-eval on a fabricated offline pack: suites, an oracle model, bad input."""

import json

import conftest
import pytest
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import get_model, register_model

from align.evaluation import run
from align.evaluation.pack import pack_dir
from align.evaluation.tasks import available_tasks
from test_eval_pack import GSM8K, HUMANEVAL, install_fake_pack

REAL_PACK = pack_dir()  # the default cache, looked up before any test changes ALIGN_HOME


@pytest.fixture(scope="module")
def eval_home(tmp_path_factory):
    """ALIGN_HOME with the fabricated pack, plus demo and corpus files."""
    from align.data.tasks import write_demo_data

    home = tmp_path_factory.mktemp("align_home")
    install_fake_pack(home)
    demo = write_demo_data(home / "demo", seed=0, n_sft=5, n_preference=5, n_prompts=5, n_heldout=8)["heldout"]
    corpus = home / "heldout_corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"To be or not to be, line {i}. " * 5}) + "\n" for i in range(4)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALIGN_HOME", str(home))
        yield {"home": home, "demo": str(demo), "corpus": str(corpus)}


def run_eval(argv, tmp_path, capsys=None):
    out = tmp_path / "results.json"
    code = run.main([*argv, "--out", str(out)])
    return code, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize("suite", ["core", "quick"])
def test_suite_runs_offline_on_tiny_model(suite, eval_home, tiny_hf_dir, tmp_path):
    code, report = run_eval(["--model", str(tiny_hf_dir), "--suite", suite, "--limit", "1", "--max_new_tokens", "8",
                             "--confirm_run_unsafe_code", "--demo_file", eval_home["demo"],
                             "--corpus_file", eval_home["corpus"], "--log_samples"], tmp_path)
    assert code == 0
    metrics = {r["metric"]: r for r in report["summary"]}
    for name in ["lambada_word_perplexity", "lambada_bits_per_byte", "corpus_word_perplexity", "corpus_bits_per_byte",
                 "mmlu_acc", "gsm8k_exact_match", "arc_easy_acc", "arc_challenge_acc", "humaneval_pass@1",
                 "demo_accuracy"]:
        assert name in metrics, name
        assert metrics[name]["value"] is not None
    assert metrics["mmlu_acc"]["n"] == 57 and metrics["mmlu_acc"]["chance"] == 0.25
    assert metrics["demo_accuracy"]["n"] == 1
    assert metrics["lambada_bits_per_byte"]["higher_is_better"] is False
    assert report["align"]["suite"] == suite
    assert report["lm_eval"]["n-shot"]["mmlu_anatomy"] == (5 if suite == "core" else 0)
    assert (tmp_path / "results.samples.jsonl").is_file()
    # --max_new_tokens 8 holds for the generation tasks (the export's own max_new_tokens=128 must not override it)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    lengths = [len(tokenizer(resp, add_special_tokens=False)["input_ids"])
               for line in (tmp_path / "results.samples.jsonl").read_text().splitlines()
               for sample in [json.loads(line)] if sample["task"] in ("gsm8k", "demo", "humaneval")
               for resp in sample["resps"][0]]
    assert lengths and max(lengths) <= 12, lengths


def test_corpus_perplexities_get_the_delta_method_stderr_a_jackknife_over_documents_agrees_with():
    """lm-eval aggregates word perplexity and bits per byte over a corpus without a stderr (which the report's marks
    need); the summary adds one from the per-document (log-likelihood, words-or-bytes) samples."""
    import math

    import numpy as np

    from align.evaluation.tasks import summarise

    rng = np.random.default_rng(0)
    words = rng.integers(20, 200, size=300)
    ll = -words * rng.normal(3.0, 0.5, size=300)  # about 3 nats a word, varying by document
    nbytes = words * rng.integers(4, 7, size=300)

    def word_ppl(keep):
        return math.exp(-ll[keep].sum() / words[keep].sum())

    def bpb(keep):
        return -ll[keep].sum() / nbytes[keep].sum() / math.log(2)

    def jackknife(statistic):
        n = len(words)
        left_out = np.array([statistic(np.arange(n) != i) for i in range(n)])
        return math.sqrt((n - 1) / n * ((left_out - left_out.mean()) ** 2).sum())

    every = np.ones(len(words), dtype=bool)
    results = {"results": {"ppl_corpus": {"word_perplexity,none": word_ppl(every), "word_perplexity_stderr,none": "N/A",
                                          "bits_per_byte,none": bpb(every), "bits_per_byte_stderr,none": "N/A"}},
               "n-samples": {"ppl_corpus": {"effective": len(words)}}}
    samples = [{"word_perplexity": [float(a), int(w)], "bits_per_byte": [float(a), int(b)]}
               for a, w, b in zip(ll, words, nbytes)]
    rows = {r["metric"]: r for r in summarise(results, {"ppl_corpus": samples})}
    assert rows["corpus_word_perplexity"]["stderr"] == pytest.approx(jackknife(word_ppl), rel=0.05)
    assert rows["corpus_bits_per_byte"]["stderr"] == pytest.approx(jackknife(bpb), rel=0.05)
    assert rows["corpus_word_perplexity"]["higher_is_better"] is False and rows["corpus_bits_per_byte"]["n"] == 300


@register_model("align-oracle")
class OracleLM(LM):
    """Answers every generation request with the gold answer of the question its prompt ends with."""

    def __init__(self, answers: dict[str, str]):
        super().__init__()
        self.answers = answers

    @property
    def max_length(self):
        return 4096

    def generate_until(self, requests, disable_tqdm=False):
        out = []
        for request in requests:
            context = request.args[0]
            key = max(self.answers, key=lambda k: context.rfind(k))  # the last question in a few-shot prompt
            assert context.rfind(key) >= 0, context[-200:]
            out.append(self.answers[key])
        return out

    def loglikelihood(self, requests, disable_tqdm=False):
        return [(-1.0, False) for _ in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        return [-1.0 for _ in requests]


def oracle_answers(demo_file=None, humaneval=HUMANEVAL, gsm8k=GSM8K, humaneval_answer=None):
    answers = {f"Question: {g['question']}\nAnswer:": " " + g["answer"] for g in gsm8k}
    answers |= {h["prompt"]: (humaneval_answer or h["canonical_solution"]) for h in humaneval}
    if demo_file:
        for line in open(demo_file):
            row = json.loads(line)
            answers[f"Question: {row['question']}\nAnswer:"] = " " + row["answer"]
    return answers


def test_oracle_scores_one_on_gsm8k_humaneval_and_demo(eval_home, tmp_path):
    oracle = get_model("align-oracle")(oracle_answers(eval_home["demo"]))
    args = run.parse_args(["--model", "unused", "--tasks", "gsm8k", "humaneval", "demo", "--confirm_run_unsafe_code",
                           "--demo_file", eval_home["demo"]])
    report, _ = run.evaluate(args, lm=oracle)
    metrics = {r["metric"]: r for r in report["summary"]}
    assert metrics["gsm8k_exact_match"]["value"] == 1.0 and metrics["gsm8k_exact_match"]["n"] == len(GSM8K)
    assert metrics["humaneval_pass@1"]["value"] == 1.0 and metrics["humaneval_pass@1"]["n"] == len(HUMANEVAL)
    assert metrics["demo_accuracy"]["value"] == 1.0 and metrics["demo_accuracy"]["n"] == 8
    assert "netns" in report["align"]["sandbox_isolation"] or "landlock-tcp" in report["align"]["sandbox_isolation"]


def test_oracle_that_exits_early_scores_zero(eval_home):
    cheat = "    import sys\n    sys.exit(0)\n"  # returns before the tests run: exit code 0, but not a pass
    oracle = get_model("align-oracle")(oracle_answers(humaneval_answer=cheat))
    args = run.parse_args(["--model", "unused", "--tasks", "humaneval", "--confirm_run_unsafe_code"])
    report, _ = run.evaluate(args, lm=oracle)
    assert report["summary"][0]["metric"] == "humaneval_pass@1" and report["summary"][0]["value"] == 0.0


def test_oracle_on_the_real_pack_when_present(tmp_path, monkeypatch):
    """Bonus: with the real pack in the default cache, the oracle scores 1.0 on real GSM8K and HumanEval."""
    if not (REAL_PACK / "manifest.json").is_file():
        pytest.skip("no real benchmark pack in the default cache (`align benchmarks fetch`)")
    monkeypatch.setenv("ALIGN_HOME", str(REAL_PACK.parent.parent))
    rows = lambda p: [json.loads(line) for line in (REAL_PACK / p).read_text().splitlines()]  # noqa: E731
    answers = oracle_answers(humaneval=rows("openai_humaneval/test.jsonl")[:10],
                             gsm8k=rows("gsm8k/main/test.jsonl")[:10])
    oracle = get_model("align-oracle")(answers)
    args = run.parse_args(["--model", "unused", "--tasks", "gsm8k", "humaneval", "--limit", "10",
                           "--confirm_run_unsafe_code"])
    report, _ = run.evaluate(args, lm=oracle)
    metrics = {r["metric"]: r["value"] for r in report["summary"]}
    assert metrics["gsm8k_exact_match"] == 1.0 and metrics["humaneval_pass@1"] == 1.0


# ---------------------------------------------------------------------------------------------------- bad input


def test_unknown_task_and_suite_list_what_exists(eval_home, tiny_hf_dir, tmp_path, capsys):
    assert run_eval(["--model", str(tiny_hf_dir), "--tasks", "mmmlu"], tmp_path)[0] == 2
    err = capsys.readouterr().err
    assert "unknown task(s) mmmlu" in err and "gsm8k" in err and "humaneval" in err
    assert run_eval(["--model", str(tiny_hf_dir), "--suite", "full"], tmp_path)[0] == 2
    assert "unknown suite 'full'; available suites: core, quick" in capsys.readouterr().err
    assert {"mmlu", "gsm8k", "gsm8k_cot", "arc_easy", "humaneval", "perplexity", "demo"} <= set(available_tasks())


def test_task_file_options_are_checked(eval_home, tiny_hf_dir, tmp_path, capsys):
    assert run_eval(["--model", str(tiny_hf_dir), "--tasks", "demo"], tmp_path)[0] == 2
    assert "task demo reads the file given with --demo_file" in capsys.readouterr().err
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"content": "no text field"}\n')
    assert run_eval(["--model", str(tiny_hf_dir), "--tasks", "ppl_corpus", "--corpus_file", str(bad)], tmp_path)[0] == 2
    assert 'line 1: expected an object with a "text" string' in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b'{"prompt": "hi", "completion": "5"}\n', 'line 1: expected an object with a "question" string and an "answer"'),
    (b'{"question": "1 + 1?", "answer": "#### 2"}\nnot json\n', "line 2: not JSON"),
    (b'{"question": "caf\xe9?", "answer": "#### 1"}\n', "line 1: not UTF-8 (byte 0xe9)"),
    (b"\n", "holds no problems"),
])
def test_demo_file_in_another_schema_is_refused_before_the_model_loads(eval_home, tmp_path, capsys, content, message):
    """Were tracebacks from lm-eval's template ('question' is undefined), datasets or the UTF-8 decoder."""
    demo = tmp_path / "demo.jsonl"
    demo.write_bytes(content)
    assert run_eval(["--model", str(tmp_path / "not-needed"), "--tasks", "demo", "--demo_file", str(demo)],
                    tmp_path)[0] == 2
    err = capsys.readouterr().err
    assert err.startswith(f"align eval: error: --demo_file {demo}") and message in err and "Traceback" not in err, err


def test_corpus_jsonl_not_utf8_is_refused(eval_home, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert run_eval(["--model", str(tmp_path / "not-needed"), "--tasks", "ppl_corpus", "--corpus_file", str(corpus)],
                    tmp_path)[0] == 2
    assert f"--corpus_file {corpus}, line 2: not UTF-8 (byte 0xe9); save the file as UTF-8" in capsys.readouterr().err


def test_unsafe_code_needs_opt_in_before_anything_loads(eval_home, tmp_path, capsys):
    # The model does not exist: the opt-in is checked first, before loading or generating anything.
    assert run_eval(["--model", str(tmp_path / "nowhere"), "--suite", "core"], tmp_path)[0] == 2
    assert "humaneval executes model-written code: pass --confirm_run_unsafe_code" in capsys.readouterr().err


def test_model_dir_missing_or_not_loadable(eval_home, tmp_path, capsys):
    assert run_eval(["--model", str(tmp_path / "nowhere"), "--tasks", "arc_easy"], tmp_path)[0] == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_eval(["--model", str(tmp_path / "empty"), "--tasks", "arc_easy"], tmp_path)[0] == 2
    assert "not a Hugging Face model directory (no config.json)" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    assert run_eval(["--model", str(broken), "--tasks", "arc_easy"], tmp_path)[0] == 2
    assert "could not load the model in" in capsys.readouterr().err
    notok = tmp_path / "notok"  # weights and config, but the tokenizer files were not copied along
    notok.mkdir()
    (notok / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    assert run_eval(["--model", str(notok), "--tasks", "arc_easy"], tmp_path)[0] == 2
    assert "it holds no tokenizer (tokenizer.json," in capsys.readouterr().err
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert run_eval(["--model", str(adapter), "--tasks", "arc_easy"], tmp_path)[0] == 2
    assert f"is a PEFT adapter, not a model; give its base model as --model and --peft {adapter}" in \
        capsys.readouterr().err
    (broken / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}')
    assert run_eval(["--model", str(broken), "--tasks", "arc_easy"], tmp_path)[0] == 2
    assert "is a sequence classifier (LlamaForSequenceClassification, e.g. a reward model)" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--limit", "0", "must be an integer >= 1, got 0"), ("--limit", "-1", "must be an integer >= 1, got -1"),
    ("--batch_size", "0", "must be an integer >= 1"), ("--max_new_tokens", "0", "must be an integer >= 1"),
    ("--num_fewshot", "-1", "must be an integer >= 0"), ("--code_timeout", "0", "must be a number > 0"),
    ("--bootstrap_iters", "-5", "must be an integer >= 0"),
])
def test_numeric_options_out_of_range_are_refused(eval_home, tiny_hf_dir, tmp_path, capsys, option, value, message):
    """Each was a traceback after the model loaded (--limit 0 or -1, a negative --max_new_tokens), or quietly meant
    something else (--max_new_tokens 0: the task's budget; --batch_size 0: one batch of every request;
    --num_fewshot -1: zero-shot, recorded as n-shot -1)."""
    with pytest.raises(SystemExit) as exit_:
        run.main(["--model", str(tiny_hf_dir), "--tasks", "demo", "--demo_file", eval_home["demo"], option, value,
                  "--out", str(tmp_path / "r.json")])
    assert exit_.value.code == 2
    assert f"argument {option}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_device_and_dtype_that_do_not_exist_are_refused(eval_home, tiny_hf_dir, tmp_path, capsys):
    """Were a traceback from torch (--device) or "module 'torch' has no attribute" (--dtype)."""
    argv = ["--model", str(tiny_hf_dir), "--tasks", "demo", "--demo_file", eval_home["demo"], "--out",
            str(tmp_path / "r.json")]
    devices = ["bogus", "meta"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        assert run.main([*argv, "--device", device]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"align eval: error: --device {device}: ") and "Traceback" not in err, err
    with pytest.raises(SystemExit) as exit_:
        run.main([*argv, "--dtype", "bogus"])
    assert exit_.value.code == 2 and "argument --dtype: invalid choice: 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_num_fewshot_beyond_the_examples_a_task_has_is_refused_before_the_model_loads(eval_home, tmp_path, capsys):
    """Were tracebacks mid-run: "Sample larger than population" (ARC, GSM8K) or an AssertionError (MMLU's 5 dev
    examples per subject)."""
    from test_eval_pack import ARC

    argv = ["--model", str(tmp_path / "not-needed"), "--limit", "1", "--tasks"]
    cases = (("arc_easy", 10_000, len(ARC)), ("mmlu", 6, 5), ("gsm8k", len(GSM8K), len(GSM8K) - 1))
    for task, wanted, available in cases:
        assert run_eval([*argv, task, "--num_fewshot", str(wanted)], tmp_path)[0] == 2
        err = capsys.readouterr().err
        assert f"--num_fewshot {wanted}: task {task if task != 'mmlu' else 'mmlu_abstract_algebra'} has only " \
               f"{available} few-shot examples; ask for at most {available}" in err, err


def test_out_that_cannot_take_the_results_is_refused_before_the_run(eval_home, tiny_hf_dir, tmp_path, capsys):
    """A directory, a path under a file, or a file that is not a previous results file (here the demo file itself):
    refused before the model loads, and nothing is replaced."""
    demo = tmp_path / "heldout.jsonl"
    demo.write_text(open(eval_home["demo"]).read())
    (tmp_path / "results_dir").mkdir()
    argv = ["--model", str(tiny_hf_dir), "--tasks", "demo", "--demo_file", str(demo), "--limit", "1",
            "--max_new_tokens", "2", "--out"]
    for out, message in ((demo, "exists and is not a results file of `align eval`"),
                         (tmp_path / "results_dir", "is a directory; give a file path"),
                         (demo / "results.json", "is a file, not a directory")):
        capsys.readouterr()
        assert run.main([*argv, str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert demo.read_text() == open(eval_home["demo"]).read()
    assert list((tmp_path / "results_dir").iterdir()) == []
    # a previous results file is replaced
    previous = tmp_path / "previous.json"
    assert run.main([*argv, str(previous)]) == 0 and run.main([*argv, str(previous)]) == 0


def test_unknown_task_with_source_hub_is_named(tmp_path, capsys):
    """Was lm-eval's KeyError traceback (the pack's names are checked by select, the hub's were not)."""
    assert run_eval(["--model", str(tmp_path / "not-needed"), "--source", "hub", "--tasks", "no_such_task"],
                    tmp_path)[0] == 2
    err = capsys.readouterr().err
    assert "--tasks: Spec 'no_such_task' is not a registered task" in err and "`lm-eval ls tasks`" in err
    assert "Traceback" not in err


def test_model_that_is_a_file_or_a_pretraining_run_is_named(eval_home, tiny_hf_dir, tmp_path, capsys):
    """Were "no such directory" for an existing file, and "export a pretraining checkpoint" for a run directory
    whose export is already in RUN/hf."""
    import shutil

    assert run_eval(["--model", eval_home["demo"], "--tasks", "arc_easy"], tmp_path)[0] == 2
    assert f"--model {eval_home['demo']} is a file; give the model's directory" in capsys.readouterr().err
    assert run.main(["--model", eval_home["demo"], "--tasks", "arc_easy"]) == 2  # no --out: not about MODEL/eval
    assert f"--model {eval_home['demo']} is a file; give the model's directory" in capsys.readouterr().err
    run_dir = tmp_path / "pretrain_run"
    shutil.copytree(tiny_hf_dir, run_dir / "hf")
    (run_dir / "checkpoints").mkdir()
    assert run_eval(["--model", str(run_dir), "--tasks", "arc_easy"], tmp_path)[0] == 2
    assert f"is a pretraining run directory; its exported model is --model {run_dir / 'hf'}" in capsys.readouterr().err


def test_pack_missing_says_how_to_fetch(tiny_hf_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / "empty_home"))
    assert run_eval(["--model", str(tiny_hf_dir), "--tasks", "arc_easy"], tmp_path)[0] == 2
    assert "run `align benchmarks fetch` first" in capsys.readouterr().err


def foreign_gpt2(out, special_tokens=(), **tokens):
    corpus = ["Question: What is 20 + 9?\nAnswer: 20 + 9 = 29\n#### 29", "To be or not to be, line 3. "] * 8
    return conftest.foreign_gpt2(out, corpus, special_tokens, **tokens)


def test_chat_template_missing_is_an_error_before_the_weights_load(eval_home, tmp_path, capsys):
    model = foreign_gpt2(tmp_path / "gpt2", ["<|endoftext|>"], eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    (model / "model.safetensors").unlink()  # the weights are never needed: the template is checked first
    capsys.readouterr()
    assert run_eval(["--model", str(model), "--tasks", "demo", "--demo_file", eval_home["demo"],
                     "--apply_chat_template", "--limit", "1"], tmp_path)[0] == 2
    err = capsys.readouterr().err
    assert err.startswith(f"align eval: error: --apply_chat_template: the tokenizer in {model} has no chat template; "
                          "drop --apply_chat_template") and "Traceback" not in err


def test_tokenizer_without_special_tokens_evaluates_perplexity_and_generation(eval_home, tmp_path, caplog):
    """No eos, bos or pad: perplexity conditions on a newline, generation stops at the task's stop strings."""
    model = foreign_gpt2(tmp_path / "gpt2")
    code, report = run_eval(["--model", str(model), "--tasks", "ppl_corpus", "demo", "--corpus_file",
                             eval_home["corpus"], "--demo_file", eval_home["demo"], "--limit", "3",
                             "--max_new_tokens", "4"], tmp_path)
    assert code == 0
    metrics = {r["metric"]: r for r in report["summary"]}
    assert metrics["corpus_bits_per_byte"]["value"] > 0 and metrics["corpus_bits_per_byte"]["n"] == 3
    assert metrics["demo_accuracy"]["n"] == 3
    assert "has no bos or eos token: perplexity scores each document's first token after '\\n'" in caplog.text


def _adapter(base_dir, out):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(out)
    return out


def test_peft_adapter_on_its_base_runs_and_on_another_base_fails(eval_home, tiny_hf_dir, tiny_tokenizer, tmp_path,
                                                                 capsys):
    from align.model import GPT, export
    from conftest import tiny_config

    adapter = _adapter(tiny_hf_dir, tmp_path / "adapter")
    code, report = run_eval(["--model", str(tiny_hf_dir), "--peft", str(adapter), "--tasks", "demo", "--limit", "1",
                             "--demo_file", eval_home["demo"], "--max_new_tokens", "4"], tmp_path)
    assert code == 0 and report["align"]["peft"] == str(adapter)

    torch.manual_seed(1)
    other = export(GPT(tiny_config(n_embd=32, n_head=2, n_kv_head=1)), tiny_tokenizer, tmp_path / "other")
    assert run_eval(["--model", str(other), "--peft", str(adapter), "--tasks", "demo",
                     "--demo_file", eval_home["demo"]], tmp_path)[0] == 2
    err = capsys.readouterr().err
    assert "architecture differs" in err and "hidden_size 64 vs 32" in err
    # an adapter whose recorded base is gone still fails clearly on the shape mismatch
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "somewhere/else"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert run_eval(["--model", str(other), "--peft", str(adapter), "--tasks", "demo",
                     "--demo_file", eval_home["demo"]], tmp_path)[0] == 2
    assert "does not fit --model" in capsys.readouterr().err


def test_peft_adapter_without_weights_or_with_broken_config_is_named(eval_home, tiny_hf_dir, tmp_path, capsys):
    """Were a misleading "Cannot find the requested files in the disk cache" and a JSONDecodeError traceback."""
    adapter = _adapter(tiny_hf_dir, tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    argv = ["--model", str(tiny_hf_dir), "--peft", str(adapter), "--tasks", "demo", "--demo_file", eval_home["demo"]]
    assert run_eval(argv, tmp_path)[0] == 2
    assert f"--peft {adapter} has no adapter weights (adapter_model.safetensors" in capsys.readouterr().err
    (adapter / "adapter_config.json").write_text("{")
    assert run_eval(argv, tmp_path)[0] == 2
    err = capsys.readouterr().err
    assert f"--peft {adapter}: adapter_config.json is not valid JSON" in err and "Traceback" not in err


DATA_KEYS = {"dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split", "fewshot_split"}


def _yaml(path):
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))
    return {k: v for k, v in yaml.load(path.read_text(), Loader=Loader).items() if k not in DATA_KEYS}


@pytest.mark.parametrize("ours, theirs", [
    ("gsm8k/gsm8k.yaml", "gsm8k/gsm8k.yaml"), ("gsm8k/gsm8k-cot.yaml", "gsm8k/gsm8k-cot.yaml"),
    ("arc/arc_easy.yaml", "arc/arc_easy.yaml"), ("arc/arc_challenge.yaml", "arc/arc_challenge.yaml"),
    ("lambada/lambada_openai.yaml", "lambada/lambada_openai.yaml"),
    ("humaneval/humaneval.yaml", "humaneval/humaneval.yaml"),
    ("mmlu/_default_template_yaml", "mmlu/default/_default_template_yaml"),
    ("mmlu/_mmlu.yaml", "mmlu/default/_mmlu.yaml"),
    ("mmlu/mmlu_anatomy.yaml", "mmlu/default/mmlu_anatomy.yaml"),
])
def test_task_yamls_mirror_lm_eval_except_the_data_source(ours, theirs):
    """Prompts, metrics, filters and generation settings are lm-eval's own; only where the data comes from differs."""
    from pathlib import Path

    import lm_eval

    from align.evaluation.tasks import EVALS_DIR

    mine, builtin = _yaml(EVALS_DIR / ours), _yaml(Path(lm_eval.__file__).parent / "tasks" / theirs)
    if ours.startswith("humaneval"):  # the metric is align's sandboxed pass@k, called the same way
        assert builtin["metric_list"][0].pop("metric") == "!function utils.pass_at_k"
        assert mine["metric_list"][0].pop("metric") == "!function utils.pass_at_k"
    assert mine == builtin


def test_your_own_lm_eval_tasks_from_include_path(tiny_hf_dir, tmp_path, monkeypatch, capsys):
    """--include_path adds the user's lm-eval YAMLs (here a multiple-choice task on a local file) beside align's
    tasks, with no benchmark pack needed; a missing directory, one without tasks, or a clashing name is refused."""
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / "no-pack-here"))
    rows = [{"q": f"{i} + 1 =", "choices": [str(i + 1), str(i + 7)], "gold": 0} for i in range(4)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mine = tmp_path / "my_tasks"
    mine.mkdir()
    (mine / "sums.yaml").write_text(f"""task: my_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'qa.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
""")
    code, report = run_eval(["--model", str(tiny_hf_dir), "--include_path", str(mine), "--tasks", "my_sums"],
                            tmp_path)
    assert code == 0
    (row,) = report["summary"]
    assert row["metric"] == "my_sums_acc" and row["n"] == 4 and 0 <= row["value"] <= 1

    (mine / "clash.yaml").write_text((mine / "sums.yaml").read_text().replace("my_sums", "demo"))
    capsys.readouterr()
    assert run_eval(["--model", str(tiny_hf_dir), "--include_path", str(mine), "--tasks", "my_sums"], tmp_path)[0] == 2
    assert "task(s) demo have the name of align's own tasks; rename them" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    for where, message in ((tmp_path / "none", "no such directory"), (tmp_path / "empty", "no lm-eval task YAML")):
        assert run_eval(["--model", str(tiny_hf_dir), "--include_path", str(where), "--tasks", "x"], tmp_path)[0] == 2
        assert message in capsys.readouterr().err


def test_every_mmlu_task_and_group_has_the_chance_level_of_four_choices():
    from align.evaluation.tasks import summarise

    results = {"results": {"mmlu_stem": {"acc,none": 0.3, "acc_stderr,none": 0.02, "alias": "stem"},
                           "mmlu_anatomy": {"acc,none": 0.2, "acc_stderr,none": 0.05, "alias": "anatomy"},
                           "wikitext": {"word_perplexity,none": 90.0, "alias": "wikitext"}},
               "group_subtasks": {"mmlu_stem": ["mmlu_anatomy"]}, "n-samples": {"mmlu_anatomy": {"effective": 10}}}
    rows = {r["metric"]: r for r in summarise(results)}
    assert set(rows) == {"mmlu_stem_acc", "wikitext_word_perplexity"}  # the group's number, not its subtask's
    assert rows["mmlu_stem_acc"]["chance"] == 0.25 and rows["mmlu_stem_acc"]["n"] == 10
    assert rows["wikitext_word_perplexity"]["chance"] is None
    del results["group_subtasks"], results["results"]["mmlu_stem"]
    assert {r["metric"]: r["chance"] for r in summarise(results)}["mmlu_anatomy_acc"] == 0.25

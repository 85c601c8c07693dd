"""The pretraining loop: loss falls, outputs, kill-and-resume equality, SIGTERM, 2-process DDP, bad inputs."""

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

from align.data.shards import BatchLoader
from align.pretrain import main

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny" / "pretrain.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small run recipe: a 2-layer, 64-wide model on a 300K-character slice of the embedded corpus."""
    tmp = tmp_path_factory.mktemp("pretrain")
    model = tmp / "model.json"
    model.write_text(json.dumps(dict(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                     intermediate_size=128, tie_embeddings=True)))
    recipe = tmp / "small.yaml"
    recipe.write_text(f"""
sources: [shakespeare, arithmetic]
max_chars_per_source: 300000
arithmetic_documents: 3000
vocab_size: 512
num_proc: 1
data_dir: {tmp / 'data'}
model: {model}
block_size: 32
batch_size: 8
max_steps: 12
learning_rate: 0.005
warmup_steps: 2
eval_steps: 6
eval_batches: 2
save_steps: 4
save_total_limit: 5
""")
    return tmp, recipe


def run(recipe, out, *extra):
    return main(["--config", str(recipe), "--output_dir", str(out), *extra])


def log_of(out):
    return [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def final_weights(out, step):
    return load_file(str(Path(out) / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted 12-step run that the interrupted ones must reproduce."""
    tmp, recipe = setup
    out = tmp / "reference"
    assert run(recipe, out) == 0
    return out


def test_tiny_recipe_loss_falls_and_run_dir_is_complete(tmp_path):
    """The real tiny recipe (model, optimizer), shortened: a smaller slice of the corpus, 20 short steps."""
    out = tmp_path / "run"
    args = ["--max_chars_per_source", "300000", "--arithmetic_documents", "3000", "--vocab_size", "512",
            "--data_dir", str(tmp_path / "data"), "--num_proc", "1", "--block_size", "32", "--batch_size", "16",
            "--max_steps", "20", "--warmup_steps", "4", "--eval_steps", "20", "--eval_batches", "2",
            "--save_steps", "8", "--report_to", "tensorboard"]
    assert run(TINY_RECIPE, out, *args) == 0
    log = log_of(out)
    assert [r["step"] for r in log] == list(range(1, 21))
    assert {"loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(log[0])
    assert log[-1]["val_loss"] > 0 and log[-1]["val_ppl"] == pytest.approx(2.718281828 ** log[-1]["val_loss"], 1e-3)
    first, last = log[0]["loss"], sum(r["loss"] for r in log[-5:]) / 5
    assert first > 6.0 and last < first - 1.0, (first, last)  # ln(512) = 6.24: from chance to clearly learning

    # the run directory: checkpoints (last 2 kept), tokenizer, metrics, recipe, HF export, TensorBoard events
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-000016", "step-000020"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 20 and metrics["tokens_seen"] == 20 * 16 * 32
    assert metrics["val_loss"] == pytest.approx(log[-1]["val_loss"], abs=1e-5)
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-6)
    for step in (16, 20):  # the scheduled learning rate is the one the optimizer stepped with
        groups = torch.load(out / "checkpoints" / f"step-{step:06d}" / "optimizer.bin", weights_only=False)
        assert [g["lr"] for g in groups["param_groups"]] == pytest.approx([log[step - 1]["lr"]] * 2, rel=1e-5)
    assert json.loads((out / "hf" / "metrics.json").read_text()) == metrics
    assert (out / "recipe.yaml").is_file() and (out / "hf" / "recipe.yaml").is_file()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert list(out.glob("pretrain/events.out.tfevents.*"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.cli import main as cli_main
    from align.model import load_checkpoint

    ours = load_checkpoint(out / "checkpoints" / "step-000020")
    hf = AutoModelForCausalLM.from_pretrained(out / "hf")
    tok = AutoTokenizer.from_pretrained(out / "hf")
    ids = torch.tensor([tok("Question: Tom has 3 apples and gets 5 more.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids)[0], atol=1e-4, rtol=1e-4)
    # val_loss: the final model's mean loss over eval_batches batches of the val split's fixed windows
    from align.data.shards import TokenShards
    from align.pretrain import VAL_SEED

    val = BatchLoader(TokenShards(tmp_path / "data", "val"), block_size=32, batch_size=16, seed=VAL_SEED)
    with torch.no_grad():
        val_losses = [ours(*val.batch(b, 0, 16))[1].item() for b in range(2)]
    assert metrics["val_loss"] == pytest.approx(sum(val_losses) / 2, abs=1e-5)
    # `align export` finds the run's tokenizer from a checkpoint directory
    assert cli_main(["export", str(out / "checkpoints" / "step-000016"), "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported" / "config.json").is_file()


KILLER = """
import os, signal, sys
from align.data import shards
original = shards.BatchLoader.batch
def batch(self, step, *args, **kwargs):
    if self.shards.split == "train" and step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, step, *args, **kwargs)
shards.BatchLoader.batch = batch
from align.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(setup, reference):
    tmp, recipe = setup
    out = tmp / "killed"
    killer = tmp / "killer.py"
    killer.write_text(KILLER.format(step=6))  # dies in step 7, after step-000004 and 6 logged steps
    proc = subprocess.run([sys.executable, str(killer), "--config", str(recipe), "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [r["step"] for r in log_of(out)] == list(range(1, 7))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004"]
    damaged = out / "checkpoints" / "step-000006"  # not written by the run (those are renamed when complete)
    damaged.mkdir()
    (damaged / "random_states_0.pkl").write_bytes(b"")

    assert run(recipe, out, "--resume") == 0  # from step-000004, passing over the damaged step-000006
    resumed, uninterrupted = log_of(out), log_of(reference)
    assert [r["step"] for r in resumed] == list(range(1, 13))  # steps 5-6 of the killed run were replaced
    assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted]
    assert [r.get("val_loss") for r in resumed] == [r.get("val_loss") for r in uninterrupted]
    a, b = final_weights(out, 12), final_weights(reference, 12)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    metrics = [json.loads((run_dir / "metrics.json").read_text()) for run_dir in (out, reference)]
    for key in ("train_loss", "val_loss", "tokens_seen", "steps"):
        assert metrics[0][key] == metrics[1][key], key  # the summary covers the whole run, not the resumed part


SAVE_KILLER = """
import os, signal, sys
from accelerate import Accelerator
original = Accelerator.save_state
def save_state(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # Accelerate's files are written, the checkpoint's weights and config not yet
    return result
Accelerator.save_state = save_state
from align.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_save_killed_midway_leaves_no_checkpoint_but_a_temporary_one_the_resume_removes(setup, reference):
    """A checkpoint appears under its step-N name only once complete (it is renamed from a temporary name)."""
    tmp, recipe = setup
    out = tmp / "killed_in_save"
    killer = tmp / "save_killer.py"
    killer.write_text(SAVE_KILLER)
    proc = subprocess.run([sys.executable, str(killer), "--config", str(recipe), "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == [".tmp-step-000004"]
    assert run(recipe, out, "--resume") == 0  # nothing to resume from: the run starts at step 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000008", "step-000012"]
    assert [r["loss"] for r in log_of(out)] == [r["loss"] for r in log_of(reference)]


def test_resume_with_another_accumulation_and_optimizer_settings(setup, reference):
    """Resumed from step 4 with 8 micro-steps of 1 row instead of one of 8: the same global batch, so the same
    losses (to float rounding). Accelerate's restored micro-step count used to make it step the optimizer mid-batch.
    Changed optimizer settings apply (the checkpoint's own used to win), and a pruning a kill left half done is
    finished."""
    import shutil

    tmp, recipe = setup
    out = tmp / "reaccumulated"
    shutil.copytree(reference, out)
    for name in ("step-000008", "step-000012"):
        shutil.rmtree(out / "checkpoints" / name)
    (out / "checkpoints" / ".deleting-step-000000").mkdir()  # a kill mid-delete
    assert run(recipe, out, "--resume", "--micro_batch_size", "1") == 0
    resumed, uninterrupted = log_of(out), log_of(reference)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(resumed, uninterrupted)) < 1e-4
    assert not (out / "checkpoints" / ".deleting-step-000000").exists()

    assert run(recipe, out, "--resume", "--max_steps", "13", "--weight_decay", "0.5", "--adam_beta2", "0.9") == 0
    groups = torch.load(out / "checkpoints" / "step-000013" / "optimizer.bin", weights_only=False)["param_groups"]
    assert [(g["weight_decay"], g["betas"]) for g in groups] == [(0.5, (0.9, 0.9)), (0.0, (0.9, 0.9))]


@pytest.mark.filterwarnings("ignore:dropout=0.2")  # the export says what transformers' Llama lacks
def test_resume_continues_the_random_stream_that_dropout_draws_from(setup):
    """With dropout the batches are not all a resume must restore: it continues each process's random stream from
    the checkpoint, so the dropout masks, and with them the losses and weights, are the uninterrupted run's."""
    import shutil

    tmp, recipe = setup
    model = json.loads((tmp / "model.json").read_text())
    (tmp / "dropout.json").write_text(json.dumps({**model, "dropout": 0.2}))
    full, resumed = tmp / "dropout", tmp / "dropout_resumed"
    flags = ("--model", str(tmp / "dropout.json"), "--max_steps", "6", "--save_steps", "3", "--eval_steps", "6")
    assert run(recipe, full, *flags) == 0
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000006")
    assert run(recipe, resumed, *flags, "--resume") == 0
    assert [r["loss"] for r in log_of(resumed)] == [r["loss"] for r in log_of(full)]
    a, b = final_weights(resumed, 6), final_weights(full, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_binding_max_grad_norm_bounds_every_update(setup):
    """Gradients clipped to a norm of 1e-12 are far below AdamW's eps, so two steps move no weight by more than
    ~1e-7 (measured: 4e-8); unclipped, AdamW moves weights by up to about the learning rate per step (measured: 4e-3
    in two). No weight decay, which would move them too. The logged grad_norm is the norm before clipping."""
    tmp, recipe = setup
    out = tmp / "clipped"
    assert run(recipe, out, "--max_steps", "4", "--save_steps", "2", "--eval_steps", "4", "--warmup_steps", "0",
               "--max_grad_norm", "1e-12", "--weight_decay", "0") == 0
    a, b = final_weights(out, 2), final_weights(out, 4)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert min(r["grad_norm"] for r in log_of(out)) > 1e-2


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_its_floor():
    from align.pretrain import PretrainConfig, lr_at

    cfg = PretrainConfig(learning_rate=1.0, min_lr_ratio=0.1, warmup_steps=4, max_steps=14)
    assert [lr_at(s, cfg) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])  # step 0 trains too
    assert lr_at(9, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert lr_at(14, cfg) == pytest.approx(0.1) and lr_at(30, cfg) == pytest.approx(0.1)  # then held at the floor
    decay = [lr_at(s, cfg) for s in range(4, 15)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lr_at(0, PretrainConfig(learning_rate=2.0, warmup_steps=0, max_steps=10)) == pytest.approx(2.0)


def test_measuring_the_peak_leaves_the_random_stream_alone():
    """It runs after a resume restored the RNG: drawing from it would shift every later dropout mask."""
    from align.pretrain import measure_matmul_flops

    state = torch.get_rng_state()
    measure_matmul_flops(torch.device("cpu"), n=64, seconds=0.01)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
])
def test_bf16_peak_of_a_gpu_is_looked_up_by_the_name_torch_reports(name, peak, monkeypatch):
    from align.pretrain import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda"), torch.bfloat16) == peak

def test_sigterm_saves_exits_and_resumes(setup, reference, monkeypatch, capsys):
    tmp, recipe = setup
    out = tmp / "terminated"
    original = BatchLoader.batch

    def batch(self, step, *args, **kwargs):
        if self.shards.split == "train" and step == 2 and not batch.sent:
            batch.sent = True
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step 3: the step finishes, then it saves
        return original(self, step, *args, **kwargs)

    batch.sent = False
    monkeypatch.setattr(BatchLoader, "batch", batch)
    assert run(recipe, out) == 128 + signal.SIGTERM
    assert "SIGTERM: saved" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003"]
    assert not (out / "hf").exists()
    monkeypatch.setattr(BatchLoader, "batch", original)
    (out / "checkpoints" / ".tmp-step-000007").mkdir()  # a save that was cut short (a kill, a second Ctrl-C)
    assert run(recipe, out, "--resume") == 0
    assert [r["loss"] for r in log_of(out)] == [r["loss"] for r in log_of(reference)]
    assert not list((out / "checkpoints").glob(".tmp-*"))  # swept by the next save
    # resuming a finished run does not train again, and says so
    capsys.readouterr()
    assert run(recipe, out, "--resume") == 0
    assert len(log_of(out)) == 12
    assert "nothing left to train" in capsys.readouterr().out
    # resuming it with fewer steps than it was trained for (a --max_steps forgotten) is refused, not exported
    assert run(recipe, out, "--resume", "--max_steps", "6") == 2
    assert "is at step 12, past --max_steps 6" in capsys.readouterr().err


def test_ctrl_c_saves_and_exits_and_a_second_one_stops_at_once(setup, monkeypatch, capsys):
    tmp, recipe = setup
    original = BatchLoader.batch

    def batch(self, step, *args, **kwargs):
        if self.shards.split == "train" and step == 2 and batch.left:
            batch.left -= 1
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step, *args, **kwargs)

    batch.left = 1
    monkeypatch.setattr(BatchLoader, "batch", batch)
    before = signal.getsignal(signal.SIGINT)
    assert run(recipe, tmp / "interrupted", "--micro_batch_size", "4") == 128 + signal.SIGINT
    assert "Ctrl-C again to stop at once" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back
    assert sorted(p.name for p in (tmp / "interrupted" / "checkpoints").iterdir()) == ["step-000003"]
    batch.left = 2  # both micro-steps of step 3 are interrupted
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp / "interrupted_twice", "--micro_batch_size", "4")
    assert signal.getsignal(signal.SIGINT) is before


def test_one_run_at_a_time_per_directory_and_finite_settings(setup, capsys):
    from align.runs import lock_run_dir

    tmp, recipe = setup
    out = tmp / "locked"
    out.mkdir()
    holder = lock_run_dir(out)  # a run still going, as far as the directory can tell
    try:
        assert run(recipe, out, "--resume") == 2
        assert "is in use by a run still going (pid" in capsys.readouterr().err
    finally:
        holder.close()
    for flag in ("--learning_rate", "--max_grad_norm", "--weight_decay"):
        for value in ("nan", "inf"):
            assert run(recipe, tmp / "nan", flag, value) == 2
            assert f"{flag[2:]} must be a finite number" in capsys.readouterr().err
    assert not (tmp / "nan").exists()


def launch_two(script, *args):
    """`accelerate launch --config_file recipes/accelerate/cpu_ddp.yaml SCRIPT ARGS`: a 2-process gloo job (a script
    outside the repository imports this checkout's align through PYTHONPATH)."""
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", str(free_port()), str(script),
         *map(str, args)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)},
    )


def launch_patched(source: str, out: Path, *args):
    """launch_two of a script (`source`, written beside `out`) that patches align before it runs pretraining
    into --output_dir `out`."""
    script = out.with_name(out.name + ".py")
    script.write_text(source)
    return launch_two(script, *args, "--output_dir", out)


def test_two_processes_match_one_at_the_same_global_batch(setup):
    tmp, recipe = setup
    one, two = tmp / "one_process", tmp / "two_processes"
    # 1 process accumulating 2 micro-batches of 4 == 2 processes with 4 each: the same 8 windows per step
    assert run(recipe, one, "--micro_batch_size", "4", "--max_steps", "8") == 0
    proc = launch_two(ROOT / "scripts" / "pretrain.py", "--config", recipe, "--output_dir", two, "--max_steps", "8")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 process(es) x 4 sequences x 1 micro-steps" in proc.stdout
    assert (proc.stdout + proc.stderr).count("step 6: loss") == 1  # the eval line once, not once per rank
    a, b = log_of(one), log_of(two)
    assert len(a) == len(b) == 8
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=2e-4)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3)
    assert b[-1]["val_loss"] == pytest.approx(a[-1]["val_loss"], abs=2e-4)
    assert json.loads((two / "metrics.json").read_text())["processes"] == 2
    assert (two / "hf" / "model.safetensors").is_file()

    # the 1-process run resumed from step 4 by 2 processes: the same batches, so the same losses
    import shutil

    resumed = tmp / "one_then_two"
    shutil.copytree(one, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000008")
    proc = launch_two(ROOT / "scripts" / "pretrain.py", "--config", recipe, "--output_dir", resumed, "--max_steps", "8",
                      "--micro_batch_size", "4", "--resume", "--report_to", "tensorboard")
    # (Accelerate's end_training() destroyed the process group before the export's barrier: exit status 1)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "was saved by 1 process(es), this run has 2" in proc.stdout
    for ra, rb in zip(a, log_of(resumed)):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=2e-4)
    assert len(list(resumed.rglob("events.out.tfevents.*"))) == 1  # the main process's
    assert (resumed / "hf" / "metrics.json").is_file()


DIFFERENT_DATA = """
import sys
from align import pretrain
original = pretrain.prepare_data
def prepare_data(cfg, log=print):  # as if a source changed between the two ranks' looks at it
    import dataclasses, os
    if os.environ["RANK"] == "1":
        cfg = dataclasses.replace(cfg, data_dir=cfg.data_dir + "-rank1", max_chars_per_source=200000)
    return original(cfg, log=log)
pretrain.prepare_data = prepare_data
sys.exit(pretrain.main(sys.argv[1:]))
"""


def test_processes_that_prepared_different_data_stop_before_training(setup):
    tmp, recipe = setup
    out = tmp / "different_data"
    proc = launch_patched(DIFFERENT_DATA, out, "--config", recipe, "--max_steps", "2")
    assert proc.returncode != 0
    assert proc.stderr.count("the processes prepared different data") == 2, proc.stderr[-3000:]  # on every rank
    assert "rank 0: " in proc.stderr and "rank 1: " in proc.stderr and "-rank1 (tokens" in proc.stderr
    assert not (out / "train_log.jsonl").exists()


SIGTERM_DURING_A_SAVE = """
import os, signal, sys
from align import pretrain
original = pretrain.save_checkpoint
def save_checkpoint(accelerator, model, output_dir, step, keep):  # rank 1 alone gets a SIGTERM while it saves
    if os.environ["RANK"] == "1" and step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(accelerator, model, output_dir, step, keep)
pretrain.save_checkpoint = save_checkpoint
sys.exit(pretrain.main(sys.argv[1:]))
"""


def test_a_sigterm_to_one_process_during_a_save_stops_every_process_there(setup):
    """The signal came after the step's vote: the rank that got it must not stop alone (the other went on into the
    next step's collectives and died there with a connection traceback)."""
    tmp, recipe = setup
    out = tmp / "sigterm_during_a_save"
    proc = launch_patched(SIGTERM_DURING_A_SAVE, out, "--config", recipe, "--save_steps", "2")
    assert "SIGTERM: saved" in proc.stdout and "at step 2 of 12" in proc.stdout, proc.stderr[-3000:]
    # Both ranks stop there with 143; the one still exiting when the other has gone may be ended by torchrun (-15)
    exits = proc.stderr.count("exitcode  : 143") + proc.stderr.count("exitcode  : -15")
    assert "Connection closed" not in proc.stderr and exits == 2, proc.stderr[-3000:]
    assert [r["step"] for r in log_of(out)] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]


SLOW_RANK_ON_RESUME = """
import os, sys, time
from pathlib import Path
from align import pretrain
from transformers import PreTrainedTokenizerBase
out = Path(sys.argv[sys.argv.index("--output_dir") + 1])
marker = out / "rank0-writing-the-tokenizer"
original_check, original_save = pretrain.check_resumable, PreTrainedTokenizerBase.save_pretrained
def check_resumable(*args):  # rank 1 is late: it reads the run's tokenizer while rank 0 may be writing it
    if os.environ["RANK"] == "1":
        for _ in range(40):
            if marker.exists():
                break
            time.sleep(0.1)
    return original_check(*args)
def save_pretrained(self, directory, *args, **kwargs):  # rank 0 writes slowly
    if os.environ["RANK"] == "0" and Path(directory) == out / "tokenizer":
        (Path(directory) / "tokenizer.json").write_text("")
        marker.touch()
        time.sleep(2)
    return original_save(self, directory, *args, **kwargs)
pretrain.check_resumable, PreTrainedTokenizerBase.save_pretrained = check_resumable, save_pretrained
sys.exit(pretrain.main(sys.argv[1:]))
"""


def test_the_run_tokenizer_is_read_by_every_rank_before_the_resume_writes_it(setup, reference):
    """On --resume each rank checks the run's tokenizer; the main process must not rewrite it while another reads."""
    import shutil

    tmp, recipe = setup
    script = tmp / "slow_rank_on_resume.py"
    script.write_text(SLOW_RANK_ON_RESUME)
    out = tmp / "slow_rank_on_resume"
    shutil.copytree(reference, out)
    proc = launch_two(script, "--config", recipe, "--output_dir", out, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing left to train" in proc.stdout


def test_data_that_fails_to_prepare_stops_every_process_with_the_message(setup):
    """The first process prepares the data while the others wait; its error must end them too, not a dropped
    connection in the barrier (a gloo traceback on the waiting rank)."""
    tmp, recipe = setup
    one_doc = tmp / "one_document.txt"
    one_doc.write_text("a single short document, so the val split is empty\n")
    proc = launch_two(ROOT / "scripts" / "pretrain.py", "--config", recipe, "--output_dir", tmp / "no_val",
                      "--sources", one_doc, "--data_dir", tmp / "no_val_data")
    assert proc.returncode != 0
    assert proc.stderr.count("align pretrain: error: the val split is empty") == 2, proc.stderr[-3000:]
    assert "[rank1]" not in proc.stderr and "Connection closed" not in proc.stderr


FULL_DISK_ON_THE_MAIN_PROCESS = """
import errno, os, sys
from align import pretrain
from align.model.config import GPTConfig
original = GPTConfig.save
def save(self, path):  # only the main process writes a checkpoint's gpt_config.json; its disk fills at step 4
    if os.environ["RANK"] == "0" and ".tmp-step-000004" in str(path):
        raise OSError(errno.ENOSPC, "No space left on device")
    return original(self, path)
GPTConfig.save = save
sys.exit(pretrain.main(sys.argv[1:]))
"""


def test_a_main_process_failure_while_saving_stops_every_process_with_the_message(setup):
    """The main process writes the checkpoint's weights alone while the others wait for it; its error must reach
    them (they died in the barrier with a connection traceback), and the checkpoint before stays the latest."""
    tmp, recipe = setup
    out = tmp / "full_disk"
    proc = launch_patched(FULL_DISK_ON_THE_MAIN_PROCESS, out, "--config", recipe, "--save_steps", "2")
    assert proc.returncode != 0
    assert proc.stderr.count("align pretrain: error: [Errno 28] No space left on device; a checkpoint cut short is "
                             "removed") == 2, proc.stderr[-3000:]
    assert "Connection closed" not in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # and no half of step 4


def test_an_error_that_cannot_be_sent_to_the_other_ranks_is_sent_as_its_message():
    from align.hardware import failing_together, picklable

    class TwoArguments(Exception):  # unpickling calls __init__ with args alone: a TypeError on the receiving rank
        def __init__(self, path, reason):
            super().__init__(f"{path}: {reason}")

    assert picklable(OSError(28, "No space left on device")) and not picklable(TwoArguments("a", "b"))
    with pytest.raises(TwoArguments, match="a: b"), failing_together(1):  # one process: raised as it is
        raise TwoArguments("a", "b")


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: a clear message (exit status 2) that names the field or file, and nothing lost


def test_resume_refuses_another_model_or_tokenizer_and_writes_nothing(setup, reference, capsys):
    import shutil

    tmp, recipe = setup
    out = tmp / "changed"
    shutil.copytree(reference, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert run(recipe, out, "--resume", "--max_steps", "14", "--vocab_size", "640",
               "--data_dir", str(tmp / "data-640")) == 2
    err = capsys.readouterr().err
    assert "step-000012 holds another model than the recipe now builds (vocab_size 512 -> 640)" in err
    # the same vocabulary size, other merges: a BPE trained on less text
    assert run(recipe, out, "--resume", "--max_steps", "14", "--max_chars_per_source", "150000",
               "--data_dir", str(tmp / "data-150k")) == 2
    err = capsys.readouterr().err
    assert f"the run was trained with the tokenizer in {out / 'tokenizer'}" in err and "token ids" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_on_changed_data_says_so(setup, tiny_tokenizer, tmp_path, monkeypatch, capsys):
    """With a given tokenizer an edited corpus gives new shards of the same vocabulary: allowed, but said."""
    tmp, recipe = setup
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / "home"))
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Line {i}: the quick brown fox jumps over the lazy dog {i} times."})
                            + "\n" for i in range(600)))
    args = ["--sources", str(docs), "--tokenizer", str(tmp_path / "tok"), "--data_dir", "", "--val_fraction", "0.2",
            "--save_steps", "2", "--eval_steps", "2"]
    assert run(recipe, tmp_path / "run", *args, "--max_steps", "2") == 0
    docs.write_text(docs.read_text().replace("lazy dog", "sleepy cat"))
    capsys.readouterr()
    assert run(recipe, tmp_path / "run", *args, "--max_steps", "4", "--resume") == 0
    out = capsys.readouterr().out
    assert "warning: the data changed since this run started" in out and "from step 2 on" in out
    changed = (tmp_path / "run" / "recipe.yaml").read_text().split("changed settings: ")[1].splitlines()[0]
    assert "data digest " in changed
    # the same data prepared in another directory (a moved ALIGN_HOME) is the same data: no warning
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / "home2"))
    assert run(recipe, tmp_path / "run", *args, "--max_steps", "6", "--resume") == 0
    out = capsys.readouterr().out
    assert "home2" in out and "data changed" not in out
    # a digest noted before data format 4 (another tokenizer hash inside it) of the same tokens: no warning either
    from transformers import AutoTokenizer

    from align.data.shards import shards_digest
    from align.tokenizer import legacy_tokenizer_hash

    data_dir = next((tmp_path / "home2" / "data").iterdir())
    legacy = shards_digest(data_dir,
                           tokenizer_key=legacy_tokenizer_hash(AutoTokenizer.from_pretrained(tmp_path / "tok")))
    assert legacy != shards_digest(data_dir)
    recipe_file = tmp_path / "run" / "recipe.yaml"
    recipe_file.write_text(re.sub(r"(?m)^# data digest: .*$", f"# data digest: {legacy}", recipe_file.read_text()))
    assert run(recipe, tmp_path / "run", *args, "--max_steps", "8", "--resume") == 0
    assert "data changed" not in capsys.readouterr().out


def test_resume_past_a_torn_log_line_and_a_damaged_checkpoint(setup, reference, capsys):
    import shutil

    tmp, recipe = setup
    out = tmp / "torn"
    shutil.copytree(reference, out)
    with (out / "train_log.jsonl").open("a") as f:
        f.write('{"step": 13, "lo')  # the kill came in the middle of a write
    assert run(recipe, out, "--resume", "--max_steps", "13") == 0
    assert [r["step"] for r in log_of(out)] == list(range(1, 14))
    optimizer_state = out / "checkpoints" / "step-000013" / "optimizer.bin"
    optimizer_state.write_bytes(optimizer_state.read_bytes()[:100])  # the disk lost the end of it
    capsys.readouterr()
    assert run(recipe, out, "--resume", "--max_steps", "14") == 2
    err = capsys.readouterr().err
    assert "cannot load" in err and "step-000013" in err and "move it aside to resume from step-000012" in err
    # doing as told: a moved-aside copy is the user's, neither resumed from nor pruned
    (out / "checkpoints" / "step-000013").rename(out / "checkpoints" / "step-000013.bad")
    (out / "checkpoints" / "step-000012" / "random_states_0.pkl").unlink()
    assert run(recipe, out, "--resume", "--max_steps", "14") == 2
    assert "step-000012 lacks random states" in capsys.readouterr().err
    (out / "checkpoints" / "step-000008" / "gpt_config.json").write_text("")
    shutil.rmtree(out / "checkpoints" / "step-000012")
    assert run(recipe, out, "--resume", "--max_steps", "14") == 2
    assert "cannot load" in capsys.readouterr().err  # an unreadable gpt_config.json: no traceback either
    assert (out / "checkpoints" / "step-000013.bad" / "optimizer.bin").is_file()


def test_unknown_tracker_is_refused(setup, capsys):
    tmp, recipe = setup
    assert run(recipe, tmp / "tracker", "--report_to", "wandbx") == 2
    assert "report_to must be one of" in capsys.readouterr().err and not (tmp / "tracker").exists()
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:  # a known tracker whose package is missing: it would log nothing
        assert run(recipe, tmp / "tracker", "--report_to", "mlflow") == 2
        assert "the mlflow package is not installed" in capsys.readouterr().err and not (tmp / "tracker").exists()


def test_an_fsdp_config_on_cpu_says_it_runs_unsharded(setup, monkeypatch, capsys):
    """`accelerate launch --config_file fsdp.yaml` sets ACCELERATE_USE_FSDP; on CPU Accelerate drops it silently."""
    tmp, recipe = setup
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert run(recipe, tmp / "fsdp-on-cpu", "--max_steps", "1") == 0
    assert "asks for FSDP, but Accelerate runs CPU processes as NO" in capsys.readouterr().out


def test_the_saved_recipe_repeats_the_run(setup, reference):
    """recipe.yaml holds the resolved settings (not how the directory was treated) and is a recipe itself."""
    tmp, _ = setup
    saved = (reference / "recipe.yaml").read_text()
    assert saved.startswith("# data prepared in: ") and "resume:" not in saved and "overwrite:" not in saved
    again = tmp / "again"
    assert run(reference / "recipe.yaml", again) == 0
    assert [r["loss"] for r in log_of(again)] == [r["loss"] for r in log_of(reference)]


def test_block_size_larger_than_the_model(setup, capsys):
    tmp, recipe = setup
    assert run(recipe, tmp / "bs", "--block_size", "128") == 2
    err = capsys.readouterr().err
    assert "block_size 128 is larger than the model's block_size 64" in err and "--block_size" in err
    assert not (tmp / "bs").exists()


def test_an_error_is_written_in_one_piece(setup, monkeypatch):
    """The ranks of a launch share stderr: a message written in two pieces (print's text, then its newline) ran
    into the other rank's on one line."""
    tmp, recipe = setup
    writes = []
    monkeypatch.setattr(sys.stderr, "write", writes.append)
    assert run(recipe, tmp / "bs", "--block_size", "128") == 2
    with pytest.raises(SystemExit):
        run(recipe, tmp / "bs", "--max_steps", "abc")  # refused by the recipe parser
    errors = [w for w in writes if "error:" in w]
    assert [w.startswith("align pretrain: error: ") and w.endswith("\n") for w in errors] == [True, True], writes


def test_existing_output_dir_is_refused_then_moved_aside(setup, capsys):
    tmp, recipe = setup
    out = tmp / "occupied"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert run(recipe, out, "--max_steps", "2") == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--resume" in err and "--overwrite" in err
    assert (out / "notes.txt").read_text() == "precious"
    # --overwrite with data that cannot be read: the old run stays where it is
    assert run(recipe, out, "--overwrite", "--sources", str(tmp / "missing.jsonl"), "--data_dir", str(tmp / "d3")) == 2
    assert (out / "notes.txt").read_text() == "precious" and not list(tmp.glob("occupied.old-*"))
    assert run(recipe, out, "--max_steps", "2", "--overwrite") == 0
    backups = list(tmp.glob("occupied.old-*"))
    assert len(backups) == 1 and (backups[0] / "notes.txt").read_text() == "precious"


def test_data_dir_inside_the_output_dir_is_refused_before_anything_is_written(setup, capsys):
    # Its own data would leave a new run's output_dir non-empty (refused after preparing), and --overwrite would
    # move the data aside with the old run.
    tmp, recipe = setup
    out = tmp / "holds-data"
    assert run(recipe, out, "--data_dir", str(out / "data"), "--max_steps", "2") == 2
    err = capsys.readouterr().err
    assert f"the data directory {out / 'data'} is inside output_dir {out}" in err and "outside it" in err
    assert not out.exists()


def test_missing_data_file(setup, capsys):
    tmp, recipe = setup
    assert run(recipe, tmp / "nodata", "--sources", str(tmp / "missing.jsonl"), "--data_dir", str(tmp / "d2")) == 2
    assert "missing.jsonl' not found" in capsys.readouterr().err
    assert run(recipe, tmp / "nodata", "--sources", str(tmp / "none-*.jsonl"), "--data_dir", str(tmp / "d2")) == 2
    assert "none-*.jsonl' matched no files" in capsys.readouterr().err
    assert run(recipe, tmp / "nodata", "--sources", "", "--data_dir", str(tmp / "d2")) == 2  # not the working dir
    assert "data source '' is not a source" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(recipe), "--config", str(recipe)])
    assert "--config is given more than once" in capsys.readouterr().err
    assert not (tmp / "nodata").exists() and not (tmp / "d2").exists()


def test_damaged_prepared_data_and_unusable_output_dirs(setup, reference, tmp_path, capsys):
    """A prepared data_dir missing a shard or its tokenizer, an output_dir that cannot be made: clear errors."""
    import shutil

    tmp, recipe = setup
    data = tmp_path / "data"
    for damage, message in (
        (lambda: next(data.glob("train_*.bin")).unlink(), "is missing or truncated"),
        (lambda: shutil.rmtree(data / "tokenizer"), "holds no tokenizer.json"),
        (lambda: (data / "tokenizer" / "tokenizer.json").write_text("{broken"), "cannot be loaded (JSONDecodeError"),
    ):
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(tmp / "data", data)
        damage()
        assert run(recipe, tmp_path / "out", "--data_dir", str(data)) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "out").exists()
    for out, message in ((tmp_path / ("x" * 300), "cannot use output directory"),
                         (Path("/proc/no-such-dir/run"), "cannot create output directory")):
        assert run(recipe, out) == 2
        assert message in capsys.readouterr().err


def test_resume_past_a_damaged_recipe_file(setup, reference, tmp_path, capsys):
    """The checkpoints decide what may resume; recipe.yaml only reports changed settings, so a damaged one is
    noted and written again."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints" / "step-000012")
    (out / "recipe.yaml").write_text("max_steps: [\n")
    capsys.readouterr()
    assert run(setup[1], out, "--resume") == 0
    assert "recipe.yaml cannot be read (ParserError" in capsys.readouterr().out
    assert [r["loss"] for r in log_of(out)] == [r["loss"] for r in log_of(reference)]
    assert "max_steps: 12" in (out / "recipe.yaml").read_text()


def test_shard_tokenizer_mismatch(setup, reference, tiny_tokenizer, capsys):
    import shutil

    tmp, recipe = setup
    data = tmp / "tampered_data"
    shutil.copytree(tmp / "data", data)
    shutil.rmtree(data / "tokenizer")
    tiny_tokenizer.save_pretrained(data / "tokenizer")  # a different 512-token BPE
    assert run(recipe, tmp / "mismatch", "--data_dir", str(data)) == 2
    assert "were made with tokenizer" in capsys.readouterr().err


def test_non_finite_loss_stops_the_run(setup, capsys):
    tmp, recipe = setup
    out = tmp / "diverged"
    assert run(recipe, out, "--learning_rate", "1e6", "--max_grad_norm", "0", "--warmup_steps", "0") == 1
    err = capsys.readouterr().err
    assert re.search(r"non-finite (loss|gradient norm) at step \d+ \(loss \S+, grad_norm \S+", err), err[-500:]
    assert "--learning_rate" in err
    assert not (out / "hf").exists()
    # weights that turned inf in the optimizer step are never saved as a checkpoint to resume from
    out = tmp / "diverged_weights"
    assert run(recipe, out, "--learning_rate", "1e38", "--max_grad_norm", "0", "--warmup_steps", "0",
               "--save_steps", "1") == 1
    err = capsys.readouterr().err
    assert "non-finite weights after the optimizer step at step 1" in err and "no checkpoint was saved yet" in err
    for ckpt in (out / "checkpoints").glob("step-*"):
        assert all(t.isfinite().all() for t in load_file(ckpt / "model.safetensors").values()), ckpt


def test_continue_pretraining_from_an_hf_model(setup, reference):
    tmp, recipe = setup
    out = tmp / "continued"
    # the tokenizer comes from the HF directory; a new data_dir because the data config (its tokenizer) changed
    assert run(recipe, out, "--init_from", str(reference / "hf"), "--data_dir", str(tmp / "data_hf"),
               "--max_steps", "3", "--learning_rate", "1e-4") == 0
    log = log_of(out)
    assert log[0]["loss"] < log_of(reference)[0]["loss"] - 0.5  # starts from the trained weights, not from scratch


def test_an_hf_model_without_spare_rows_grows_its_vocabulary_for_the_added_tokens(tmp_path):
    # GPT-2, Llama 3, TinyLlama: vocab_size == len(tokenizer), no pad token. align adds pad and role tokens, which
    # need rows; continued pretraining gives them the mean of the existing ones and leaves the rest exact. Only
    # those rows: unreachable ones (rounding up to 64) would take probability mass and raise the starting loss.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from align.data.prepare import adapt_tokenizer
    from align.pretrain import ConfigError, PretrainConfig, build_model, model_config

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["the cat sat on the mat"] * 20, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                    bos_token_id=0, eos_token_id=0)).eval()
    hf.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")

    cfg = PretrainConfig(init_from=str(tmp_path / "plain"))
    adapted, lines = adapt_tokenizer(tokenizer), []
    model = build_model(cfg, model_config(cfg), adapted, log=lines.append).eval()
    vocab = hf.config.vocab_size
    added = len(adapted) - vocab
    assert added == 4 and model.config.vocab_size == len(adapted) and model.wte.weight.shape == (len(adapted), 32)
    assert model.lm_head.weight is model.wte.weight  # still tied
    assert re.search(rf"vocabulary grown from {vocab} to {len(adapted)} rows for the special tokens .*<\|pad\|>",
                     lines[0])
    idx = torch.tensor([tokenizer("the cat sat on the mat").input_ids])
    with torch.no_grad():
        (ours, our_loss), theirs = model(idx[:, :-1], idx[:, 1:]), hf(idx, labels=idx)
    assert (ours[..., :vocab] - theirs.logits[:, :-1]).abs().max() <= 1e-4
    # a mean row's logit is at most the log of the mean exp-logit (Jensen), so 4 of them raise the loss this little
    assert 0 <= our_loss - theirs.loss <= math.log1p(added / vocab) + 1e-5
    torch.testing.assert_close(model.wte.weight[-1], hf.transformer.wte.weight.mean(0))

    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe.to_str()), eos_token="<|endoftext|>")
    other.add_tokens(["not special"])
    with pytest.raises(ConfigError, match="it is not the model's tokenizer"):
        build_model(cfg, model_config(cfg), adapt_tokenizer(other), log=lines.append)


def test_activation_checkpointing_changes_memory_not_results(setup, reference):
    tmp, recipe = setup
    out = tmp / "recompute"
    assert run(recipe, out, "--activation_checkpointing", "--max_steps", "12") == 0
    assert [r["loss"] for r in log_of(out)] == [r["loss"] for r in log_of(reference)]


@pytest.mark.parametrize("line, message", [
    ("max_steps: 2.5", "field max_steps: expected an integer, got 2.5"),
    ("max_steps: true", "field max_steps: expected an integer, got True"),
    ("learning_rate: [1, 2]", "field learning_rate: expected a number, got [1, 2]"),
    ("sources: 5", "field sources: expected a list, got 5"),
    ("data_name: null", "field data_name: expected a string, got None"),
    ("sources: [shakespeare, 1]", "field sources: list item 2: expected a string, got 1"),
    ("sources: [[shakespeare]]", "field sources: list item 1: expected a string, got ['shakespeare']"),
    ("seed: \xff", ":2: not UTF-8 text (byte 0xff)"),
])
def test_recipe_values_of_the_wrong_type(setup, tmp_path, capsys, line, message):
    """YAML's own numbers, booleans and lists bypass argparse's conversions: they are checked against the fields."""
    _, recipe = setup
    key = line.split(":")[0]
    kept = [row for row in recipe.read_text().splitlines() if not row.startswith(f"{key}:")]
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(("\n".join(kept[:1] + [line] + kept[1:]) + "\n").encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
    with pytest.raises(SystemExit) as exit_info:
        run(bad, tmp_path / "out")
    assert exit_info.value.code == 2
    assert f"recipe {bad}{'' if message.startswith(':') else ': '}{message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_abbreviated_flags_are_refused_like_misspelt_recipe_keys(setup, tmp_path, capsys):
    _, recipe = setup
    with pytest.raises(SystemExit) as exit_info:  # argparse would take --max_step for --max_steps
        main(["--config", str(recipe), "--output_dir", str(tmp_path / "out"), "--max_step", "3"])
    assert exit_info.value.code == 2 and "--max_step" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prepare_output_dir_never_moves_the_current_directory(tmp_path, monkeypatch):
    from align.runs import prepare_output_dir

    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (run / "keep.txt").write_text("finished work")
    (run / "sub" / "notes.txt").write_text("mine")
    monkeypatch.chdir(run / "sub")
    for path in (run, run / "sub", Path("..")):
        with pytest.raises(FileExistsError, match=r"is \(or holds\) the current directory"):
            prepare_output_dir(path, overwrite=True)
    assert prepare_output_dir(run, resume=True) == run  # continuing it in place is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_overwriting_twice_within_a_second_keeps_both_old_directories(tmp_path, monkeypatch):
    """The backup name has the time to the second: a second --overwrite then must not fail on (or replace) it."""
    from align.runs import prepare_output_dir

    monkeypatch.setattr("time.strftime", lambda fmt: "20260101-000000")
    run = tmp_path / "run"
    for i in range(3):
        run.mkdir(exist_ok=True)
        (run / "log.txt").write_text(f"run {i}")
        prepare_output_dir(run, overwrite=True)
    backups = sorted(tmp_path.glob("run.old-*"))
    assert [b.name for b in backups] == ["run.old-20260101-000000", "run.old-20260101-000000-2",
                                         "run.old-20260101-000000-3"]
    assert [(b / "log.txt").read_text() for b in backups] == ["run 0", "run 1", "run 2"]


@pytest.mark.parametrize("flags, message", [
    (["--adam_beta1", "1.5"], "adam_beta1 and adam_beta2 must be in [0, 1), got 1.5"),
    (["--seed", "-1"], "seed must be in [0, 2**32), got -1"),
    (["--weight_decay", "-1"], "weight_decay and peak_flops must not be negative"),
    (["--output_dir", ".", "--overwrite"], "the current directory"),
])
def test_values_that_cannot_work_are_refused(setup, tmp_path, monkeypatch, capsys, flags, message):
    _, recipe = setup
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep")
    assert main([f"--config={recipe}", "--output_dir", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_bf16_autocast_trains_like_fp32(setup, reference):
    """The GPU precision path (Accelerate's bf16 autocast through the model and the chunked loss), run on CPU.

    In its own process: Accelerate's state is process-wide and this process already runs fp32."""
    tmp, recipe = setup
    out = tmp / "bf16"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--config", str(recipe),
                           "--output_dir", str(out), "--precision", "bf16"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch.bfloat16" in proc.stdout
    bf16, fp32 = [r["loss"] for r in log_of(out)], [r["loss"] for r in log_of(reference)]
    assert bf16 != fp32  # it really ran in bf16
    assert bf16[-1] < bf16[0] - 0.5
    assert max(abs(a - b) for a, b in zip(bf16, fp32)) < 0.02  # measured: 7e-4
    assert abs(log_of(out)[-1]["val_loss"] - log_of(reference)[-1]["val_loss"]) < 0.02


@pytest.mark.parametrize("sig, requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_slurm_script_stops_the_run_near_the_time_limit_and_requeues(tmp_path, sig, requeued):
    """scripts/slurm_pretrain.sbatch with stand-ins for srun and scontrol. Slurm's --signal=B:USR1 (time limit
    near) reaches only the batch shell, which must pass a SIGTERM on to the training step and requeue the job once
    the step has saved and exited; a plain SIGTERM (scancel) stops the step without a requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("""#!/bin/bash
while [[ $1 == --* ]]; do shift; done
exec "$@"
""")  # runs the step's command, which execs the launcher: one process, as srun's pid is to the batch shell
    (bin_dir / "accelerate").write_text(f"""#!/bin/bash
trap 'echo saved > {tmp_path}/step; exit 143' TERM
echo $$ > {tmp_path}/srun_pid
printf '%s\\n' "$@" > {tmp_path}/srun_args
echo "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" > {tmp_path}/shutdown_timeout
for i in $(seq 300); do sleep 0.1; done
echo "ran to the end" > {tmp_path}/step
""")
    (bin_dir / "scontrol").write_text(f"""#!/bin/bash
echo "$*" >> {tmp_path}/scontrol
[ "$1" = show ] && echo node001
exit 0
""")
    (bin_dir / "align").write_text(f"""#!/bin/bash
printf '%s\\n' "$@" > {tmp_path}/align_args
""")
    for tool in ("srun", "scontrol", "align", "accelerate"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node001",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "42", "SLURM_NODEID": "0"}
    # a glob that matches files here and a value with a space must reach the run as given
    extra = ["--max_steps", "10", "--sources", "recipes/*/pretrain.yaml", "--data_name", "my corpus"]
    job = subprocess.Popen(["bash", str(ROOT / "scripts" / "slurm_pretrain.sbatch"), "recipes/llama-1b/pretrain.yaml",
                            *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    import time

    for _ in range(100):  # until srun has started
        if (tmp_path / "srun_args").is_file():
            break
        time.sleep(0.1)
    time.sleep(0.5)  # the batch shell has recorded srun's pid
    job.send_signal(sig)
    if sig == signal.SIGTERM:  # scancel signals every process of the job, the step too
        os.kill(int((tmp_path / "srun_pid").read_text()), signal.SIGTERM)
    out, _ = job.communicate(timeout=60)
    assert (tmp_path / "step").read_text() == "saved\n"
    assert ("requeue 42" in (tmp_path / "scontrol").read_text()) == requeued
    if requeued:
        assert job.returncode == 0, out
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert args[args.index("--num_processes") + 1] == "16" and args[args.index("--machine_rank") + 1] == "0"
    assert args[args.index("scripts/pretrain.py"):] == ["scripts/pretrain.py", "--config",
                                                        "recipes/llama-1b/pretrain.yaml", "--resume", *extra]
    # the data is prepared before the launch, once; the workers get time to save before the launcher kills them
    assert (tmp_path / "align_args").read_text().splitlines() == ["prepare-data", "--config",
                                                                  "recipes/llama-1b/pretrain.yaml", *extra]
    assert (tmp_path / "shutdown_timeout").read_text() == "110\n"


def test_a_validation_larger_than_the_val_split_is_said(setup, capsys):
    """eval_batches x batch_size windows past the val split's wrap around and count tokens twice: the run says so."""
    tmp, recipe = setup
    assert run(recipe, tmp / "val-fits", "--max_steps", "1", "--eval_steps", "1") == 0
    assert "counts some of its tokens more than once" not in capsys.readouterr().out
    assert run(recipe, tmp / "val-wraps", "--max_steps", "1", "--eval_steps", "1", "--batch_size", "1024",
               "--eval_batches", "1") == 0
    out = capsys.readouterr().out
    assert "eval_batches 1 x batch_size 1024 = 1024 windows, but the val split holds " in out
    assert "fewer than one batch: raise val_fraction" in out


def test_an_mfu_above_one_says_the_measured_peak_was_low(setup, monkeypatch, capsys):
    """A peak measured while the machine was busy makes MFU exceed 100%: the run says why, and how to fix it."""
    import align.pretrain

    tmp, recipe = setup
    monkeypatch.setattr(align.pretrain, "peak_flops", lambda *args: 1e6)  # 1 MFLOP/s: any step beats it
    assert run(recipe, tmp / "low-peak", "--max_steps", "2") == 0
    assert "is above 100%: the matmul peak measured at the start (0 GFLOP/s) came out low" in capsys.readouterr().out
    assert run(recipe, tmp / "fixed-peak", "--max_steps", "2", "--peak_flops", "1e6") == 0
    assert "is above 100%" not in capsys.readouterr().out


def test_checkpoints_are_ordered_by_step_number_past_six_digits(tmp_path):
    """step-1000000 is newer than step-999999: by name it sorted first, so a resume took the older checkpoint and
    pruning deleted the newest."""
    from align.pretrain import checkpoint_dirs

    for step in (999998, 999999, 1000000, 1000001):
        d = tmp_path / "checkpoints" / f"step-{step:06d}"
        d.mkdir(parents=True)
        (d / "gpt_config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"")
    assert [d.name for d in checkpoint_dirs(tmp_path)] == ["step-999998", "step-999999", "step-1000000",
                                                            "step-1000001"]

"""On a GPU: the model's parity with transformers, generation, and the pretraining loop in bf16.

Skipped without CUDA (CI has none); `scripts/gpu_check.sh` runs this file first on a GPU machine."""

import json
import subprocess
import sys

import pytest
import torch

from align.model import GPT, to_hf
from test_hf import CASES, randomized
from test_pretrain import ROOT, TINY_RECIPE, log_of, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """The pretraining loop turns TF32 on for speed; parity in fp32 needs it off."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("case", ["llama-gqa-tied", "llama-mqa", "gpt2-tied-bias"])
def test_logits_and_greedy_generation_match_transformers_on_cuda(case):
    model = randomized(CASES[case]).cuda()
    hf = to_hf(model).cuda().eval()
    idx = torch.randint(0, 512, (3, 50), device="cuda")
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-4
    prompt = idx[:1, :8]
    ours = model.generate(prompt, 24, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_bf16_generation_with_cache_picks_the_full_forward_argmax():
    """In bf16 a cached step and a full recompute round differently, so tokens may part at a near-tie; each greedy
    token must still be (within bf16 rounding) the most likely one under a full forward pass of its prefix."""
    model = randomized(CASES["llama-gqa-tied"]).cuda().to(torch.bfloat16)
    prompt = torch.randint(0, 512, (2, 8), device="cuda")
    out = model.generate(prompt, 24, temperature=0)
    with torch.no_grad():
        logits = model(out[:, :-1])[0].float()[:, prompt.size(1) - 1 :]
    chosen = logits.gather(-1, out[:, prompt.size(1) :, None]).squeeze(-1)
    best = logits.max(-1).values
    assert (best - chosen).max().item() <= 0.02 * logits.abs().max().item()


def test_bf16_autocast_training_step_matches_fp32_and_learns():
    torch.manual_seed(0)
    model = GPT(randomized(CASES["llama-gqa-untied"]).config).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    x = torch.randint(0, 512, (8, 33), device="cuda")
    with torch.no_grad():
        fp32_loss = model(x[:, :-1], x[:, 1:])[1].item()
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x[:, :-1], x[:, 1:], return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert abs(losses[0] - fp32_loss) < 0.02
    assert losses[-1] < losses[0] - 1.0


@pytest.fixture(scope="module")
def tiny_run_args(tmp_path_factory):
    """The tiny recipe, shortened, with data prepared once for the tests below."""
    data = tmp_path_factory.mktemp("cuda-data") / "data"
    return ["--max_chars_per_source", "300000", "--arithmetic_documents", "3000", "--vocab_size", "512",
            "--data_dir", str(data), "--num_proc", "1", "--warmup_steps", "4", "--eval_batches", "2"]


def test_pretraining_loop_runs_bf16_on_cuda(tmp_path, tiny_run_args, capsys):
    """Picks bf16 by itself on the GPU, learns, exports a loadable model."""
    out = tmp_path / "run"
    assert run(TINY_RECIPE, out, *tiny_run_args, "--max_steps", "30", "--eval_steps", "30", "--save_steps", "15") == 0
    assert "torch.bfloat16, device cuda" in capsys.readouterr().out
    log = log_of(out)
    assert len(log) == 30 and log[-1]["loss"] < log[0]["loss"] - 1.0
    assert log[-1]["mfu"] < 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_loss"] == pytest.approx(log[-1]["val_loss"])
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert hf.config.vocab_size == 512


def test_fsdp2_launch_saves_resumes_and_exports(tmp_path, tiny_run_args):
    """recipes/accelerate/fsdp.yaml on one GPU: FSDP2 wrapping, sharded checkpoints, resume, the gathered export."""
    out = tmp_path / "fsdp"

    def launch(*extra):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes" / "accelerate" / "fsdp.yaml"), "--num_processes", "1",
               str(ROOT / "scripts" / "pretrain.py"), "--config", str(TINY_RECIPE), "--output_dir", str(out),
               *tiny_run_args, "--eval_steps", "10", "--save_steps", "10", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    assert "device cuda:0 (FSDP)" in launch("--max_steps", "20")
    launch("--max_steps", "30", "--resume")
    log = log_of(out)
    assert [r["step"] for r in log] == list(range(1, 31)) and log[-1]["loss"] < log[0]["loss"] - 1.0
    from transformers import AutoModelForCausalLM

    from align.model.hf import load_checkpoint

    hf = AutoModelForCausalLM.from_pretrained(out / "hf").cuda().eval()
    ours = load_checkpoint(out / "checkpoints" / "step-000030").cuda().eval()
    from align.data.shards import BatchLoader, TokenShards

    val = BatchLoader(TokenShards(tiny_run_args[tiny_run_args.index("--data_dir") + 1], "val"), 128, 8, seed=0)
    x, y = val.batch(0, 0, 8, device="cuda")
    with torch.no_grad():
        assert (hf(x).logits - ours(x)[0]).abs().max().item() <= 1e-4
        # the gathered weights are the trained ones: near the logged validation loss, far below a fresh init's
        assert abs(ours(x, y)[1].item() - log[-1]["val_loss"]) < 0.5 < log[0]["loss"] - log[-1]["val_loss"]

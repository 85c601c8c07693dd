"""Pretraining throughput side by side: our loop vs the HF Trainer on LlamaForCausalLM vs a measured matmul peak.

    python scripts/bench_pretrain.py                      # CPU: the tiny preset, fp32, 32 x 128 tokens per step
    python scripts/bench_pretrain.py --compile            # ... with torch.compile for both loops
    python scripts/bench_pretrain.py --preset llama-124m --block_size 1024 --batch_size 32   # GPU: bf16

Both loops train the same architecture (our GPT and its LlamaForCausalLM twin) at the same batch, sequence
length, optimizer (fused AdamW) and precision, on the same machine, in alternating rounds so that load from
other processes hits both alike. FLOP utilisation = flops_per_token(T) x tokens/s / peak, where flops_per_token
is the PaLM/nanoGPT count (6 x matmul weights + attention) and peak is a matmul measured here (fp32 on CPU, the
training dtype on GPU; the datasheet bf16 peak is printed too where known). Steps before --warmup are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.hardware import bf16_supported, device_type  # noqa: E402
from align.model.config import preset  # noqa: E402
from align.pretrain import GPU_BF16_PEAK, measure_matmul_flops  # noqa: E402


def matmul_peak(device, dtype, shapes) -> dict:
    """Best achieved FLOP/s over square sizes (the machine's peak) and at the model's own GEMM shapes."""
    square = max(measure_matmul_flops(device, dtype, n, seconds=0.5) for n in ((1024, 2048) if device.type == "cpu"
                                                                                 else (4096, 8192)))
    model_shapes = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        sync(device)
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            a @ b
            iters += 1
        sync(device)
        model_shapes.append(2 * m * k * n * iters / (time.perf_counter() - t0))
    return {"square": square, "model_shapes": statistics.median(model_shapes)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def prepare_bench_data(data_dir: Path, vocab_size: int, gpu: bool):
    """CPU: the tiny recipe's kind of corpus. GPU: all of Shakespeare plus the stdlib's source (17M characters,
    4M tokens), enough text for a GPT-2-sized BPE, so that the 124M model has its real 50K-row embedding."""
    from align.data.prepare import DataConfig, prepare_data

    if gpu:
        cfg = DataConfig(data_dir=str(data_dir), sources=["shakespeare", "stdlib"], vocab_size=vocab_size,
                         num_proc=min(8, os.cpu_count() or 1))
    else:
        cfg = DataConfig(data_dir=str(data_dir), sources=["shakespeare", "arithmetic"],
                         max_chars_per_source=400_000, arithmetic_documents=4000, vocab_size=vocab_size, num_proc=1)
    return cfg, prepare_data(cfg, log=lambda *a: None)


def run_ours(args, data_cfg, root: Path, round_index: int) -> float:
    """Median tokens/s of the real training loop (align.pretrain.train), warmup steps excluded."""
    from align.pretrain import PretrainConfig, train

    out = root / f"ours-{round_index}"
    cfg = PretrainConfig(
        output_dir=str(out), model=args.model_json, block_size=args.block_size, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, max_steps=args.warmup + args.steps, warmup_steps=2,
        eval_steps=10**9, eval_batches=1, save_steps=10**9, torch_compile=args.compile, precision=args.precision,
        peak_flops=1.0,
    )
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg, data_cfg)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_sec"] for r in log[args.warmup:])


def run_hf(args, data_dir: Path, vocab_size: int, root: Path) -> float:
    """Median tokens/s of transformers' Trainer on the LlamaForCausalLM twin, same batch/optimizer/precision."""
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from align.data.shards import BatchLoader, TokenShards
    from align.model.hf import hf_config

    cfg = preset(args.preset, vocab_size=vocab_size)
    model = LlamaForCausalLM(hf_config(cfg))
    loader = BatchLoader(TokenShards(data_dir, "train"), args.block_size, args.batch_size, seed=0)
    n = args.batch_size * (args.warmup + args.steps)
    rows = [loader.window(i) for i in range(n)]
    dataset = [{"input_ids": torch.from_numpy(r[:-1]), "labels": torch.from_numpy(r[:-1])} for r in rows]
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(model.device)
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(model.device)
            times.append(time.perf_counter() - self.t0)

    cpu = device_type() == "cpu"
    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_supported())
    micro = args.micro_batch_size or args.batch_size
    targs = TrainingArguments(
        output_dir=str(root / "hf-trainer"), per_device_train_batch_size=micro,
        gradient_accumulation_steps=args.batch_size // micro, max_steps=args.warmup + args.steps,
        learning_rate=3e-3, weight_decay=0.1, adam_beta2=0.95, warmup_steps=2, lr_scheduler_type="cosine",
        max_grad_norm=1.0, optim="adamw_torch_fused", use_cpu=cpu, bf16=bf16, torch_compile=args.compile,
        logging_steps=10**6, save_strategy="no", report_to=[], dataloader_num_workers=0, disable_tqdm=True,
        seed=0,
    )
    Trainer(model=model, args=targs, train_dataset=dataset, callbacks=[Timer()]).train()
    return args.batch_size * args.block_size / statistics.median(times[args.warmup:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="model preset (default: tiny on CPU, llama-124m on GPU)")
    p.add_argument("--block_size", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--micro_batch_size", type=int, default=0)
    p.add_argument("--vocab_size", type=int, default=None,
                   help="tokenizer (and model) vocabulary (default: 2048 on CPU, GPT-2's 50257 on GPU)")
    p.add_argument("--steps", type=int, default=15, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of (ours, HF)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", action="store_true", help="torch.compile in both loops")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default, one per core)")
    p.add_argument("--skip_hf", action="store_true")
    p.add_argument("--data_dir",
                   help="keep the prepared corpus here and reuse it on the next run (default: a temp dir)")
    p.add_argument("--out", help="also write the figures as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if device_type() == "cuda" else "cpu")
    gpu = device.type == "cuda"
    args.preset = args.preset or ("llama-124m" if gpu else "tiny")
    args.block_size = args.block_size or (1024 if gpu else 128)
    args.batch_size = args.batch_size or 32
    args.vocab_size = args.vocab_size or (50257 if gpu else 2048)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and bf16_supported())
    dtype = torch.bfloat16 if bf16 else torch.float32

    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:  # data, checkpoints: ~60 MB
        bench(args, device, gpu, bf16, dtype, Path(tmp))


def bench(args, device, gpu: bool, bf16: bool, dtype, root: Path):
    data_cfg, data_dir = prepare_bench_data(Path(args.data_dir) if args.data_dir else root / "data",
                                            args.vocab_size, gpu)
    from transformers import AutoTokenizer

    vocab = 64 * -(-len(AutoTokenizer.from_pretrained(data_dir / "tokenizer")) // 64)
    cfg = preset(args.preset, vocab_size=vocab)
    args.model_json = str(root / "model.json")
    cfg.save(args.model_json)
    flops_per_token = cfg.flops_per_token(args.block_size)
    rows = args.batch_size * args.block_size
    d, f, kv = cfg.n_embd, cfg.intermediate_size, cfg.n_kv_head * cfg.head_dim
    shapes = [(rows, d, d + 2 * kv), (rows, d, d), (rows, d, 2 * f), (rows, f, d), (rows, d, cfg.vocab_size)]

    from align.model import GPT

    n_params = sum(p.numel() for p in GPT(cfg).parameters())
    where = torch.cuda.get_device_name() if gpu else f"{os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"device {device} ({where}), {dtype}, preset {args.preset}: {n_params / 1e6:.2f}M params, "
          f"{args.batch_size} x {args.block_size} tokens/step, {flops_per_token / 1e6:.1f} MFLOP/token, "
          f"compile={args.compile}")
    peaks, ours, hf = [], [], []
    for r in range(args.rounds):
        peaks.append(matmul_peak(device, dtype, shapes))
        ours.append(run_ours(args, data_cfg, root, r))
        if not args.skip_hf:
            hf.append(run_hf(args, data_dir, vocab, root))
        print(f"round {r + 1}: ours {ours[-1]:,.0f} tok/s" + (f", HF Trainer {hf[-1]:,.0f} tok/s" if hf else "")
              + f", matmul peak {peaks[-1]['square'] / 1e9:,.0f} GFLOP/s (model shapes "
              f"{peaks[-1]['model_shapes'] / 1e9:,.0f})")
    peaks.append(matmul_peak(device, dtype, shapes))
    peak = max(p["square"] for p in peaks)
    shape_peak = max(p["model_shapes"] for p in peaks)
    table = [("matmul peak (square, measured)", None, peak), ("matmul at the model's GEMM shapes", None, shape_peak)]
    table.append(("align.pretrain loop", statistics.median(ours), flops_per_token * statistics.median(ours)))
    if hf:
        table.append(("HF Trainer, LlamaForCausalLM", statistics.median(hf), flops_per_token * statistics.median(hf)))
    print(f"\n{'':36} {'tokens/s':>10} {'GFLOP/s':>9} {'% of peak':>10}")
    for name, tps, flops in table:
        print(f"{name:36} {tps and f'{tps:,.0f}' or '':>10} {flops / 1e9:>9,.1f} {100 * flops / peak:>9.1f}%")
    if hf:
        print(f"\nours / HF Trainer: {statistics.median(ours) / statistics.median(hf):.2f}x")
    if gpu and bf16:
        name = torch.cuda.get_device_name()
        spec = next((v for k, v in GPU_BF16_PEAK.items() if k in name), None)
        if spec:
            print(f"MFU vs datasheet bf16 peak ({spec / 1e12:.0f} TFLOP/s): ours "
                  f"{100 * flops_per_token * statistics.median(ours) / spec:.1f}%"
                  + (f", HF {100 * flops_per_token * statistics.median(hf) / spec:.1f}%" if hf else ""))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": str(device), "dtype": str(dtype), "preset": args.preset, "batch_size": args.batch_size,
            "block_size": args.block_size, "compile": args.compile, "flops_per_token": flops_per_token,
            "ours_tokens_per_sec": ours, "hf_tokens_per_sec": hf, "peaks": peaks,
        }, indent=2))


if __name__ == "__main__":
    main()

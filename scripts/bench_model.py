"""Benchmark the from-scratch GPT against transformers at the same config, side by side in one run.

Training step (forward + backward + AdamW) tokens/s: GPT vs LlamaForCausalLM (llama family) and vs
GPT2LMHeadModel (gpt2 family). Decoding tokens/s at batch 1: GPT with KV cache, GPT without, HF `generate`.
Rounds alternate between the contenders so that a noisy machine slows all of them alike.

    python scripts/bench_model.py                       # CPU defaults (d=256, 6 layers, vocab 8192, T=256, B=16)
    python scripts/bench_model.py --vocab_size 32000    # the same models with Llama 2's vocabulary
    python scripts/bench_model.py --preset llama-124m --device cuda --dtype bfloat16 --batch_size 16 --seq_len 1024
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from align.model import GPT, GPTConfig, preset, to_hf
from align.pretrain import peak_flops


def sync(device):
    if torch.device(device).type == "cuda":  # also "cuda:1"
        torch.cuda.synchronize()


def train_step_fn(model, hf: bool, device, dtype):
    kind = torch.device(device).type  # autocast wants "cuda", not "cuda:0"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=kind == "cuda")
    autocast = torch.autocast(device_type=kind, dtype=dtype, enabled=dtype != torch.float32)

    def step(x, y):
        with autocast:
            loss = model(input_ids=x, labels=x).loss if hf else model(x, y, return_logits=False)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_training(contenders: dict, config: GPTConfig, batch_size: int, seq_len: int, steps: int, rounds: int,
                   device: str, dtype) -> tuple[dict[str, float], dict[str, float]]:
    """tokens/s of each contender from its median and from its fastest step time.

    The median is what a run sees on this machine; the fastest step is the better estimate of the code's own
    speed on a shared host, where other tenants only ever add time (both ratios are printed)."""
    x = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]
    steps_fns = {name: train_step_fn(m, name.startswith("HF"), device, dtype) for name, m in contenders.items()}
    for fn in steps_fns.values():  # warm up (allocator, autotuning)
        for _ in range(2):
            fn(inputs, targets)
    step_times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in steps_fns.items():
            for _ in range(steps):
                sync(device)
                start = time.perf_counter()
                fn(inputs, targets)
                sync(device)
                step_times[name].append(time.perf_counter() - start)
    tokens = batch_size * seq_len
    median = {name: tokens / statistics.median(times) for name, times in step_times.items()}
    fastest = {name: tokens / min(times) for name, times in step_times.items()}
    return median, fastest


@torch.no_grad()
def bench_decoding(model: GPT, hf_model, prompt_len: int, new_tokens: int, rounds: int, device: str):
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    runs = {
        "GPT.generate (KV cache)": lambda: model.generate(prompt, new_tokens, temperature=0),
        "GPT.generate (no cache)": lambda: model.generate(prompt, new_tokens, temperature=0, use_cache=False),
        "HF generate (its cache)": lambda: hf_model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        ),
    }
    outputs = {name: run() for name, run in runs.items()}  # warm-up, and the agreement count below
    ours, theirs = outputs["GPT.generate (KV cache)"][0], outputs["HF generate (its cache)"][0]
    differs = (ours != theirs).nonzero()
    agree = (differs[0].item() if len(differs) else len(ours)) - prompt_len
    elapsed = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for name, run in runs.items():
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            elapsed[name] += time.perf_counter() - start
    rates = {name: rounds * new_tokens / t for name, t in elapsed.items()}
    rates["matmuls of a cached step alone"] = weight_streaming_rate(model, new_tokens, device)
    return rates, agree


@torch.inference_mode()
def weight_streaming_rate(model: GPT, steps: int, device: str) -> float:
    """Steps/s of just the matmuls of one cached decoding step (every Linear once, batch 1, back to back).

    At batch 1 each weight is read once per token, so this is the ceiling of cached decoding on this machine:
    what the rest of the step (norms, RoPE, attention, sampling) costs is the gap between it and the cached row."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, layer.in_features, device=device, dtype=layer.weight.dtype) for layer in linears]

    def step():
        for layer, x in zip(linears, inputs):
            layer(x)

    for _ in range(5):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None,
                        help="model preset (default: a CPU-sized Llama and its GPT-2 twin, see --family)")
    parser.add_argument("--family", choices=["llama", "gpt2", "both"], default="both",
                        help="which of the default models (a preset is its own family)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(GPT)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="hardware peak for MFU (default: measured)")
    parser.add_argument("--skip_decode", action="store_true")
    parser.add_argument("--skip_train", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    parser.add_argument("--vocab_size", type=int, default=8192, help="vocabulary of the default models")
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.preset:
        cfg = preset(args.preset)
        families = {cfg.family: cfg}
    else:
        llama_cfg = GPTConfig(vocab_size=args.vocab_size, block_size=512, n_layer=6, n_head=8, n_kv_head=4, n_embd=256,
                              intermediate_size=688, tie_embeddings=True)
        gpt2_cfg = dataclasses.replace(llama_cfg, norm="layernorm", position="learned", mlp="gelu", bias=True,
                                       n_kv_head=llama_cfg.n_head, intermediate_size=4 * llama_cfg.n_embd)
        families = {"llama": llama_cfg, "gpt2": gpt2_cfg}
        if args.family != "both":
            families = {args.family: families[args.family]}

    if args.peak_tflops:
        peak, peak_source = args.peak_tflops * 1e12, "given"
    else:
        peak = peak_flops(torch.device(device), dtype)
        peak_source = "the bf16 datasheet figure of a known GPU, else the best measured matmul"
    print(f"device {device}, dtype {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"peak {peak / 1e9:.0f} GFLOP/s ({peak_source})")

    for family, cfg in families.items():
        model = GPT(cfg).to(device)
        hf = to_hf(model).to(device)
        hf.config.use_cache = False
        hf.train()
        model.train()
        contenders = {"GPT": model, f"HF {type(hf).__name__}": hf}
        if args.compile:
            contenders["GPT (torch.compile)"] = torch.compile(GPT(cfg).to(device))
        if not args.skip_train:
            tps, best = bench_training(contenders, cfg, args.batch_size, args.seq_len, args.steps, args.rounds,
                                       device, dtype)
            flops = cfg.flops_per_token(args.seq_len)
            hf_name = f"HF {type(hf).__name__}"
            print(f"\n## training step, {family} family: {cfg.num_params(False) / 1e6:.1f}M params, "
                  f"B={args.batch_size}, T={args.seq_len}")
            print("| model | tokens/s (median step) | vs HF | MFU | tokens/s (fastest step) | vs HF |\n"
                  "|---|---:|---:|---:|---:|---:|")
            for name, value in tps.items():
                print(f"| {name} | {value:,.0f} | {value / tps[hf_name]:.2f}x | {100 * value * flops / peak:.1f}% "
                      f"| {best[name]:,.0f} | {best[name] / best[hf_name]:.2f}x |")

        if not args.skip_decode:
            model.eval().to(dtype)  # decoding runs in the weights' own dtype (trained with autocast above)
            hf.eval().to(dtype)
            hf.config.use_cache = True
            prompt_len = 16
            if prompt_len + args.new_tokens > cfg.block_size:
                raise SystemExit(f"--new_tokens {args.new_tokens} + prompt exceeds block_size {cfg.block_size}")
            dps, agree = bench_decoding(model, hf, prompt_len, args.new_tokens, max(1, args.rounds - 1), device)
            cached = dps["GPT.generate (KV cache)"]
            print(f"\n## greedy decoding, {family} family: batch 1, prompt {prompt_len}, {args.new_tokens} new tokens "
                  f"(GPT and HF agree on the first {agree} greedy tokens of a random-weight model)")
            print("| method | tokens/s | KV cache vs this |\n|---|---:|---:|")
            for name, value in dps.items():
                print(f"| {name} | {value:,.0f} | {cached / value:.2f}x |")
        del model, hf


if __name__ == "__main__":
    main()

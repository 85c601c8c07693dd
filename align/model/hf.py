"""Hugging Face mapping: our GPT <-> LlamaForCausalLM / GPT2LMHeadModel, and the exported checkpoint directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from align.model.config import GPTConfig
from align.model.gpt import GPT
from align.tokenizer import id_limit

CONFIG_FILE = "gpt_config.json"  # our own checkpoint: GPTConfig + model.safetensors
WEIGHTS_FILE = "model.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# GPT -> transformers


def hf_config(config: GPTConfig):
    """The transformers config that expresses `config` exactly, or a ValueError saying why none does."""
    if config.family == "llama":
        if config.dropout:
            warnings.warn(f"dropout={config.dropout}: transformers' Llama has attention dropout only, so the exported "
                          "model trains without our embedding and residual dropout (eval-mode logits are identical)",
                          stacklevel=2)
        return LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.n_embd,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.n_layer,
            num_attention_heads=config.n_head,
            num_key_value_heads=config.n_kv_head,
            head_dim=config.head_dim,
            hidden_act="silu",
            max_position_embeddings=config.block_size,
            rms_norm_eps=config.norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
            tie_word_embeddings=config.tie_embeddings,
            attention_bias=config.bias,
            mlp_bias=config.bias,
            attention_dropout=config.dropout,
            bos_token_id=None,
            eos_token_id=None,
        )
    if config.family == "gpt2":
        return GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.block_size,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_inner=config.intermediate_size,
            activation_function="gelu_new",
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            layer_norm_epsilon=config.norm_eps,
            tie_word_embeddings=config.tie_embeddings,
            bos_token_id=None,
            eos_token_id=None,
        )
    raise ValueError(
        f"no transformers class expresses norm={config.norm!r}, position={config.position!r}, mlp={config.mlp!r}"
        f", n_kv_head={config.n_kv_head}/n_head={config.n_head}: use rmsnorm+rope+swiglu (exported as "
        "LlamaForCausalLM) or layernorm+learned+gelu with n_kv_head == n_head (exported as GPT2LMHeadModel)"
    )


def _hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    c = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    out = {}
    if c.family == "llama":
        out["model.embed_tokens.weight"] = sd["wte.weight"]
        for i in range(c.n_layer):
            src, dst = f"blocks.{i}.", f"model.layers.{i}."
            for kind in ("weight", "bias") if c.bias else ("weight",):
                w = sd[src + f"attn.qkv.{kind}"]
                out[dst + f"self_attn.q_proj.{kind}"] = w[:q]
                out[dst + f"self_attn.k_proj.{kind}"] = w[q : q + kv]
                out[dst + f"self_attn.v_proj.{kind}"] = w[q + kv :]
                out[dst + f"self_attn.o_proj.{kind}"] = sd[src + f"attn.proj.{kind}"]
                gate, up = sd[src + f"mlp.fc.{kind}"].chunk(2, dim=0)
                out[dst + f"mlp.gate_proj.{kind}"] = gate
                out[dst + f"mlp.up_proj.{kind}"] = up
                out[dst + f"mlp.down_proj.{kind}"] = sd[src + f"mlp.proj.{kind}"]
            out[dst + "input_layernorm.weight"] = sd[src + "norm_1.weight"]
            out[dst + "post_attention_layernorm.weight"] = sd[src + "norm_2.weight"]
        out["model.norm.weight"] = sd["norm_f.weight"]
    else:  # gpt2: Conv1D stores weights as (in, out), so every linear is transposed; biases always exist
        def bias_or_zeros(name, size):
            return sd[name] if name in sd else torch.zeros(size, dtype=sd["wte.weight"].dtype)

        d = c.n_embd
        out["transformer.wte.weight"] = sd["wte.weight"]
        out["transformer.wpe.weight"] = sd["wpe.weight"]
        for i in range(c.n_layer):
            src, dst = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs, size in (
                ("attn.qkv", "attn.c_attn", 3 * d),
                ("attn.proj", "attn.c_proj", d),
                ("mlp.fc", "mlp.c_fc", c.intermediate_size),
                ("mlp.proj", "mlp.c_proj", d),
            ):
                out[dst + theirs + ".weight"] = sd[src + ours + ".weight"].t().contiguous()
                out[dst + theirs + ".bias"] = bias_or_zeros(src + ours + ".bias", size)
            for ours, theirs in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
                out[dst + theirs + ".weight"] = sd[src + ours + ".weight"]
                out[dst + theirs + ".bias"] = bias_or_zeros(src + ours + ".bias", d)
        out["transformer.ln_f.weight"] = sd["norm_f.weight"]
        out["transformer.ln_f.bias"] = bias_or_zeros("norm_f.bias", d)
    out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def unwrap(model: torch.nn.Module) -> GPT:
    """The GPT inside a torch.compile wrapper (whose state_dict keys carry an `_orig_mod.` prefix)."""
    return getattr(model, "_orig_mod", model)


def to_hf(model: GPT) -> PreTrainedModel:
    """The same network as a transformers model (fp32, eval mode): identical logits up to float rounding."""
    model = unwrap(model)
    config = hf_config(model.config)
    hf_cls = LlamaForCausalLM if model.config.family == "llama" else GPT2LMHeadModel
    hf_model = hf_cls(config).float()
    missing, unexpected = hf_model.load_state_dict(_hf_state_dict(model), strict=False)
    missing = [k for k in missing if not k.endswith(".attn.bias") and not k.endswith(".attn.masked_bias")]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping is incomplete: missing {missing}, unexpected {unexpected}")
    if model.config.tie_embeddings:
        hf_model.tie_weights()
    return hf_model.eval()


# ----------------------------------------------------------------------------------------------------------------
# transformers -> GPT


def gpt_config_from_hf(hf_cfg) -> GPTConfig:
    """Our config for an HF Llama or GPT-2 config; anything we cannot reproduce exactly is refused."""
    kind = getattr(hf_cfg, "model_type", None)
    if kind == "llama":
        rope = getattr(hf_cfg, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_type {rope.get('rope_type')!r} (scaled RoPE) is not supported; only 'default'")
        if hf_cfg.hidden_act not in ("silu", "swish"):  # one function, two names
            raise ValueError(f"Llama hidden_act {hf_cfg.hidden_act!r} is not supported; only 'silu'")
        if bool(hf_cfg.attention_bias) != bool(getattr(hf_cfg, "mlp_bias", False)):
            raise ValueError("attention_bias != mlp_bias is not supported: our `bias` flag covers both")
        if hf_cfg.attention_dropout:
            warnings.warn(f"Llama attention_dropout={hf_cfg.attention_dropout}: our model has one dropout rate, so "
                          "training also drops out embeddings and residuals at that rate (eval-mode logits are "
                          "unaffected)", stacklevel=2)
        head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
        if head_dim * hf_cfg.num_attention_heads != hf_cfg.hidden_size:
            raise ValueError(f"head_dim {head_dim} * heads != hidden_size {hf_cfg.hidden_size} is not supported")
        return GPTConfig(
            vocab_size=hf_cfg.vocab_size,
            block_size=hf_cfg.max_position_embeddings,
            n_layer=hf_cfg.num_hidden_layers,
            n_head=hf_cfg.num_attention_heads,
            n_kv_head=hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads,
            n_embd=hf_cfg.hidden_size,
            intermediate_size=hf_cfg.intermediate_size,
            norm="rmsnorm",
            position="rope",
            mlp="swiglu",
            tie_embeddings=bool(hf_cfg.tie_word_embeddings),
            bias=bool(hf_cfg.attention_bias),
            dropout=float(hf_cfg.attention_dropout or 0.0),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            norm_eps=hf_cfg.rms_norm_eps,
        )
    if kind == "gpt2":
        if hf_cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 activation {hf_cfg.activation_function!r} is not supported; only tanh GELU")
        if getattr(hf_cfg, "add_cross_attention", False):
            raise ValueError("GPT-2 with add_cross_attention (an encoder-decoder's decoder) is not supported")
        if hf_cfg.scale_attn_by_inverse_layer_idx or not hf_cfg.scale_attn_weights:
            raise ValueError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
        if not hf_cfg.resid_pdrop == hf_cfg.embd_pdrop == hf_cfg.attn_pdrop:
            warnings.warn(f"GPT-2 resid_pdrop={hf_cfg.resid_pdrop}, embd_pdrop={hf_cfg.embd_pdrop}, attn_pdrop="
                          f"{hf_cfg.attn_pdrop}: our model has one dropout rate and takes resid_pdrop for all three "
                          "(eval-mode logits are unaffected)", stacklevel=2)
        return GPTConfig(
            vocab_size=hf_cfg.vocab_size,
            block_size=hf_cfg.n_positions,
            n_layer=hf_cfg.n_layer,
            n_head=hf_cfg.n_head,
            n_embd=hf_cfg.n_embd,
            intermediate_size=hf_cfg.n_inner or 4 * hf_cfg.n_embd,
            norm="layernorm",
            position="learned",
            mlp="gelu",
            tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", True)),
            bias=True,
            dropout=float(hf_cfg.resid_pdrop),
            norm_eps=hf_cfg.layer_norm_epsilon,
        )
    raise ValueError(f"model_type {kind!r} is not supported: from_hf reads Llama and GPT-2 checkpoints")


def from_hf(hf_model: PreTrainedModel | str | Path) -> GPT:
    """Our GPT with the weights of an HF LlamaForCausalLM or GPT2LMHeadModel (e.g. to continue pretraining); a
    directory is loaded with AutoModelForCausalLM first."""
    if isinstance(hf_model, (str, Path)):
        from transformers import AutoModelForCausalLM

        if not Path(hf_model).is_dir():
            raise FileNotFoundError(f"{hf_model} is not a directory (from_hf reads a local HF model directory, or "
                                    "a model already loaded with AutoModelForCausalLM)")
        if (Path(hf_model) / CONFIG_FILE).is_file() and not (Path(hf_model) / "config.json").is_file():
            raise ValueError(f"{hf_model} is an align checkpoint, not an HF directory: load it with "
                             "align.model.hf.load_checkpoint")
        hf_model = AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32)
    config = gpt_config_from_hf(hf_model.config)
    state = hf_model.state_dict()
    if getattr(hf_model, "peft_config", None) or any(".base_layer." in k or ".lora_" in k for k in state):
        raise ValueError("the model has LoRA adapters attached; merge them into the weights first "
                         "(PeftModel.from_pretrained(base, ADAPTER_DIR).merge_and_unload()) and pass the merged model")
    expected = LlamaForCausalLM if config.family == "llama" else GPT2LMHeadModel
    if not isinstance(hf_model, expected):
        raise ValueError(f"from_hf needs a {expected.__name__} (the causal LM, with its head), got "
                         f"{type(hf_model).__name__}; load the checkpoint with AutoModelForCausalLM.from_pretrained")
    if any(v.is_meta for v in state.values()):
        raise ValueError("the model's weights are on the meta device (not loaded); load them first, e.g. with "
                         "AutoModelForCausalLM.from_pretrained(DIR)")
    theirs = {k: v.detach().float() for k, v in state.items()}
    if config.tie_embeddings:
        head = theirs.pop("lm_head.weight", None)
        embedding = theirs.get("model.embed_tokens.weight", theirs.get("transformer.wte.weight"))
        if head is not None and embedding is not None and not torch.equal(head, embedding):
            raise ValueError(f"{type(hf_model).__name__}'s config says tie_word_embeddings=True but its lm_head "
                             "differs from the input embeddings; set config.tie_word_embeddings=False (or tie them) "
                             "first")
    used = set()

    def take(name: str) -> torch.Tensor:
        if name not in theirs:
            raise ValueError(f"{type(hf_model).__name__} has no weight {name!r}, which a {config.family} model of this "
                             "config has; the checkpoint is incomplete or not a plain causal LM")
        used.add(name)
        return theirs[name]

    ours, c = {}, config
    if c.family == "llama":
        ours["wte.weight"] = take("model.embed_tokens.weight")
        for i in range(c.n_layer):
            src, dst = f"model.layers.{i}.", f"blocks.{i}."
            for kind in ("weight", "bias") if c.bias else ("weight",):
                a = src + "self_attn."
                ours[dst + f"attn.qkv.{kind}"] = torch.cat(
                    [take(a + f"q_proj.{kind}"), take(a + f"k_proj.{kind}"), take(a + f"v_proj.{kind}")]
                )
                ours[dst + f"attn.proj.{kind}"] = take(a + f"o_proj.{kind}")
                m = src + "mlp."
                ours[dst + f"mlp.fc.{kind}"] = torch.cat([take(m + f"gate_proj.{kind}"), take(m + f"up_proj.{kind}")])
                ours[dst + f"mlp.proj.{kind}"] = take(m + f"down_proj.{kind}")
            ours[dst + "norm_1.weight"] = take(src + "input_layernorm.weight")
            ours[dst + "norm_2.weight"] = take(src + "post_attention_layernorm.weight")
        ours["norm_f.weight"] = take("model.norm.weight")
    else:
        ours["wte.weight"] = take("transformer.wte.weight")
        ours["wpe.weight"] = take("transformer.wpe.weight")
        for i in range(c.n_layer):
            src, dst = f"transformer.h.{i}.", f"blocks.{i}."
            for ours_name, theirs_name in (
                ("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                ("mlp.proj", "mlp.c_proj"),
            ):
                ours[dst + ours_name + ".weight"] = take(src + theirs_name + ".weight").t().contiguous()
                ours[dst + ours_name + ".bias"] = take(src + theirs_name + ".bias")
            for ours_name, theirs_name in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
                ours[dst + ours_name + ".weight"] = take(src + theirs_name + ".weight")
                ours[dst + ours_name + ".bias"] = take(src + theirs_name + ".bias")
        ours["norm_f.weight"] = take("transformer.ln_f.weight")
        ours["norm_f.bias"] = take("transformer.ln_f.bias")
    ours["lm_head.weight"] = ours["wte.weight"] if c.tie_embeddings else take("lm_head.weight")
    unused = sorted(set(theirs) - used)
    if unused:  # weights our model has no place for: importing without them would be another model
        raise ValueError(f"{type(hf_model).__name__} has {len(unused)} weights our GPT cannot hold (e.g. "
                         f"{', '.join(unused[:3])}): a part of the architecture from_hf does not support")
    model = GPT(config)
    model.load_state_dict(ours, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Our own checkpoint (GPTConfig + safetensors) and the exported HF directory


def save_checkpoint(model: GPT, ckpt_dir: str | Path) -> None:
    """Write gpt_config.json and model.safetensors (tied weights stored once)."""
    ckpt_dir, model = Path(ckpt_dir), unwrap(model)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    model.config.save(ckpt_dir / CONFIG_FILE)
    save_model(model, str(ckpt_dir / WEIGHTS_FILE))


def load_checkpoint(ckpt_dir: str | Path, map_location: str = "cpu") -> GPT:
    """A GPT from a directory holding gpt_config.json and model.safetensors (a pretraining checkpoint)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():  # a mistyped step: name the ones there are
        there = sorted(p.name for p in ckpt_dir.parent.glob("step-*")) if ckpt_dir.parent.is_dir() else []
        raise FileNotFoundError(f"{ckpt_dir}: no such checkpoint directory"
                                + (f" ({ckpt_dir.parent} holds {', '.join(there[-5:])})" if there else ""))
    if (ckpt_dir / "config.json").is_file():
        raise ValueError(f"{ckpt_dir} is a Hugging Face directory (an export), not a pretraining checkpoint: load it "
                         "with AutoModelForCausalLM.from_pretrained or from_hf, or export runs/NAME/checkpoints/step-N")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (ckpt_dir / name).is_file():
            raise FileNotFoundError(
                f"{ckpt_dir / name} not found: a checkpoint directory from `align pretrain` holds {CONFIG_FILE} "
                f"and {WEIGHTS_FILE} (e.g. runs/NAME/checkpoints/step-000300)"
            )
    model = GPT(GPTConfig.load(ckpt_dir / CONFIG_FILE)).to(map_location)
    try:
        load_model(model, str(ckpt_dir / WEIGHTS_FILE), strict=True, device=map_location)
    except (SafetensorError, RuntimeError, OSError) as e:  # a corrupt file; size or key mismatches
        reason = " ".join(str(e).split())[:300]
        if "Cannot allocate memory" in reason or "out of memory" in reason.lower():  # not the file's fault
            raise MemoryError(f"not enough memory to load {ckpt_dir / WEIGHTS_FILE} (the file may be fine): "
                              f"{reason}") from e
        raise ValueError(
            f"{ckpt_dir / WEIGHTS_FILE} does not hold the weights {ckpt_dir / CONFIG_FILE} describes (corrupt, or "
            f"from another model): {reason}"
        ) from e
    return model.eval()


def _model_card(model: GPT, tokenizer, hf_class: str) -> str:
    c = model.config
    tokens = f"{len(tokenizer)} tokens, eos `{tokenizer.eos_token}`, pad `{tokenizer.pad_token}`"
    return f"""---
library_name: transformers
tags: [align, from-scratch]
---
# {hf_class} exported by align

A GPT-style model written from scratch in PyTorch (`align.model.GPT`) and pretrained with `align pretrain`, stored as
a standard `{hf_class}` with the same weights: logits match the original to float rounding.

| field | value |
|---|---|
| parameters | {sum(p.numel() for p in model.parameters()):,} ({model.num_params():,} non-embedding) |
| layers / heads / kv heads / width | {c.n_layer} / {c.n_head} / {c.n_kv_head} / {c.n_embd} |
| norm / positions / MLP | {c.norm} / {c.position} / {c.mlp} |
| context length | {c.block_size} |
| vocabulary | {c.vocab_size} (tokenizer: {tokens}) |

```python
from transformers import pipeline
generate = pipeline("text-generation", model="PATH/TO/THIS/DIR")
print(generate([{{"role": "user", "content": "What is 2 + 3?"}}])[0]["generated_text"])
```
"""


def _set_model_max_length(tokenizer_dir: Path, block_size: int) -> None:
    """Record the model's context in the saved tokenizer, so that `truncation=True` cuts at block_size (a tokenizer
    trained on its own says 'unlimited'); the caller's tokenizer object is left as it was."""
    path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["model_max_length"] = block_size
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _remove_leftovers(out_dir: Path) -> None:
    """Remove what an export killed part-way left beside out_dir (.NAME.tmp-PID, .NAME.old-PID: a full copy of the
    weights each), unless the process that wrote it is still running."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(tmp|old)-(\d+)")
    for leftover in out_dir.parent.iterdir():
        match = pattern.fullmatch(leftover.name)
        if match is None or _process_running(int(match.group(2))):
            continue
        if leftover.is_symlink():
            leftover.unlink()
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def replace_dir_atomically(tmp_dir: Path, out_dir: Path) -> None:
    """Move a finished tmp_dir to out_dir; an existing out_dir is only removed once the new one is in place."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp_dir, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_exportable(model: GPT, tokenizer: PreTrainedTokenizerBase) -> None:
    """The ValueError export would raise for this model and tokenizer, before anything is written or moved aside."""
    model = unwrap(model)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError("the tokenizer needs a pad token distinct from eos (PPO masks padding by pad_token_id)")
    if id_limit(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has token ids up to {id_limit(tokenizer) - 1} but the model's vocab_size is "
            f"{model.config.vocab_size}"
        )
    if model.config.family is None:
        hf_config(model.config)  # raises, saying why no transformers class expresses the config


def export(
    model: GPT,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write an HF checkpoint directory: safetensors, config.json (with pad/eos/bos ids), tokenizer files with
    chat template, generation_config.json and a model card. Written to a temporary name, then renamed."""
    out_dir, model = Path(out_dir), unwrap(model)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another directory or overwrite it "
                              "(`align export --overwrite` moves it aside first)")
    check_exportable(model, tokenizer)
    hf_model = to_hf(model)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(hf_model.config, key, getattr(tokenizer, key))
    hf_model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=max(1, min(128, model.config.block_size // 2)),
        do_sample=False,
    )
    requested, out_dir = out_dir, out_dir.resolve()  # a symlinked directory: its target is replaced, the link kept
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # ours from before a restart that reused the process id
    try:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _set_model_max_length(tmp, model.config.block_size)
        model.config.save(tmp / CONFIG_FILE)
        (tmp / "README.md").write_text(_model_card(model, tokenizer, type(hf_model).__name__))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        replace_dir_atomically(tmp, out_dir)
    except BaseException:  # a full disk or Ctrl-C: no half-written temporary directory left taking the space
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return requested

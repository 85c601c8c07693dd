"""`align prepare-data`: corpus -> cleaning -> tokenizer -> token shards, cached in a data directory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from align.data.corpus import (
    EMBEDDED,
    Cleaner,
    DataError,
    capped,
    check_sources,
    is_validation,
    iter_source,
    source_fingerprint,
)
from align.data.shards import (
    META_FILE,
    SPLITS,
    TOKENIZER_DIR,
    ShardWriter,
    TokenShards,
    default_num_proc,
    encode_documents,
    load_data_tokenizer,
    read_meta,
    token_dtype,
)
from align.runs import sigterm_unwinds, write_json

FORMAT_VERSION = 4  # 2: val.jsonl (the validation documents as text, for held-out perplexity in `align eval`);
# 3: special-token strings inside documents are encoded as text; C1 controls, U+2028/9 and soft hyphens cleaned;
# 4: NFC after removing zero-width and control characters; the tokenizer hash covers normalizer, pre-tokenizer, eos
VAL_DOCUMENTS = "val.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json",
                   # a tokenizer saved without tokenizer.json (GPT-2's vocab + merges, a SentencePiece model)
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model")
# Fields that do not change what is built, so they are left out of the cache key.
NOT_IN_KEY = ("data_name", "data_dir", "num_proc")


@dataclass
class DataConfig:
    data_name: str = field(default="corpus", metadata={"help": "name of the prepared data (its cache directory)"})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "tokenizer + shards cache (default: $ALIGN_HOME/data/NAME-KEY or runs/data/NAME-KEY)"},
    )
    sources: list[str] = field(
        default_factory=lambda: ["shakespeare", "arithmetic"],
        metadata={"help": f"embedded {sorted(EMBEDDED)}, local files/dirs/globs (.txt .md .py .jsonl .json .parquet, "
                          "optionally .gz) or hf:NAME[:CONFIG] (streamed)"},
    )
    text_field: str = field(default="text", metadata={"help": "the text field of .jsonl/.json/.parquet/hf rows"})
    hf_split: str = field(default="train", metadata={"help": "split of hf: sources"})
    max_chars_per_source: int | None = field(
        default=None,
        metadata={"help": "take about this many characters from each text source, in whole documents (streamed hf: "
                          "sources need a cap)"},
    )
    chunk_chars: int = field(
        default=4000,
        metadata={"help": "cut .txt/.md files longer than this at blank lines into documents of about this size, so "
                          "that one large file can be split into train and validation (0: one document per file)"},
    )
    arithmetic_documents: int = field(default=45_000, metadata={"help": "documents the `arithmetic` source generates"})
    encoding_errors: str = field(
        default="strict", metadata={"help": "non-UTF-8 bytes in local files: strict (error) or replace"}
    )
    min_chars: int = field(default=20, metadata={"help": "drop documents shorter than this after cleaning"})
    quality_filter: bool = field(
        default=True, metadata={"help": "drop mostly-symbol documents and documents of one line repeated"}
    )
    val_fraction: float = field(default=0.05, metadata={"help": "fraction of documents held out for validation"})
    tokenizer: str | None = field(
        default=None, metadata={"help": "tokenizer directory or hub name; unset, a BPE is trained on the corpus"}
    )
    vocab_size: int = field(default=2048, metadata={"help": "vocabulary of the BPE trained when no tokenizer is given"})
    tokenizer_train_chars: int = field(
        default=20_000_000, metadata={"help": "characters of the training split the BPE is trained on"}
    )
    shard_tokens: int = field(default=100_000_000, metadata={"help": "tokens per shard file"})
    num_proc: int = field(default=0, metadata={"help": "tokenizer processes (0: cores - 1, at most 8)"})

    def __post_init__(self):
        if isinstance(self.sources, str):
            self.sources = [self.sources]
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.encoding_errors not in ("strict", "replace"):
            raise DataError(f"encoding_errors must be 'strict' or 'replace', got {self.encoding_errors!r}")
        if self.max_chars_per_source is not None and self.max_chars_per_source <= 0:
            raise DataError(f"max_chars_per_source must be positive (or unset for no cap), got "
                            f"{self.max_chars_per_source}")
        if self.shard_tokens <= 0:
            raise DataError(f"shard_tokens must be positive, got {self.shard_tokens}")
        if self.tokenizer_train_chars <= 0:  # 0 would train the BPE on the first document alone
            raise DataError(f"tokenizer_train_chars must be positive, got {self.tokenizer_train_chars}")
        for name in ("arithmetic_documents", "min_chars", "chunk_chars"):
            if getattr(self, name) < 0:
                raise DataError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_proc < 0:
            raise DataError(f"num_proc must be >= 0 (0: cores - 1, at most 8), got {self.num_proc}")
        if not isinstance(self.data_name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.data_name):
            raise DataError(f"data_name must be a plain name (letters, digits, '.', '_', '-'), got {self.data_name!r}; "
                            "it names the cache directory, so set data_dir to put the data elsewhere")


def cache_key(cfg: DataConfig) -> tuple[str, dict]:
    """A short hash of everything that determines the prepared data, and the dict it hashes."""
    spec = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_KEY}
    spec["fingerprints"] = [source_fingerprint(s) for s in cfg.sources]
    spec["format"] = FORMAT_VERSION
    if cfg.tokenizer and Path(cfg.tokenizer).expanduser().is_dir():
        # The files, not where they live: continuing from several exports of one run reuses one set of shards.
        # All of them: two tokenizers may share tokenizer.json and differ in eos or chat template (a base model
        # and its instruct variant), which the data directory's copy of the tokenizer would otherwise mix up.
        files = hashlib.sha256()
        for name in TOKENIZER_FILES:
            path = Path(cfg.tokenizer, name).expanduser()
            if path.is_file():
                files.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
        spec["tokenizer"] = "sha256:" + files.hexdigest()
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return digest, spec


def resolve_data_dir(cfg: DataConfig, key: str) -> Path:
    if cfg.data_dir:
        return Path(cfg.data_dir)
    root = Path(os.environ["ALIGN_HOME"]) / "data" if os.environ.get("ALIGN_HOME") else Path("runs") / "data"
    return root / f"{cfg.data_name}-{key}"


def cached_data_dir(cfg: DataConfig) -> Path | None:
    """The data directory when it is already prepared for exactly this config, else None (error on a conflict)."""
    key, spec = cache_key(cfg)
    data_dir = resolve_data_dir(cfg, key)
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"data_dir {data_dir} is a file; give a directory (or leave data_dir unset)")
    meta_path = data_dir / META_FILE
    if not meta_path.is_file():
        if data_dir.is_dir() and any(data_dir.iterdir()):
            raise DataError(
                f"data_dir {data_dir} exists but holds no {META_FILE}; it is not prepared data. Choose another "
                "data_dir (or delete this one if it is an old, unfinished preparation)"
            )
        return None
    meta = read_meta(data_dir)
    if meta.get("cache_key") != key:
        old = meta.get("spec", {})
        changed = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        if old.get("format") != FORMAT_VERSION:  # the key's other parts may have changed with the format
            raise DataError(f"data_dir {data_dir} was prepared by another version of align (data format "
                            f"{old.get('format')}, now {FORMAT_VERSION}); delete it to prepare it again, or choose "
                            "another data_dir")
        if "fingerprints" in changed:  # say which files: "fingerprints" alone does not tell a user what changed
            before, now = ({tuple(f) for s in fps for f in s if isinstance(f, list)}
                           for fps in (old.get("fingerprints") or [], spec["fingerprints"]))
            files = sorted({str(f[0]) for f in before ^ now})
            changed[changed.index("fingerprints")] = (
                f"source files added, removed or edited ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''})"
                if files else "the embedded corpora's versions")
        raise DataError(
            f"data_dir {data_dir} was prepared from a different data config (differs in: {', '.join(changed)}); "
            "leave data_dir unset to get a directory per config, choose another data_dir, or delete this one"
        )
    for split in SPLITS:  # every shard there, at its full size, and the tokenizer that made them loads
        TokenShards(data_dir, split)
    load_data_tokenizer(data_dir)
    return data_dir


def documents(cfg: DataConfig, cleaner: Cleaner) -> Iterator[tuple[str, bytes]]:
    for spec in cfg.sources:
        raw = iter_source(spec, cfg.text_field, cfg.hf_split, cfg.encoding_errors, cfg.arithmetic_documents,
                          cfg.chunk_chars)
        # The arithmetic source is sized by arithmetic_documents, not by the character cap.
        yield from cleaner(capped(raw, None if spec == "arithmetic" else cfg.max_chars_per_source))


def _empty_corpus(cfg: DataConfig, cleaner: Cleaner) -> DataError:
    return DataError(
        f"no documents left after cleaning sources {cfg.sources}: {cleaner.summary()}. Check the sources and "
        f"`text_field` ({cfg.text_field!r}), or lower `min_chars` ({cfg.min_chars}) / set `quality_filter: false`"
    )


def adapt_tokenizer(tokenizer):
    """A given tokenizer, with the pad token (distinct from eos), role tokens and chat template the stages need."""
    from align.tokenizer import add_chat_tokens

    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"tokenizer {tokenizer.name_or_path} is not a fast tokenizer: align needs tokenizer.json")
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path} has no eos token; documents are separated by eos")
    add_chat_tokens(tokenizer)
    return tokenizer


def build_tokenizer(cfg: DataConfig, log):
    from align.tokenizer import train_tokenizer

    if cfg.tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        except Exception as e:
            raise DataError(f"could not load tokenizer {cfg.tokenizer!r}: {e}") from e
        return adapt_tokenizer(tokenizer)
    cleaner = Cleaner(cfg.min_chars, cfg.quality_filter)

    def sample():
        total = 0
        for text, digest in documents(cfg, cleaner):
            if not is_validation(digest, cfg.val_fraction):  # the tokenizer never sees validation text
                yield text
                total += len(text)
                if total >= cfg.tokenizer_train_chars:
                    return

    texts = list(sample())
    if not texts and cleaner.counts["documents_kept"]:
        raise DataError(
            f"the train split is empty: all {cleaner.counts['documents_kept']} documents left after cleaning fell "
            f"in the validation split (val_fraction {cfg.val_fraction}). A document-level split needs more "
            f"documents: cut the text into more files or .jsonl rows, lower chunk_chars ({cfg.chunk_chars}; it cuts "
            ".txt/.md files), or lower val_fraction"
        )
    if not texts:
        raise _empty_corpus(cfg, cleaner)
    t0 = time.time()
    try:
        tokenizer = train_tokenizer(texts, cfg.vocab_size)
    except ValueError as e:  # a vocab_size too small for the bytes and special tokens
        raise DataError(str(e)) from e
    chars = sum(map(len, texts))
    short = f" (vocab_size {cfg.vocab_size}: the text has no more merges)" if len(tokenizer) < cfg.vocab_size else ""
    log(f"[data] trained a {len(tokenizer)}-token BPE{short} on {chars:,} characters in {time.time() - t0:.1f}s")
    return tokenizer


def prepare_data(cfg: DataConfig, log=print) -> Path:
    """Build (or find in the cache) the tokenizer and token shards for `cfg`; returns the data directory."""
    check_sources(cfg.sources)
    cached = cached_data_dir(cfg)
    if cached is not None:
        log(f"[data] reusing prepared data in {cached}")
        return cached
    key, spec = cache_key(cfg)
    data_dir = resolve_data_dir(cfg, key)
    log(f"[data] preparing {cfg.sources} -> {data_dir}")
    # A fresh name even across nodes sharing the cache (identical containers reuse process ids).
    tmp = data_dir.with_name(f".{data_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise DataError(f"cannot write the prepared data under {data_dir.parent} ({e.strerror or e}); set ALIGN_HOME "
                        "(or data_dir) to a writable directory") from None
    try:
        with sigterm_unwinds():
            _prepare_into(tmp, data_dir, cfg, key, spec, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data_dir


def _prepare_into(tmp: Path, data_dir: Path, cfg: DataConfig, key: str, spec: dict, log) -> None:
    """Tokenizer, shards and meta.json written into `tmp`, then renamed to `data_dir` (which is then complete)."""
    from tqdm.auto import tqdm

    from align.tokenizer import id_limit, tokenizer_hash

    tokenizer = build_tokenizer(cfg, log)
    tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
    vocab_size = id_limit(tokenizer)  # the largest id + 1 decides the dtype: ids must not wrap around
    dtype = token_dtype(vocab_size)
    writers = {split: ShardWriter(tmp, split, dtype, cfg.shard_tokens) for split in SPLITS}
    cleaner = Cleaner(cfg.min_chars, cfg.quality_filter)
    routes = []  # the split of each document, in the order encode_documents returns them

    val_documents = (tmp / VAL_DOCUMENTS).open("w")

    def texts():
        for text, digest in documents(cfg, cleaner):
            route = "val" if is_validation(digest, cfg.val_fraction) else "train"
            routes.append(route)
            if route == "val":
                val_documents.write(json.dumps({"text": text}) + "\n")
            yield text

    num_proc = cfg.num_proc or default_num_proc()
    tokenizer_file = str(tmp / TOKENIZER_DIR / "tokenizer.json")
    encoded = encode_documents(texts(), tokenizer_file, tokenizer.eos_token_id, num_proc)
    t0 = time.time()
    for i, ids in enumerate(tqdm(encoded, desc="tokenizing", unit="doc", disable=None)):
        writers[routes[i]].add(ids)
    splits = {split: w.close() for split, w in writers.items()}
    val_documents.close()
    if cleaner.counts["documents_kept"] == 0:
        raise _empty_corpus(cfg, cleaner)
    for split in SPLITS:
        if splits[split]["documents"] == 0:
            raise DataError(
                f"the {split} split is empty: {cleaner.counts['documents_kept']} documents after cleaning, "
                f"val_fraction {cfg.val_fraction}. A document-level split needs more documents: cut the text into "
                f"more files or .jsonl rows, lower chunk_chars ({cfg.chunk_chars}; it cuts .txt/.md files), or change "
                "val_fraction"
            )
    meta = {
        "format": FORMAT_VERSION,
        "cache_key": key,
        "spec": spec,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "vocab_size": vocab_size,
        "eos_token_id": tokenizer.eos_token_id,
        "dtype": dtype.__name__,
        "splits": splits,
        "cleaning": dict(cleaner.counts),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json(tmp / META_FILE, meta)
    log(f"[data] {cleaner.summary()}")
    log(
        f"[data] train {splits['train']['tokens']:,} tokens ({splits['train']['documents']:,} docs), val "
        f"{splits['val']['tokens']:,} tokens ({splits['val']['documents']:,} docs), {dtype.__name__}, "
        f"tokenized in {time.time() - t0:.1f}s"
    )
    try:
        os.replace(tmp, data_dir)  # atomic: a data_dir with meta.json is always complete
    except OSError:
        if cached_data_dir(cfg) is None:  # another process (node) finished the same data first: use theirs
            raise

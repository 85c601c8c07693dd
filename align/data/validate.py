"""Dataset checks for the alignment stages: columns, roles, empty or truncated-away completions, dropped-row counts."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
FORMATS = {
    "sft": "'messages' (a list of {role, content}) or 'prompt' + 'completion'",
    "preference": "'prompt' + 'chosen' + 'rejected' (or chosen/rejected conversations sharing the prompt)",
    "prompt": "'prompt'",
}
HINT = "see docs/stages.md (section 'Bring your own data') for the formats"


class DataError(ValueError):
    """A dataset a stage cannot train on; the message names the file, line or column and what to do."""


@dataclass
class Record:
    where: str  # "path:line" or "name[split] row i": where a person finds this row
    row: dict | None
    error: str | None = None  # set when the row could not be read at all (e.g. invalid JSON)


@dataclass
class DataReport:
    """What validation kept and dropped, with the reason for each dropped row; saved as data_report.json."""

    source: str
    kind: str
    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_length: int | None = None
    truncated: int = 0  # kept rows longer than max_length, which the trainer truncates
    truncated_example: str = ""

    def drop(self, where: str, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{where}: {detail}")

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def as_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, "total": self.total, "kept": self.kept,
                "dropped": dict(self.dropped), "examples": self.examples, "truncated": self.truncated}

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.dropped.most_common())
        lines = [f"{self.source}: kept {self.kept} of {self.total} rows, dropped {self.n_dropped}"
                 + (f" ({reasons})" if reasons else "")]
        lines += [f"  {e}" for e in self.examples[:10]]
        if self.truncated:
            lines.append(f"  {self.truncated} kept row(s) are longer than max_length={self.max_length} and are "
                         "truncated: the end of the answer (in a conversation, every later turn) is not trained "
                         f"on; raise max_length to keep them whole. First: {self.truncated_example}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Reading


def read_records(path: str | Path) -> list[Record]:
    """Rows of a local .jsonl / .json / .parquet file, each with the line (or row) it came from."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    if path.suffix == ".jsonl":
        records = []
        with path.open(encoding="utf-8-sig") as f:  # -sig: a byte order mark (Windows editors) is not row 1's text
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    records.append(Record(where, None, f"invalid JSON ({e.msg} at column {e.colno})"))
                    continue
                if isinstance(row, dict):
                    records.append(Record(where, row))
                else:
                    records.append(Record(where, None, f"a line must be a JSON object, got {type(row).__name__}"))
        return records
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from e
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]}
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of row objects (or use .jsonl)")
        return [Record(f"{path} row {i}", row) if isinstance(row, dict)
                else Record(f"{path} row {i}", None, "a row must be an object") for i, row in enumerate(data)]
    if path.suffix == ".parquet":
        from datasets import Dataset

        return [Record(f"{path} row {i}", row) for i, row in enumerate(Dataset.from_parquet(str(path)).to_list())]
    raise DataError(f"{path}: unsupported data file type {path.suffix!r}; use one of {', '.join(DATA_SUFFIXES)}")


def dataset_records(dataset, name: str) -> list[Record]:
    """Rows of an in-memory `datasets.Dataset` (e.g. from the hub), named by row index."""
    return [Record(f"{name} row {i}", row) for i, row in enumerate(dataset.to_list())]


# ----------------------------------------------------------------------------------------------------------------
# Checking


def _message_problem(messages, column: str) -> tuple[str, str] | None:
    """(reason, detail) when `messages` is not a list of {role, content} with known roles and string content."""
    if not isinstance(messages, list) or not messages:
        return "bad_messages", f"'{column}' must be a non-empty list of {{\"role\", \"content\"}} messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return "bad_messages", f"{column}[{i}] must be an object with 'role' and 'content'"
        if m["role"] not in ROLES:
            return "wrong_role", f"{column}[{i}].role is {m['role']!r}; roles are {', '.join(ROLES)}"
        if not isinstance(m["content"], str):
            return "bad_messages", f"{column}[{i}].content must be a string, got {type(m['content']).__name__}"
    return None


def _turns_problem(value, column: str, conversational: bool, *, last_role: str | None = None,
                   only_role: str | None = None) -> tuple[str, str] | None:
    """Checks one column holding either messages (conversational) or a plain string."""
    if conversational:
        if not isinstance(value, list):
            return "mixed_format", f"'{column}' is a {type(value).__name__} but other rows hold message lists"
        problem = _message_problem(value, column)
        if problem:
            return problem
        if only_role and any(m["role"] != only_role for m in value):
            bad = next(i for i, m in enumerate(value) if m["role"] != only_role)
            return "wrong_role", f"{column}[{bad}].role is {value[bad]['role']!r}; {column} turns must be {only_role!r}"
        if last_role and value[-1]["role"] != last_role:
            return "wrong_role", (f"{column} ends with a {value[-1]['role']!r} turn; it must end with a "
                                  f"{last_role!r} turn")
        if only_role == "assistant" and not "".join(m["content"] for m in value).strip():
            return "empty_completion", f"'{column}' is empty: nothing to learn from"
        return None
    if not isinstance(value, str):
        return "mixed_format", f"'{column}' is a {type(value).__name__} but other rows hold plain strings"
    if only_role == "assistant" and not value.strip():
        return "empty_completion", f"'{column}' is empty: nothing to learn from"
    return None


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt as the model sees it before the completion (chat template + generation prompt)."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def full_tokens(tokenizer, prompt, completion) -> int:
    """Length of prompt + completion as the trainer tokenizes the pair (chat template, or text + eos)."""
    if isinstance(prompt, list):
        return len(tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"])
    return len(tokenizer(prompt + completion)["input_ids"]) + 1  # + eos, which TRL appends


def validate(records: list[Record], kind: str, source: str, *, extra_columns: tuple[str, ...] = (),
             tokenizer=None, max_length: int | None = None, long_rows: str = "truncate",
             max_prompt_length: int | None = None) -> tuple[list[dict], DataReport]:
    """Check every row of a dataset for a stage and return the usable rows (needed columns only) and a report.

    kind: "sft" (messages, or prompt + completion), "preference" (prompt + chosen + rejected) or "prompt" (PPO/GRPO
    prompts; `extra_columns` such as "answer" are required too). Missing columns raise DataError; a bad row is
    dropped with its reason. With a tokenizer, rows whose completion would be cut away entirely by `max_length`
    (long_rows="truncate": SFT, DPO) or that exceed it (long_rows="drop": the reward trainer filters those) are
    dropped too, and prompts longer than `max_prompt_length`."""
    if kind not in FORMATS:
        raise ValueError(f"unknown data kind {kind!r}; one of {', '.join(FORMATS)}")
    report = DataReport(source=source, kind=kind, total=len(records), max_length=max_length)
    if kind == "preference":
        records = [Record(r.where, explicit_prompt(r.row), r.error) if r.row is not None else r for r in records]
    if not records:
        raise DataError(f"{source}: the dataset is empty; a {kind} dataset needs {FORMATS[kind]} rows ({HINT})")
    columns = set().union(*(r.row.keys() for r in records if r.row is not None))

    # The format (which columns, conversational or plain strings) comes from the dataset as a whole.
    if kind == "sft":
        rows = [r.row for r in records if r.row is not None]
        n_messages = sum("messages" in row for row in rows)
        n_pairs = sum("prompt" in row and "completion" in row for row in rows)
        if n_messages or n_pairs:  # the format most rows use; rows in the other one are dropped
            needed = ["messages"] if n_messages >= n_pairs else ["prompt", "completion"]
        else:
            plain = (" Plain text is pretraining data: `align pretrain --init_from MODEL --sources FILE` continues "
                     "a model's pretraining on it.") if any(isinstance(v, str) for row in rows for v in row.values()) \
                else ""
            raise DataError(f"{source}: no 'messages' column and no 'prompt' + 'completion' columns (found: "
                            f"{', '.join(sorted(columns)) or 'none'}); SFT reads {FORMATS['sft']} ({HINT}).{plain}")
    elif kind == "preference":
        needed = ["prompt", "chosen", "rejected"]
    else:
        needed = ["prompt"]
    needed += list(extra_columns)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(repr(c) for c in missing)} (found: "
                        f"{', '.join(sorted(columns)) or 'none'}); a {kind} dataset needs {FORMATS[kind]}"
                        f"{' and ' + ', '.join(repr(c) for c in extra_columns) if extra_columns else ''} ({HINT})")
    first = next((r.row for r in records if r.row is not None and needed[0] in r.row), {})
    conversational = isinstance(first.get(needed[0]), list)

    kept = []
    for record in records:
        if record.row is None:
            report.drop(record.where, "unreadable", record.error or "unreadable row")
            continue
        row = record.row
        absent = [c for c in needed if c not in row or row[c] is None]
        if absent:
            report.drop(record.where, "missing_column", f"missing {', '.join(repr(c) for c in absent)}")
            continue
        problem = _row_problem(row, kind, conversational)
        if problem is None and tokenizer is not None:
            problem = _length_problem(row, kind, tokenizer, max_length, long_rows, max_prompt_length)
        if problem:
            report.drop(record.where, *problem)
            continue
        if tokenizer is not None and max_length is not None and long_rows == "truncate" and kind != "prompt":
            n_tokens = _full_length(row, kind, tokenizer)
            if n_tokens > max_length:
                report.truncated += 1
                report.truncated_example = report.truncated_example or f"{record.where} ({n_tokens} tokens)"
        kept.append({c: row[c] for c in needed})
    report.kept = len(kept)
    return kept, report


def explicit_prompt(row: dict) -> dict:
    """A preference row with its prompt split out of chosen/rejected when they carry it ("implicit prompt", as in
    UltraFeedback: chosen = [user, assistant]); TRL's own extraction, applied before the checks."""
    from trl.data_utils import maybe_extract_prompt

    chosen, rejected = row.get("chosen"), row.get("rejected")
    conversational = all(isinstance(v, list) and v and all(isinstance(m, dict) for m in v) for v in (chosen, rejected))
    if not conversational or (isinstance(row.get("prompt"), list)):
        return row
    extracted = maybe_extract_prompt({"chosen": chosen, "rejected": rejected})
    if not extracted["prompt"] and "prompt" in row:  # no shared turns: the row's own (string) prompt stays
        return row
    return {**row, **extracted}


def _row_problem(row: dict, kind: str, conversational: bool) -> tuple[str, str] | None:
    if kind == "sft" and "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list):
            return "bad_messages", "'messages' must be a list of {\"role\", \"content\"} messages"
        problem = _message_problem(messages, "messages")
        if problem:
            return problem
        if messages[-1]["role"] != "assistant":
            return "wrong_role", (f"messages ends with a {messages[-1]['role']!r} turn; the last turn must be "
                                  "'assistant'")
        if not any(m["role"] == "user" for m in messages):
            return "wrong_role", "messages has no 'user' turn"
        if not messages[-1]["content"].strip():
            return "empty_completion", "the last assistant turn is empty: nothing to learn from"
        return None
    problem = _turns_problem(row["prompt"], "prompt", conversational, last_role="user")
    if problem:
        return problem
    if kind == "prompt":
        return None
    for column in ("completion",) if kind == "sft" else ("chosen", "rejected"):
        problem = _turns_problem(row[column], column, conversational, only_role="assistant")
        if problem:
            return problem
    if kind == "preference" and row["chosen"] == row["rejected"]:
        return "identical_pair", "chosen and rejected are identical: the pair carries no preference"
    return None


def _full_length(row, kind, tokenizer) -> int:
    """Tokens of the whole row as the trainer tokenizes it (the longer side of a preference pair)."""
    if "messages" in row:
        return len(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"])
    completions = [row["completion"]] if kind == "sft" else [row["chosen"], row["rejected"]]
    return max(full_tokens(tokenizer, row["prompt"], c) for c in completions)


def _length_problem(row, kind, tokenizer, max_length, long_rows, max_prompt_length) -> tuple[str, str] | None:
    if kind == "sft" and "messages" in row:
        first_reply = next(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
        prompt, completions = row["messages"][:first_reply], [row["messages"][first_reply:]]
    elif kind == "prompt":
        prompt, completions = row["prompt"], []
    else:
        prompt = row["prompt"]
        completions = [row["completion"]] if kind == "sft" else [row["chosen"], row["rejected"]]
    n_prompt = len(prompt_ids(tokenizer, prompt)) if prompt else 0
    if max_prompt_length is not None and n_prompt > max_prompt_length:
        return "too_long", (f"the prompt is {n_prompt} tokens, more than max_prompt_length={max_prompt_length}; "
                            "raise max_prompt_length or shorten the prompt")
    if max_length is None or not completions:
        return None
    if long_rows == "truncate" and n_prompt >= max_length:
        return "truncated_to_nothing", (f"the prompt alone is {n_prompt} tokens, max_length={max_length}: the "
                                        "completion would be truncated away; raise max_length or shorten the prompt")
    if long_rows == "drop":
        n_full = max(full_tokens(tokenizer, prompt, c) for c in completions)
        if n_full > max_length:
            return "too_long", (f"prompt + answer is {n_full} tokens, more than max_length={max_length} (the trainer "
                                "would silently skip it); raise max_length or shorten the row")
    return None


def enforce(report: DataReport, max_dropped_fraction: float) -> None:
    """Print what was dropped; raise DataError when nothing is left or more than the allowed fraction was dropped."""
    if report.n_dropped or report.truncated:
        print(f"[align] {report.summary()}")
    if report.kept == 0:
        raise DataError(f"{report.summary()}\nno usable rows left; fix the rows above ({HINT})")
    fraction = report.n_dropped / max(report.total, 1)
    if fraction > max_dropped_fraction:
        raise DataError(
            f"{report.summary()}\n{fraction:.1%} of the rows were dropped, more than max_dropped_fraction="
            f"{max_dropped_fraction}; fix the rows above or pass --max_dropped_fraction {fraction:.2f} to accept this"
        )

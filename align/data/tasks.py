"""Synthetic verifiable tasks: GSM8K-format arithmetic word problems for the CPU demo chain.

A problem is a short word problem over small operands (1-10) with a worked answer ending in "#### N", the
format of GSM8K, so the same answer check scores the demo task and the real benchmark. The problem space is
split by a hash of the question text: about one question in ten belongs to the held-out partition, which no
training split (pretraining text, SFT, preference pairs, PPO/GRPO prompts) ever draws from.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

NAMES = [
    "Tom", "Anna", "Ben", "Maria", "Sam", "Lucy", "Omar", "Mia", "Leo", "Zoe", "Ravi", "Emma", "Jack", "Nina",
    "Paul", "Sara", "Ivan", "Chloe", "Ali", "Grace",
]
OBJECTS = [
    "apples", "pencils", "books", "marbles", "coins", "stickers", "cookies", "shells", "cards", "stamps",
    "flowers", "balloons", "candles", "buttons", "eggs", "rocks", "toys", "cups", "ribbons", "beads",
]
# (operation, template): {n} a name, {o} an object, {a} and {b} the operands in the order they are written.
TEMPLATES = [
    ("+", "{n} has {a} {o} and gets {b} more. How many {o} does {n} have now?"),
    ("+", "{n} found {a} {o} in the morning and {b} {o} in the afternoon. How many {o} did {n} find in all?"),
    ("+", "There are {a} {o} on a table and {n} puts {b} more on it. How many {o} are on the table?"),
    ("-", "{n} has {a} {o} and gives away {b}. How many {o} does {n} have left?"),
    ("-", "A box holds {a} {o}. {n} takes {b} of them out. How many {o} are still in the box?"),
    ("-", "{n} had {a} {o} and lost {b}. How many {o} does {n} have now?"),
    ("*", "{n} has {a} bags with {b} {o} in each bag. How many {o} does {n} have?"),
    ("*", "There are {a} rows of {o} with {b} {o} in each row. How many {o} are there?"),
]
MAX_OPERAND = 10
HELDOUT_BUCKETS = 10  # one question text in ten is held out

ANSWER_RE = re.compile(r"#### *(-?[0-9.,]+)")


@dataclass(frozen=True)
class Problem:
    name: str
    obj: str
    template: int
    a: int
    b: int

    @property
    def op(self) -> str:
        return TEMPLATES[self.template][0]

    @property
    def question(self) -> str:
        return TEMPLATES[self.template][1].format(n=self.name, o=self.obj, a=self.a, b=self.b)

    @property
    def prompt(self) -> str:
        """What a model is shown: the GSM8K prompt format of lm-eval (also the chat user turn)."""
        return f"Question: {self.question}\nAnswer:"

    @property
    def answer(self) -> int:
        return compute(self.a, self.op, self.b)

    def worked(self, a: int | None = None, op: str | None = None, b: int | None = None, result=None) -> str:
        """The worked answer "a op b = r\\n#### r"; the arguments write a wrong one."""
        a, op, b = self.a if a is None else a, op or self.op, self.b if b is None else b
        result = compute(a, op, b) if result is None else result
        return f"{a} {op} {b} = {result}\n#### {result}"

    @property
    def heldout(self) -> bool:
        return is_heldout(self.question)


def compute(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def is_heldout(question: str) -> bool:
    digest = hashlib.sha256(question.encode()).digest()
    return digest[0] % HELDOUT_BUCKETS == 0


def sample_problem(rng: random.Random) -> Problem:
    template = rng.randrange(len(TEMPLATES))
    a, b = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
    if TEMPLATES[template][0] == "-" and b > a:
        a, b = b, a
    return Problem(rng.choice(NAMES), rng.choice(OBJECTS), template, a, b)


def sample_problems(n: int, rng: random.Random, heldout: bool, exclude: set[str] | None = None) -> list[Problem]:
    """n problems with distinct questions from the held-out or the training partition."""
    seen = set(exclude or ())
    out = []
    while len(out) < n:
        p = sample_problem(rng)
        if p.heldout == heldout and p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def extract_answer(text: str) -> str | None:
    """The number after the last "####" (GSM8K's convention), commas removed; None when there is none."""
    matches = ANSWER_RE.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "").rstrip(".")


def same_number(found: str, expected: str) -> bool:
    """Equal as numbers when both are ("7.0" and "7", "-0" and "0"), else as text."""
    try:
        return Decimal(found) == Decimal(expected)
    except InvalidOperation:
        return found == expected


def is_correct(completion: str, answer: int | float | str) -> bool:
    """Whether the completion's final answer is `answer`: a number ("1,000" and 1000 agree) or a worked solution
    ending in "#### N", as GSM8K's answer column holds them."""
    found, expected = extract_answer(completion), str(answer).strip()
    if "####" in expected:
        expected = extract_answer(expected) or expected
    return found is not None and same_number(found, expected.replace(",", "").rstrip("."))


def wrong_answer(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong worked answer. Most are self-consistent equations over a miscopied operand, the
    mistake a small model makes and a lazy reward model misses; the rest get the arithmetic or operation wrong."""
    kind = rng.random()
    if kind < 0.5:  # miscopied operand, equation consistent with itself
        while True:
            a, b = problem.a, problem.b
            if rng.random() < 0.5:
                a = rng.randint(1, MAX_OPERAND)
            else:
                b = rng.randint(1, MAX_OPERAND)
            if (a, b) != (problem.a, problem.b) and compute(a, problem.op, b) != problem.answer:
                return problem.worked(a=a, b=b)
    if kind < 0.75:  # right operands, wrong result
        delta = rng.choice([-2, -1, 1, 2, 10, -10])
        return problem.worked(result=problem.answer + delta)
    other_ops = [op for op in "+-*" if compute(problem.a, op, problem.b) != problem.answer]
    return problem.worked(op=rng.choice(other_ops))  # wrong operation


def wrong_answers(problem: Problem, rng: random.Random, n: int) -> list[str]:
    """n distinct wrong worked answers (fewer only if the problem has fewer plausible ones)."""
    out = [wrong_answer(problem, rng)]
    for _ in range(20 * (n - 1)):
        if len(out) >= n:
            break
        candidate = wrong_answer(problem, rng)
        if candidate not in out:
            out.append(candidate)
    return out


def pretraining_documents(n: int, seed: int) -> list[str]:
    """n short documents of arithmetic text for the pretraining corpus: worked word problems in the
    "Question: ... Answer: ..." format and bare equations. Held-out questions never appear."""
    rng = random.Random(seed)
    docs = []
    for problem in sample_problems(n, rng, heldout=False):
        if rng.random() < 0.6:
            docs.append(f"{problem.prompt} {problem.worked()}")
        else:
            lines = []
            for _ in range(rng.randint(4, 12)):
                a, b, op = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND), rng.choice("+-*")
                if op == "-" and b > a:
                    a, b = b, a
                lines.append(f"{a} {op} {b} = {compute(a, op, b)}")
            docs.append("\n".join(lines))
    return docs


def demo_splits(seed: int, n_sft: int, n_preference: int, n_prompts: int, n_heldout: int,
                n_rejected: int = 1) -> dict[str, list[dict]]:
    """The demo's datasets in the formats TRL reads, with disjoint question texts between splits.

    sft: conversational prompt/completion; preferences: prompt/chosen/rejected, `n_rejected` pairs per question with
    distinct wrong answers; prompts: prompt + answer (for PPO and GRPO); heldout: GSM8K's schema (question, answer
    ending in "#### N") for evaluation only."""
    rng = random.Random(seed)
    train = sample_problems(n_sft + n_preference + n_prompts, rng, heldout=False)
    sft, pref, prompts = train[:n_sft], train[n_sft : n_sft + n_preference], train[n_sft + n_preference :]
    heldout = sample_problems(n_heldout, rng, heldout=True)

    def user(p: Problem):
        return [{"role": "user", "content": p.prompt}]

    def assistant(text: str):
        return [{"role": "assistant", "content": text}]

    return {
        "sft": [{"prompt": user(p), "completion": assistant(p.worked())} for p in sft],
        "preferences": [
            {"prompt": user(p), "chosen": assistant(p.worked()), "rejected": assistant(wrong)}
            for p in pref
            for wrong in wrong_answers(p, rng, n_rejected)
        ],
        "prompts": [{"prompt": user(p), "answer": str(p.answer)} for p in prompts],
        "heldout": [{"question": p.question, "answer": p.worked()} for p in heldout],
    }


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path


def write_demo_data(out_dir: str | Path, seed: int = 0, n_sft: int = 6000, n_preference: int = 4000,
                    n_prompts: int = 2000, n_heldout: int = 400, n_rejected: int = 1) -> dict[str, Path]:
    """Write sft.jsonl, preferences.jsonl, prompts.jsonl and heldout.jsonl into out_dir; returns their paths."""
    splits = demo_splits(seed, n_sft, n_preference, n_prompts, n_heldout, n_rejected)
    return {name: write_jsonl(Path(out_dir) / f"{name}.jsonl", rows) for name, rows in splits.items()}

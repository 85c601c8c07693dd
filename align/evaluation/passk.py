"""pass@k for code tasks: the unbiased estimator and the metric lm-eval calls, running programs in the sandbox."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from align.evaluation.sandbox import Limits, run_program

# Set by `align eval` from its options; lm-eval calls the metric with the YAML's arguments only.
LIMITS = Limits()


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    # The product form avoids huge binomials: C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i).
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def check_programs(programs: list[str], test: str, limits: Limits | None = None) -> list[bool]:
    """Whether each program, followed by the test code, runs to its end in the sandbox."""
    limits = limits or LIMITS
    sources = [f"{program}\n\n{test}\n" for program in programs]
    workers = max(1, min(len(sources), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        return [r.passed for r in pool.map(lambda s: run_program(s, limits), sources)]


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int | None = None) -> dict:
    """The metric as lm-eval calls HF `code_eval`: one test per problem, a list of candidate programs per problem;
    returns {"pass@k": mean over problems}."""
    if k is None:
        raise ValueError("pass_at_k needs k (e.g. `k: [1]` in the task YAML)")
    ks = [k] if isinstance(k, int) else list(k)
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} tests for {len(predictions)} lists of predictions")
    scores = {f"pass@{j}": [] for j in ks}
    for test, programs in zip(references, predictions):
        passed = check_programs(list(programs), test)
        for j in ks:
            if j <= len(passed):
                scores[f"pass@{j}"].append(estimate_pass_at_k(len(passed), sum(passed), j))
    return {name: float(np.mean(values)) for name, values in scores.items() if values}


def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval's HumanEval filter: each completion appended to its prompt is the program to test."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]

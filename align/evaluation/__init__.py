"""Evaluation: lm-eval runner, offline benchmark pack, sandboxed code execution and pass@k, reports."""

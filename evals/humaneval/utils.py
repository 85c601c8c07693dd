"""HumanEval metric and filter for lm-eval: align's sandboxed pass@k (lm-eval's own needs the hub)."""

from align.evaluation.passk import build_predictions, pass_at_k

__all__ = ["build_predictions", "pass_at_k"]

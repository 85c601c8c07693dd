"""align: a from-scratch GPT, pretraining, TRL alignment stages and lm-eval reports."""

__version__ = "0.1.0"

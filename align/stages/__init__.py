"""Alignment stages: SFT, reward model, PPO, DPO and GRPO, each a TRL trainer built from a recipe."""

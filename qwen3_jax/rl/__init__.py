"""Reinforcement learning: the GRPO objective and the policy-gradient train step."""

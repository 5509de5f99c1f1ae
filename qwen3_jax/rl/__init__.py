"""Reinforcement learning: the GRPO objective (grpo.py, config.py), the policy-gradient step
(step.py, batch.py), and the RL loop of stages 2 and 4 (loop.py over rollout.py, rewards.py,
run_config.py)."""

"""Inference: the generation engine and what it calls each decode step (sampling)."""

"""Inference: the generation engine and streaming detokenization."""

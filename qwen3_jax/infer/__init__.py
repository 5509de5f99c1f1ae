"""Inference: tool registry and executor, example tools."""

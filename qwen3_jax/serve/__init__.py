"""Serving: the OpenAI-compatible HTTP app, its request parsing and responses, the engine
thread (continuous batching) and metrics."""

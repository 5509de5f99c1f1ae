"""Held-out evaluation of chat models on the task families, and bootstrap comparisons.

`heldout.evaluate(engine, EvalConfig(...))` -> the eval dict (`scripts/evaluate.py` writes it
as eval.json); `heldout.compare(a, b, key)` -> paired bootstrap interval of the difference;
`bootstrap` holds the interval arithmetic, `report` the table and the budget plot,
`sampler.EngineSampler` the batched engine calls (also rejection sampling's sampler).
"""

"""The layer period: the repeating structure of the decoder's layer stack.

Each layer has a kind: (attention kind, MoE or dense MLP). The stack is built from a
`LayerGroup` of `period` consecutive layers, the smallest period of that per-layer structure,
repeated `repeats = L // period` times with a leading parameter axis (`stack.py`): one compiled
group, not L copies. Layer i lives at `layers.sub_{i % period}` in repeat `i // period`, and
so do its KV cache (`kv_cache.init_cache`) and its Hugging Face weights (`hf.py`). A structure
with no period (e.g. irregular `mlp_only_layers`) has period = L and one repeat.

Only the config is read here, so every model module (the stack, the cache, the model, HF
conversion) can use these helpers without importing one another.
"""

from __future__ import annotations

from qwen3_jax.config import ModelConfig


def layer_kinds(cfg: ModelConfig) -> list[tuple[str, bool]]:
  """(attention kind, is MoE) of each of the L layers."""
  return [
    (cfg.attention.kind_of_layer(i), cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers)
  ]


def layer_period(cfg: ModelConfig) -> int:
  """Smallest p dividing L with kinds[i] == kinds[i % p] for all layers."""
  kinds = layer_kinds(cfg)
  n = len(kinds)
  for p in range(1, n + 1):
    if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)):
      return p
  return n


def moe_layer_indices(cfg: ModelConfig) -> list[int]:
  """Model layer index of each row of the stacked [num_moe_layers, E] aux statistics."""
  p = layer_period(cfg)
  subs = [j for j in range(p) if cfg.is_moe_layer(j)]
  return [r * p + j for r in range(cfg.num_hidden_layers // p) for j in subs]

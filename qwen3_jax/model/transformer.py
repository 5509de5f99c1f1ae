"""The Qwen3 / Qwen3-MoE causal LM: embeddings, global tokens, the layer stack, the LM head.

`Qwen3.__call__` lays out the chunk's documents and global tokens (`global_tokens.py`), runs
the stacked decoder layers (`stack.py`, structure in `period.py`) with the KV cache when one
is given (`kv_cache.py`), and returns `ModelOutput`: logits (or final hidden states) and the
MoE layers' auxiliary losses and router statistics collected over the stack.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3_jax.config import ModelConfig
from qwen3_jax.model import kv_cache, lora, quant
from qwen3_jax.model.global_tokens import chunk_layout, global_every, insert_globals
from qwen3_jax.model.kv_cache import KVCache
from qwen3_jax.model.layers import Embed, RMSNorm, linear, param, vocab_param, weight
from qwen3_jax.model.moe import aux_losses
from qwen3_jax.model.stack import run_stack, stacked_groups
from qwen3_jax.sharding import constrain

# Scalars averaged over MoE layers, in `ModelOutput.aux`.
AUX_SCALARS = (
  "load_balance_loss",
  "router_z_loss",
  "dynamic_loss",
  "dropped_fraction",
  "expert_rows_ratio",
  "experts_per_token",
)
# Per-expert statistics stacked over MoE layers: [num_moe_layers, E].
AUX_PER_EXPERT = ("expert_fraction", "expert_prob", "tokens_per_expert")


@dataclasses.dataclass
class ModelOutput:
  """logits [B, L, V]; aux: scalar losses/stats and [num_moe_layers, E] router statistics;
  cache: the updated `KVCache` when one was passed in, else None; hidden: [B, L, D] final
  (normed) hidden states instead of logits (which are then None) when called with
  `return_hidden=True`, for losses that apply the head themselves (`Qwen3.head_weight`)."""

  logits: jax.Array | None
  aux: dict[str, jax.Array]
  cache: KVCache | None = None
  hidden: jax.Array | None = None


jax.tree_util.register_dataclass(
  ModelOutput, data_fields=["logits", "aux", "cache", "hidden"], meta_fields=[]
)


class Qwen3(nnx.Module):
  """Qwen3 / Qwen3-MoE causal LM."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed_tokens = Embed(cfg, rngs=rngs)
    self.layers = stacked_groups(cfg, rngs=rngs)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = vocab_param(
        rngs, cfg, (cfg.hidden_size, cfg.padded_vocab_size), ("embed", "vocab"), vocab_dim=1
      )
    if global_every(cfg):  # Learnable global token (sparse attention), [1, D].
      self.global_embedding = param(rngs, (1, cfg.hidden_size), (None, "embed"), cfg.param_dtype)
    if cfg.quant is not None:  # int8 / int4 projections (`quant.py`)
      quant.convert(self, cfg.quant)
    if cfg.lora is not None:  # low-rank adapters, B = 0: the base model's function (`lora.py`)
      lora.add_adapters(self, cfg.lora, rngs)

  def __call__(
    self,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: KVCache | None = None,
    num_tokens: jax.Array | None = None,
    return_hidden: bool = False,
  ) -> ModelOutput:
    """tokens [B, L] int -> ModelOutput(logits [B, L, V] float32, aux, cache).

    positions default to each token's document offset: 0..L-1, restarting at each new
    segment when `segment_ids` are given, continuing the cached document with a cache.
    segment_ids: [B, L] ints, tokens attend only within their segment, 0 = padding; a
    document is a run of one nonzero id (see `global_tokens.py`).
    cache: a `KVCache` from `kv_cache.init_cache`: row r's tokens occupy slots
    cache.length[r] .. cache.length[r] + L - 1, attend to everything the row cached before
    them, and the returned `ModelOutput.cache` holds them too (prefill: the prompt from an
    empty cache; decode: one token per call). Chunks may start and end anywhere: cached
    decoding in any chunking equals one full forward pass.
    num_tokens: [B] ints, with a cache: row r carries only its first num_tokens[r] tokens
    (0 = the row sits this chunk out); the rest of its chunk is ignored: not written to the
    cache, not counted in its length, logits undefined. Rows of one batch can so prefill
    prompts of different lengths, or decode while others prefill. None: all L.
    return_hidden: give `hidden` [B, L, D] (after the final norm, compute dtype) and no
    logits; `linear(hidden, self.head_weight())[..., :V]` are the logits (before the float32
    cast; the head has Vp = `cfg.padded_vocab_size` columns).
    When some layer is sparse, learnable global tokens are inserted into each document and
    their outputs dropped (`global_tokens.py`), so a document's logits do not depend on where
    it sits in a packed row. Global slots per row are bounded by `attention.max_docs_per_row`
    (1 document per row without segment_ids); a row holding more documents raises (at run
    time under jit).
    """
    cfg = self.cfg
    tokens = constrain(tokens, ("batch", "seq"))
    b, l = tokens.shape
    if num_tokens is not None and cache is None:
      raise ValueError("num_tokens needs a KV cache (it says which tokens the cache takes)")
    if cache is not None:
      kv_cache.check_room(cfg, cache, l if num_tokens is None else num_tokens)
    seg = jnp.ones((b, l), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    layout = chunk_layout(
      cfg, seg, one_document=segment_ids is None, cache=cache, num_tokens=num_tokens
    )
    seg = jnp.where(jnp.arange(l)[None, :] < layout.num_tokens[:, None], seg, 0)
    if positions is None:
      positions = layout.offset
    real_seg = seg  # [B, L]
    x = self.embed_tokens(tokens)  # [B, L, D]
    if layout.num_globals:  # -> [B, L + Ng, ...]
      x, positions, seg = insert_globals(x, self.global_embedding[...], positions, seg, layout)
    x, (auxes, layers) = run_stack(
      self.layers, cfg, x, positions, seg, layout, None if cache is None else cache.layers
    )
    if cache is not None:
      cache = kv_cache.advance(cache, layers, layout, real_seg, layout.num_tokens)
    x = self.norm(x[:, :l])
    if return_hidden:
      x = constrain(x, ("batch", "seq", None))
      return ModelOutput(logits=None, aux=self._collect_aux(auxes), cache=cache, hidden=x)
    logits = linear(x, self.head_weight())  # [B, L, Vp]
    logits = constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))
    if cfg.padded_vocab_size > cfg.vocab_size:  # padded ids are never real: drop them
      logits = constrain(logits[..., : cfg.vocab_size], ("batch", "seq", "vocab"))  # [B, L, V]
    return ModelOutput(logits=logits, aux=self._collect_aux(auxes), cache=cache)

  def head_weight(self) -> jax.Array:
    """The LM head as a [D, Vp] matrix in the compute dtype (embedding.T when tied); columns
    from `cfg.vocab_size` on are vocab padding, to be masked (`fused_ce`) or sliced off."""
    if self.cfg.tie_word_embeddings:
      return self.embed_tokens.embedding[...].astype(self.embed_tokens.dtype).T
    return weight(self, "lm_head", jnp.dtype(self.cfg.dtype))

  def _collect_aux(self, auxes) -> dict[str, jax.Array]:
    """`run_stack`'s MoE auxes -> `ModelOutput.aux`: AUX_SCALARS averaged over the MoE layers,
    AUX_PER_EXPERT stacked [num_moe_layers, E] in layer order, and the weighted aux_loss."""
    cfg = self.cfg
    if not auxes:
      zero = jnp.zeros((), jnp.float32)
      out = {k: zero for k in AUX_SCALARS}
      out["aux_loss"] = zero
      return out
    # auxes[j][key]: [R, ...] for sub-layer j -> order layers as r * period + j.
    stack = {k: jnp.stack([a[k] for a in auxes], axis=1) for k in auxes[0]}  # [R, P_moe, ...]
    stack = {k: v.reshape((-1,) + v.shape[2:]) for k, v in stack.items()}  # [n_moe, ...]
    out = {k: jnp.mean(stack[k]) for k in AUX_SCALARS}
    out.update({k: stack[k] for k in AUX_PER_EXPERT})
    out.update(aux_losses(out, cfg))  # the weighted `aux_loss` (and the same terms)
    return out

"""The generation engine against independent references: an uncached greedy loop, the model's
own log-probs of a completion, `transformers` `generate()`, and its own runs alone vs batched
vs sharded (sampling must not depend on the batch slot, the other rows or the mesh)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3_jax import config as C
from qwen3_jax import sharding
from qwen3_jax.data import chat
from qwen3_jax.data.tokenizer import train_tokenizer
from qwen3_jax.infer.engine import EARLY_STOP, Engine, Request
from qwen3_jax.infer.sampling import SamplingParams
from qwen3_jax.model.transformer import Qwen3

TEXTS = [
  "The quick brown fox jumps over the lazy dog. " * 3,
  "Grüße aus Köln: naïve café, 日本語のテキスト, emoji 🙂🚀 and more text here.",
  "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
  "Reasoning: 12 * 7 = 84, then 84 + 5 = 89. The answer is 89.",
]
VOCAB = 320
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tok():
  return train_tokenizer(TEXTS * 4, VOCAB)


def _cfg():
  attention = C.AttentionConfig(
    pattern=("sparse", "full"), window=6, global_every=4, max_globals=2, block_size=4
  )
  return C.tiny(vocab_size=VOCAB, attention=attention)


@pytest.fixture(scope="module")
def model():
  return Qwen3(_cfg(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(C.MeshConfig(data=2, expert=4))


def _prompts(tok, lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(10, VOCAB - 1, n).tolist() for n in lengths]


def _reference_greedy(model, prompts, n):
  """Greedy continuations and their log-probs without a KV cache: every step one forward pass
  over a fixed [R, T] buffer (padding after each row's tokens is segment 0)."""
  graphdef, state = nnx.split(model)
  lens = np.asarray([len(p) for p in prompts])
  total = int(lens.max()) + n
  buf = np.zeros((len(prompts), total), np.int32)
  for r, p in enumerate(prompts):
    buf[r, : len(p)] = p

  @jax.jit
  def logits_at(state, buf, t):
    seg = (jnp.arange(total)[None, :] < t[:, None]).astype(jnp.int32)
    logits = nnx.merge(graphdef, state)(buf, segment_ids=seg).logits
    return jnp.take_along_axis(logits, (t - 1)[:, None, None], axis=1)[:, 0]

  toks, lps, t = [], [], lens.copy()
  for _ in range(n):
    lg = np.asarray(logits_at(state, jnp.asarray(buf), jnp.asarray(t)))
    nxt = lg.argmax(-1)
    lps.append(np.take_along_axis(jax.nn.log_softmax(lg), nxt[:, None], 1)[:, 0])
    toks.append(nxt)
    buf[np.arange(len(prompts)), t] = nxt
    t += 1
  return np.stack(toks, 1), np.stack(lps, 1)


def _recomputed_logprobs(model, prompt, completion, temperature):
  """log softmax(logits / T) of each completion token under one forward pass of the model."""
  seq = jnp.asarray([list(prompt) + list(completion)])
  logits = np.asarray(nnx.jit(lambda m, s: m(s).logits)(model, seq))[0]
  t = temperature if temperature > 0 else 1.0
  lp = jax.nn.log_softmax(logits[len(prompt) - 1 : -1] / t)
  return np.take_along_axis(np.asarray(lp), np.asarray(completion)[:, None], 1)[:, 0]


@pytest.mark.parametrize("on_mesh", [False, True])
def test_greedy_equals_uncached_reference_with_continuous_batching(tok, model, mesh, on_mesh):
  """Five prompts of 3, 11, 1, 7 and 20 tokens through 2 rows (8 on the mesh: padded to the
  data axes): rows are refilled as others finish; 5 steps per call, so rows end mid-call;
  prefill in 8-token chunks. Tokens and log-probs equal an uncached greedy loop."""
  prompts = _prompts(tok, [3, 11, 1, 7, 20])
  want, want_lp = _reference_greedy(model, prompts, 12)
  m = mesh if on_mesh else None
  run = model
  if on_mesh:
    run = sharding.create_sharded(lambda: Qwen3(_cfg(), rngs=nnx.Rngs(0)), m)
  eng = Engine(run, tok, mesh=m, prefill_chunk=8, steps_per_call=5)
  eng.eos_ids = ()  # compare all 12 tokens, whatever they are
  reqs = [Request(p, sampling=GREEDY, max_new_tokens=12) for p in prompts]
  out = eng.generate(reqs, batch_size=2)
  for r, [c] in enumerate(out):
    assert c.finish_reason == "length"
    np.testing.assert_array_equal(c.token_ids, want[r])
    np.testing.assert_allclose(c.logprobs, want_lp[r], atol=2e-5)
    assert c.text == tok.decode(c.token_ids, skip_special_tokens=False)


SAMPLED = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=7)


def test_sampled_request_is_the_same_alone_in_a_batch_and_on_a_mesh(tok, model, mesh):
  """A sampled request (n=2) alone, then queued 6th behind 7 requests with other settings in
  a batch of 8, then on a data x expert mesh: the same tokens each time (randomness from
  seed, sample index and token index only); its two samples differ. Its log-probs equal the
  model's log softmax(logits / T) of the completion, recomputed in one forward pass."""
  prompts = _prompts(tok, [9, 4, 13, 2, 6, 9, 3, 8], seed=1)
  target = Request(prompts[0], sampling=SAMPLED, max_new_tokens=10, n=2)
  others = [
    Request(p, sampling=SamplingParams(temperature=t, top_p=0.5, seed=i), max_new_tokens=7)
    for i, (p, t) in enumerate(zip(prompts[1:], [0.0, 1.3, 0.7, 0.0, 2.0, 0.5, 1.0], strict=True))
  ]
  eng = Engine(model, tok, steps_per_call=4)
  eng.eos_ids = ()
  alone = eng.generate([target])[0]
  batched = eng.generate(others[:5] + [target] + others[5:], batch_size=8)[5]
  sharded_model = sharding.create_sharded(lambda: Qwen3(_cfg(), rngs=nnx.Rngs(0)), mesh)
  eng_mesh = Engine(sharded_model, tok, mesh=mesh, steps_per_call=3)
  eng_mesh.eos_ids = ()
  on_mesh = eng_mesh.generate([others[2], target])[1]
  for j in range(2):
    assert alone[j].token_ids == batched[j].token_ids == on_mesh[j].token_ids
    want = _recomputed_logprobs(model, prompts[0], alone[j].token_ids, 0.8)
    np.testing.assert_allclose(alone[j].logprobs, want, atol=2e-5)
  assert alone[0].token_ids != alone[1].token_ids


def test_streaming_deltas_concatenate_to_the_text(tok, model):
  """Stream of two sampled rows over a vocabulary with multi-byte characters split into byte
  tokens: the deltas of a row concatenate to its completion's text, which equals the
  tokenizer's decode of its tokens (without a final EOS id); the reasoning / content deltas
  join to `chat.parse` of the text."""
  eng = Engine(model, tok, steps_per_call=3)
  reqs = [
    Request("Grüße aus Köln", sampling=SamplingParams(temperature=1.5, seed=s), max_new_tokens=40)
    for s in range(2)
  ]
  text, toks, split = {0: "", 1: ""}, {0: [], 1: []}, {0: ["", ""], 1: ["", ""]}
  finished = {}
  for ev in eng.stream(reqs):
    text[ev.request_id] += ev.text
    toks[ev.request_id] += ev.token_ids
    split[ev.request_id][0] += ev.reasoning
    split[ev.request_id][1] += ev.content
    if ev.finish_reason:
      finished[ev.request_id] = ev.finish_reason
  out = eng.generate(reqs)
  assert set(finished) == {0, 1} and set(finished.values()) <= {"stop", "length"}
  for i in range(2):
    c = out[i][0]
    assert toks[i] == c.token_ids and text[i] == c.text
    ids = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
    assert c.text == tok.decode(ids, skip_special_tokens=False)
    parsed = chat.parse(c.text)
    assert split[i] == [parsed.reasoning, parsed.content]
  multibyte = [
    t for t in range(VOCAB) if len(tok.decode([t]).encode()) and "\ufffd" in tok.decode([t])
  ]
  assert multibyte, "the vocabulary should hold byte tokens that split characters"


def test_stop_strings_eos_and_length(tok, model):
  """A stop string cuts the text before it and the tokens after the one that completed it;
  EOS ends a row with `stop` (kept in the tokens, not the text); a prompt near max_len ends
  with `length` before its cache would overflow."""
  eng = Engine(model, tok, steps_per_call=4)
  eng.eos_ids = ()
  free = eng.generate([Request("The quick", sampling=GREEDY, max_new_tokens=24)])[0][0]
  stop = free.text[6:9]
  cut = eng.generate([Request("The quick", sampling=GREEDY, max_new_tokens=24, stop=(stop,))])
  c = cut[0][0]
  assert c.finish_reason == "stop" and c.text == free.text[: free.text.index(stop)]
  assert c.token_ids == free.token_ids[: len(c.token_ids)]
  assert stop in tok.decode(c.token_ids) and stop not in tok.decode(c.token_ids[:-1])
  # EOS: make the 5th greedy token of `free` an end-of-turn id for this engine.
  eng.eos_ids = (free.token_ids[4],)
  first = free.token_ids.index(free.token_ids[4])
  c = Engine.generate(eng, [Request("The quick", sampling=GREEDY, max_new_tokens=24)])[0][0]
  assert c.finish_reason == "stop" and c.token_ids == free.token_ids[: first + 1]
  assert c.text == tok.decode(free.token_ids[:first])
  # Length: 30 prompt tokens in a max_len-32 session leave room for 3 tokens.
  eng.eos_ids = ()
  s = eng.session(batch_size=1, max_len=32)
  s.submit(Request(_prompts(tok, [30])[0], sampling=GREEDY, max_new_tokens=100, id="x"))
  while not s.idle:
    s.step()
  assert s.results[("x", 0)].finish_reason == "length"
  assert len(s.results[("x", 0)].token_ids) == 3


def test_thinking_budget_and_budget_zero(tok, model):
  """A prompt that opens a think block, budget 5: 5 sampled tokens, then the early-stop text
  (forced, flagged), then the answer. Budget 0 on a chat prompt equals rendering it with
  enable_thinking=False (same tokens under sampling)."""
  eng = Engine(model, tok, steps_per_call=4)
  eng.eos_ids = ()
  think = tok.token_to_id("<think>")
  early = tok.encode(EARLY_STOP).ids
  prompt = _prompts(tok, [6])[0] + [think] + tok.encode("\n").ids
  n = 5 + len(early) + 6
  req = Request(prompt, sampling=SAMPLED, max_new_tokens=n, thinking_budget=5)
  c = eng.generate([req])[0][0]
  end = tok.token_to_id("</think>")
  if end in c.token_ids[:5]:  # the model closed the block itself: nothing to force
    pytest.fail("pick another prompt: the random model closed its think block early")
  assert c.token_ids[5 : 5 + len(early)] == early
  assert c.forced == [False] * 5 + [True] * len(early) + [False] * 6
  assert EARLY_STOP in c.text
  # Streamed, the reply splits at the forced `</think>` into reasoning and answer deltas.
  events = list(eng.stream([req]))
  reasoning, content = "".join(e.reasoning for e in events), "".join(e.content for e in events)
  parsed = chat.parse("<think>" + c.text)
  assert (reasoning, content) == (parsed.reasoning, parsed.content) and reasoning and content
  msgs = [{"role": "user", "content": "What is 12 * 7?"}]
  on = chat.render(msgs, add_generation_prompt=True)
  off = chat.render(msgs, add_generation_prompt=True, enable_thinking=False)
  a = eng.generate([Request(on, sampling=SAMPLED, max_new_tokens=12, thinking_budget=0)])[0][0]
  b = eng.generate([Request(off, sampling=SAMPLED, max_new_tokens=12)])[0][0]
  assert a.token_ids == b.token_ids and a.prompt_ids == b.prompt_ids


def test_one_compilation_per_bucket(tok, model):
  """Three different batches of one (batch, max_len) bucket run on one compilation each of
  the admit, prefill and decode programs."""
  eng = Engine(model, tok, prefill_chunk=16, steps_per_call=4)
  sizes = [[f._cache_size() for f in eng.programs]]  # programs are shared per model structure
  for seed in range(3):
    prompts = _prompts(tok, [5 + seed, 9 - seed, 3], seed=seed)
    reqs = [
      Request(p, sampling=SamplingParams(temperature=seed * 0.5, seed=seed), max_new_tokens=6)
      for p in prompts
    ]
    eng.generate(reqs, batch_size=4, max_len=64)
    sizes.append([f._cache_size() for f in eng.programs])
  assert sizes[1] == sizes[2] == sizes[3], sizes
  assert sizes[1][2] - sizes[0][2] == 1  # the decode loop: one program for the bucket


def test_greedy_equals_transformers_generate(tok, tmp_path):
  """A tiny random HF Qwen3-MoE (float32) loaded with `hf.from_pretrained` and default
  settings: greedy tokens of 3 prompts of different lengths, 32 new tokens, batched in one
  session, equal `transformers` `generate()` (its KV cache, one prompt at a time)."""
  import torch
  import transformers

  from qwen3_jax import hf

  torch.manual_seed(0)
  hf_cfg = transformers.Qwen3MoeConfig(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=56,
    moe_intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    num_experts=8,
    num_experts_per_tok=2,
    initializer_range=0.1,
    tie_word_embeddings=False,
    attn_implementation="eager",
  )
  theirs = transformers.Qwen3MoeForCausalLM(hf_cfg).eval()
  theirs.save_pretrained(tmp_path)
  ours, _ = hf.from_pretrained(str(tmp_path))
  prompts = _prompts(tok, [4, 17, 9], seed=3)
  eng = Engine(ours, tok, prefill_chunk=8)
  eng.eos_ids = ()
  got = eng.generate([Request(p, sampling=GREEDY, max_new_tokens=32) for p in prompts])
  for p, [c] in zip(prompts, got, strict=True):
    with torch.no_grad():
      want = theirs.generate(
        torch.tensor([p]),
        attention_mask=torch.ones(1, len(p), dtype=torch.long),
        do_sample=False,
        max_new_tokens=32,
        min_new_tokens=32,
        eos_token_id=None,
        pad_token_id=0,
      )[0, len(p) :].tolist()
    assert c.token_ids == want


def test_padded_vocab_ids_are_never_generated(tok):
  """Vocab 130 is stored padded to 256: with every real logit 0 and padding columns that
  would win, greedy and sampled rows only ever emit real ids (greedy: id 0)."""
  cfg = C.tiny(num_experts=0, num_hidden_layers=1, vocab_size=130)
  model = Qwen3(cfg, rngs=nnx.Rngs(0))
  pad = 100.0 * jax.random.normal(jax.random.key(0), (cfg.hidden_size, 256 - 130))
  model.lm_head[...] = jnp.zeros((cfg.hidden_size, 256)).at[:, 130:].set(pad)
  eng = Engine(model, tok, steps_per_call=4)
  eng.eos_ids = ()
  reqs = [Request([1, 2, 3], sampling=GREEDY, max_new_tokens=3)]
  reqs.append(Request([1, 2], sampling=SamplingParams(temperature=1.0), max_new_tokens=20))
  greedy, sampled = eng.generate(reqs)
  assert greedy[0].token_ids == [0, 0, 0]
  assert max(sampled[0].token_ids) < 130


def test_decode_loop_reads_weights_and_cache_in_place(tok):
  """The compiled decode loop of a full-attention model copies no KV-cache buffer (each step
  writes its token in place: no copy, no re-stacking) and slices no layer's weights out of the
  stacked parameters (the layer groups are unstacked once per version of the weights)."""
  model = Qwen3(C.tiny(vocab_size=VOCAB, num_hidden_layers=4), rngs=nnx.Rngs(0))
  eng = Engine(model, tok)
  sess = eng.session(batch_size=2, max_len=512)
  decode = eng.programs[2]
  graphdef, state = decode.unstacked(nnx.state(model))
  hlo = decode.program.lower(graphdef, state, sess.rows, sess.prog).compile().as_text()
  made = re.findall(r"= f32\[([\d,]+)\]\{[^}]*\} ([\w-]+)\(", hlo)  # (shape, op)
  shape = lambda x: ",".join(map(str, x.shape))  # noqa: E731
  cache = {shape(x) for x in jax.tree.leaves(sess.rows.cache) if x.ndim == 4}
  layer = {shape(x[0]) for x in jax.tree.leaves(nnx.state(model.layers)) if x.ndim >= 3}
  assert len(cache) == 2 and len(layer) == 6  # keys [B, K, Dh, S], values [B, K, S, Dh]
  cache_ops = {op for s, op in made if s in cache}
  assert cache_ops <= {"parameter", "get-tuple-element", "scatter", "fusion"}, cache_ops
  layer_ops = {op for s, op in made if s in layer}
  assert layer_ops <= {"parameter", "get-tuple-element"}, layer_ops

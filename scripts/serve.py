r"""An OpenAI-compatible server (chat, completions, streaming, tools, thinking controls).

  python scripts/serve.py --workdir=runs/pt --port=8000
  python scripts/serve.py --hf_dir=/models/Qwen3-30B-A3B --expert=8 --api_key=$KEY
  curl localhost:8000/v1/chat/completions -d '{"model": "qwen3_jax", "messages": [...]}'

Continuous batching: `--batch_size` rows decode together; a new request takes a free row after
at most `--steps_per_call` decode steps; `--max_queue` rows may wait (429 past it). Binds
127.0.0.1 unless --host says otherwise. See qwen3_jax/serve/ for the request fields.
"""

import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("workdir", None, "Training run directory (its newest checkpoint).")
flags.DEFINE_string("checkpoint", None, "Params checkpoint (save_params / convert_hf.py output).")
flags.DEFINE_string("hf_dir", None, "Hugging Face Qwen3 directory.")
flags.DEFINE_string("model_name", "qwen3_jax", "The model id clients send.")
flags.DEFINE_string("host", "127.0.0.1", "Address to bind.")
flags.DEFINE_integer("port", 8000, "Port (0: any free one, printed).")
flags.DEFINE_string("api_key", None, "Required bearer token (default: env QWEN3_API_KEY, or none).")
flags.DEFINE_integer("batch_size", 32, "Engine rows decoding together.")
flags.DEFINE_integer("max_len", 2048, "KV length per row: prompt + reply tokens.")
flags.DEFINE_integer("max_queue", 256, "Most rows waiting for a free engine row.")
flags.DEFINE_integer("steps_per_call", 4, "Decode steps per engine call.")
flags.DEFINE_integer("prefill_chunk", 128, "Widest prefill call, tokens per row.")
flags.DEFINE_integer(
  "prefill_calls", 4, "Most prefill chunks per engine step (0: whole prompts at once)."
)
flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body.")
flags.DEFINE_bool("top_logprobs", True, "Compute top-20 alternatives per token (top_logprobs).")
for _axis in ("data", "fsdp", "expert", "tensor"):
  flags.DEFINE_integer(_axis, 0, f"Mesh '{_axis}' axis size (all zero: one device, no mesh).")


def main(argv):
  del argv
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from qwen3_jax import config, sharding
  from qwen3_jax.infer import load
  from qwen3_jax.serve.server import Server

  source = dict(workdir=f.workdir, checkpoint=f.checkpoint, hf_dir=f.hf_dir)  # exactly one
  axes = {a: getattr(f, a) for a in ("data", "fsdp", "expert", "tensor") if getattr(f, a)}
  mesh = sharding.make_mesh(config.MeshConfig(**axes)) if axes else None
  model, tokenizer = load.load_model(**source, mesh=mesh)
  server = Server(
    model,
    tokenizer,
    mesh=mesh,
    model_name=f.model_name,
    batch_size=f.batch_size,
    max_len=f.max_len,
    max_queue=f.max_queue,
    steps_per_call=f.steps_per_call,
    prefill_chunk=f.prefill_chunk,
    prefill_calls=f.prefill_calls or None,
    top_logprobs=f.top_logprobs,
    api_key=f.api_key or os.environ.get("QWEN3_API_KEY"),
    max_body_bytes=f.max_body_bytes,
    host=f.host,
    port=f.port,
  )
  print(f"serving {f.model_name} on {server.url}", flush=True)
  server.run()


if __name__ == "__main__":
  from qwen3_jax.runtime import reexec_with_tuned_malloc

  reexec_with_tuned_malloc(by_default=True)  # before JAX starts (docs/cpu_allocator.md)
  app.run(main)

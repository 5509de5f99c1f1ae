"""Rollouts: the prompts of one iteration and G samples of each from the current policy.

`draw_tasks(rollout_cfg, seed, iteration, attempt)` picks the iteration's training tasks
(families and levels from the config, optional `/think` / `/no_think` flags), a pure function
of its arguments, so a resumed run draws the same prompts (no cursor to save: the iteration
number is the whole rollout state). `roll_out(policy, tasks, ...)` samples `group_size`
conversations per task through the tool loop (`infer/tool_loop.run_tool_loops`): one reply
for reasoning and format tasks, up to `max_tool_steps` replies with the task's tools run in
between for tool tasks, each conversation with its own `ToolEnv` (outbox). The resulting
`Transcript` holds the tokens the model saw and produced, the loss mask (off on the prompt,
tool turns and forced text) and the rollout log-probs. Sampling seeds come from (seed,
iteration, attempt, conversation index, reply step), so rollouts are reproducible too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Sequence

from qwen3_jax.data.tasks import Task, ToolEnv, ToolTask, make_split, tools
from qwen3_jax.infer.sampling import SamplingParams
from qwen3_jax.infer.tool_loop import ModelPolicy, Transcript, run_tool_loops
from qwen3_jax.infer.tools import ToolRegistry, ToolResult
from qwen3_jax.rl.run_config import RolloutConfig


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A task as asked: `thinking` says which mode the user turn's flag asks for."""

  task: Task
  thinking: bool
  flag: str  # "" (no flag: thinking mode), " /think" or " /no_think"

  @property
  def messages(self) -> list[dict]:
    return [{"role": "user", "content": self.task.prompt + self.flag}]


@dataclasses.dataclass
class Rollout:
  """One sampled conversation of a prompt (one member of a GRPO group)."""

  prompt: Prompt
  group: int  # the prompt's index in the batch
  transcript: Transcript
  env: ToolEnv | None  # tool tasks: where its calls ran (the verifier reads the outbox)

  @property
  def replies(self) -> list[str]:
    return [s.text for s in self.transcript.steps]

  @property
  def generated(self) -> list[int]:
    """Tokens generated per reply."""
    return [s.end - s.prompt_len for s in self.transcript.steps]

  @property
  def results(self) -> list[ToolResult]:
    return self.transcript.results


def mix_seed(*parts) -> int:
  """A 31-bit seed from any parts (SHA-256: the same on every machine and process)."""
  digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
  return int.from_bytes(digest[:4], "little") >> 1


def draw_tasks(cfg: RolloutConfig, seed: int, iteration: int, attempt: int = 0) -> list[Prompt]:
  """`cfg.prompts_per_step` training prompts of (seed, iteration, attempt): per prompt a
  family and a level uniformly from the config's, a task from the train split, and (with
  `think_flags`) "/no_think" with probability `no_think_frac`, else "/think"."""
  rng = random.Random(mix_seed("prompts", seed, iteration, attempt))
  out = []
  for _ in range(cfg.prompts_per_step):
    family, level = rng.choice(cfg.families), rng.choice(cfg.difficulties)
    [task] = make_split(family, "train", 1, level, seed=rng.randrange(2**31))
    thinking, flag = True, ""
    if cfg.think_flags:
      thinking = rng.random() >= cfg.no_think_frac
      flag = " /think" if thinking else " /no_think"
    out.append(Prompt(task, thinking, flag))
  return out


class _PerConversationTools:
  """A registry front that runs each conversation's calls in that conversation's `ToolEnv`
  (each sample of a group gets a fresh outbox, so its emails are judged alone)."""

  def __init__(self, envs: dict[str, ToolEnv], names: Sequence[str]):
    self.envs, self.names = envs, set(names)

  def __contains__(self, name) -> bool:
    return name in self.names

  def execute(self, name, arguments, *, conversation_id="", parse_error=None, context=None):
    registry = self.envs[conversation_id].registry
    return registry.execute(
      name, arguments, conversation_id=conversation_id, parse_error=parse_error, context=context
    )


def roll_out(
  policy: ModelPolicy,
  prompts: Sequence[Prompt],
  cfg: RolloutConfig,
  *,
  temperature: float,
  seed: int,
) -> list[Rollout]:
  """`cfg.group_size` rollouts per prompt, grouped: rows k * G .. k * G + G - 1 are prompt k's.

  Prompts that share a tool set (none, or a tool family's) run in one `run_tool_loops` call,
  so one policy call per reply step serves all their conversations.
  """
  g = cfg.group_size
  by_tools: dict[tuple, list[int]] = {}
  for k, p in enumerate(prompts):
    names = p.task.tools if isinstance(p.task, ToolTask) else ()
    by_tools.setdefault(tuple(names), []).append(k)
  out: list[Rollout | None] = [None] * (len(prompts) * g)
  for names, ks in by_tools.items():
    rows = [(k, j) for k in ks for j in range(g)]
    ids = [f"{seed}-{k}-{j}" for k, j in rows]
    envs = {cid: prompts[k].task.env() for cid, (k, _) in zip(ids, rows, strict=True) if names}
    registry = _PerConversationTools(envs, names) if names else ToolRegistry([])
    specs = tools(prompts[ks[0]].task) or []
    call_seed = mix_seed(seed, *names)  # conversation indices restart in every call
    sampling = SamplingParams(
      temperature=temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=call_seed
    )
    transcripts = run_tool_loops(
      policy,
      [prompts[k].messages for k, _ in rows],
      registry,
      tools=specs,
      max_steps=cfg.max_tool_steps if names else 1,
      conversation_ids=ids,
      sampling=sampling,
      max_new_tokens=cfg.max_new_tokens,
    )
    for cid, (k, j), tr in zip(ids, rows, transcripts, strict=True):
      out[k * g + j] = Rollout(prompts[k], k, tr, envs.get(cid))
  return out

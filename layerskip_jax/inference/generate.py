"""generate(): prompts in, tokens (and text) out, with per-row and total statistics (interfaces.md)."""

from __future__ import annotations

import dataclasses
import numbers
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerskip_jax.data.tokenizer import Tokenizer
from layerskip_jax.errors import UsageError
from layerskip_jax.inference.cache import cache_length, check_length
from layerskip_jax.inference.decode import STRATEGIES, Drafting, Sampling, decode_loop, prefill
from layerskip_jax.inference.layout import DecodeWeights, decode_weights, wants_unstacked
from layerskip_jax.inference.layout import cpu_decode_model as cpu_decode_model  # re-exported: the public API
from layerskip_jax.inference.layout import uses_unstacked_layers as uses_unstacked_layers  # re-exported
from layerskip_jax.inference.sampling import check_parameters
from layerskip_jax.model import ModelConfig, Transformer

PROMPT_BUCKET = 64  # prompts are padded to a multiple of this: a new prompt length reuses the compiled programs
DEFAULT_ADAPT_THRESHOLD = 0.4  # where adapting starts when no threshold is given (Hugging Face's default)


@dataclasses.dataclass
class GenerateResult:
  tokens: list[list[int]]  # per row: generated ids, prompt excluded, ending at (and including) EOS if generated
  text: list[str] | None  # when a tokenizer is present
  stats: dict[str, Any]  # 'rows': [{drafted, accepted, acceptance_rate, new_tokens}], totals, timings


def _rate(accepted: int, drafted: int) -> float | None:
  return accepted / drafted if drafted else None


def encode_prompts(prompts: Sequence, tokenizer: Tokenizer | None) -> list[list[int]]:
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
    raise UsageError('prompts: expected a non-empty list of strings or of token-id lists')
  rows = []
  for i, prompt in enumerate(prompts):
    if isinstance(prompt, str):
      if tokenizer is None:
        raise UsageError('prompts: text needs a tokenizer, and this checkpoint has none; give token ids')
      rows.append(tokenizer.encode(prompt, add_bos=True))
    else:
      rows.append([int(t) for t in prompt])
    if not rows[-1]:
      raise UsageError(f'prompts[{i}]: empty; give at least one token')
  return rows


def check_request(
  config: ModelConfig,
  *,
  strategy: str,
  exit_layer: int | None,
  num_speculations: int,
  temperature: float,
  top_k: int,
  top_p: float,
  max_speculations: int | None = None,
  confidence_threshold: float = 0.0,
  prefix: str = '',
) -> tuple[int, int]:
  """(exit layer, d_max) of a request, or UsageError naming the one value that is wrong. Needs only the model's
  config: the `generate` command calls it (prefix='--': messages name its flags) before loading the weights.

  d_max, the static d bucket, is the number of drafts the compiled verify block holds (it verifies d_max + 1 rows):
  `max_speculations`, or d itself when None (one program per d; the fastest, since every verified row costs)."""
  num_layers = config.num_hidden_layers
  if strategy not in STRATEGIES:
    raise UsageError(f'{prefix}strategy={strategy!r}: must be one of {", ".join(STRATEGIES)}')
  if strategy == 'autoregressive':
    exit_layer = num_layers if exit_layer is None else exit_layer
  elif exit_layer is None:
    raise UsageError(f'{prefix}exit_layer: required for {prefix}strategy={strategy}')
  high = num_layers - 1 if strategy == 'self_speculative' else num_layers
  if not isinstance(exit_layer, numbers.Integral) or isinstance(exit_layer, bool):
    raise UsageError(f'{prefix}exit_layer={exit_layer!r}: must be an integer in 1..{high}')
  if not 1 <= exit_layer <= high:
    raise UsageError(
      f'{prefix}exit_layer={exit_layer}: must be in 1..{high} for {prefix}strategy={strategy} '
      f'(E counts layers run; the model has {num_layers})'
    )
  if not isinstance(num_speculations, numbers.Integral) or isinstance(num_speculations, bool):
    raise UsageError(f'{prefix}num_speculations={num_speculations!r}: must be an integer of at least 1')
  if strategy == 'self_speculative' and not 1 <= num_speculations:
    raise UsageError(f'{prefix}num_speculations={num_speculations}: must be at least 1')
  if (
    not isinstance(confidence_threshold, numbers.Real)
    or isinstance(confidence_threshold, bool)
    or not 0 <= confidence_threshold <= 1
  ):
    raise UsageError(
      f'{prefix}confidence_threshold={confidence_threshold!r}: must be a number in [0, 1] (a row '
      'stops drafting after a draft whose top probability is below it; 0 = off)'
    )
  check_parameters(temperature, top_k, top_p, prefix=prefix)
  exit_layer = int(exit_layer)  # a numpy integer would not count as a static (Python int) exit
  if strategy != 'self_speculative':
    return exit_layer, 0
  if max_speculations is None:
    return exit_layer, int(num_speculations)
  if (
    not isinstance(max_speculations, numbers.Integral)
    or isinstance(max_speculations, bool)
    or max_speculations < num_speculations
  ):
    raise UsageError(
      f'{prefix}max_speculations={max_speculations!r}: the d bucket must hold d '
      f'({prefix}num_speculations={num_speculations}): give at least {num_speculations}, or leave it '
      'unset (one program per d)'
    )
  return exit_layer, int(max_speculations)


def prompt_width(length: int, max_new_tokens: int, d_max: int, max_positions: int) -> int:
  """The prompt block's width: the longest prompt rounded up to PROMPT_BUCKET, so that a new prompt length reuses
  the compiled programs; exact where the rounded block would not leave the cache room within the model's
  positions."""
  width = -(-length // PROMPT_BUCKET) * PROMPT_BUCKET
  return width if cache_length(width, max_new_tokens, d_max) <= max_positions else length


def compiled_programs() -> int:
  """How many decoding programs this process has compiled so far (prefill and decode loops)."""
  return prefill._cache_size() + decode_loop._cache_size()


def generate(
  model: Transformer,
  prompts: Sequence,
  *,
  tokenizer: Tokenizer | None = None,
  strategy: str = 'autoregressive',
  exit_layer: int | None = None,
  num_speculations: int = 4,
  max_new_tokens: int = 64,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  eos_ids: Sequence[int] | None = None,
  max_speculations: int | None = None,
  confidence_threshold: float = 0.0,
  adapt_threshold: bool = False,
  unstack_layers: bool | None = None,
  layer_params: tuple | None = None,
) -> GenerateResult:
  """Batched generation (ragged prompts allowed) with one of STRATEGIES; see layerskip_jax/inference/decode.py.

  max_speculations: the static d bucket (verify block of max_speculations + 1 rows) shared by every d up to it;
    None = d itself (one compiled program per d).
  confidence_threshold: a self-speculative row stops drafting after a draft whose top probability (at the early
    exit) is below it; 0 = off (always d drafts). adapt_threshold: adapt each row's threshold online from its
    acceptance (up after a rejection, down after a row stopped by confidence had every draft accepted), starting
    from confidence_threshold or DEFAULT_ADAPT_THRESHOLD. Both are runtime values (no recompile).
  unstack_layers: the decode layout (inference/layout.py): True runs the decode programs on separately stored
    float32 layer weights, with E a runtime value (one program for every exit); False on the stacked weights,
    with E static (one program per exit, no conditional per layer); None = unstacked on a CPU backend only.
  layer_params: `decode_weights(model).layer_params` made once, to reuse across calls in the unstacked layout
    (made here when needed and not given; a model given with them is taken to be its decode model already).
  """
  exit_layer, d_max = check_request(
    model.config,
    strategy=strategy,
    exit_layer=exit_layer,
    num_speculations=num_speculations,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    max_speculations=max_speculations,
    confidence_threshold=confidence_threshold,
  )
  if not isinstance(adapt_threshold, bool):
    raise UsageError(f'adapt_threshold={adapt_threshold!r}: must be True or False')
  if wants_unstacked(unstack_layers) and layer_params is not None:
    weights = DecodeWeights(model, layer_params)
  else:
    weights = decode_weights(model, unstack_layers)
  model = weights.model
  config = model.config
  rows = encode_prompts(prompts, tokenizer)
  for i, row in enumerate(rows):
    if min(row) < 0 or max(row) >= config.vocab_size:
      raise UsageError(f'prompts[{i}]: token ids must lie in [0, {config.vocab_size})')
  lengths = np.asarray([len(r) for r in rows], np.int32)
  check_length(config, int(lengths.max()), max_new_tokens, d_max)
  width = prompt_width(int(lengths.max()), max_new_tokens, d_max, config.max_position_embeddings)
  cache_len = cache_length(width, max_new_tokens, d_max)
  tokens = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    tokens[i, : len(row)] = row
  if eos_ids is None:
    eos_ids = tokenizer.eos_ids if tokenizer is not None else ()
  greedy = temperature == 0
  sampling = Sampling(jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k), jnp.float32(top_p))
  threshold = confidence_threshold or (DEFAULT_ADAPT_THRESHOLD if adapt_threshold else 0.0)
  drafting = Drafting(jnp.float32(threshold), jnp.bool_(adapt_threshold))
  graphdef, params = nnx.split(model)
  layer_params = weights.layer_params
  static = dict(
    strategy=strategy,
    max_new=max_new_tokens,
    d_max=d_max,
    greedy=greedy,
    eos_ids=tuple(eos_ids),
    static_exit=None if weights.runtime_exit or strategy == 'autoregressive' else exit_layer,
  )

  begin = time.perf_counter()
  state = prefill(
    graphdef,
    params,
    layer_params,
    jnp.asarray(tokens),
    jnp.asarray(lengths),
    exit_layer,
    sampling,
    drafting,
    jax.random.key(seed),
    cache_len=cache_len,
    **static,
  )
  jax.block_until_ready(state.n_out)
  prefill_seconds = time.perf_counter() - begin
  begin = time.perf_counter()
  state = decode_loop(graphdef, params, layer_params, state, exit_layer, num_speculations, sampling, drafting, **static)
  out, n_out, drafted, accepted, rounds, layer_rows = jax.device_get(
    (state.out, state.n_out, state.drafted, state.accepted, state.rounds, state.layer_rows)
  )
  decode_seconds = time.perf_counter() - begin

  generated = [out[i, : n_out[i]].tolist() for i in range(len(rows))]
  per_row = [
    {
      'drafted': int(drafted[i]),
      'accepted': int(accepted[i]),
      'acceptance_rate': _rate(int(accepted[i]), int(drafted[i])),
      'new_tokens': int(n_out[i]),
      'rounds': int(rounds[i]),
    }
    for i in range(len(rows))
  ]
  total_drafted, total_accepted = int(drafted.sum()), int(accepted.sum())
  stats = {
    'rows': per_row,
    'drafted': total_drafted,
    'accepted': total_accepted,
    'acceptance_rate': _rate(total_accepted, total_drafted),
    'new_tokens': int(n_out.sum()),
    'rounds': int(rounds.sum()),
    'prefill_seconds': prefill_seconds,
    'decode_seconds': decode_seconds,
    'layer_rows': layer_rows.tolist(),
  }
  text = [tokenizer.decode(t) for t in generated] if tokenizer is not None else None
  return GenerateResult(tokens=generated, text=text, stats=stats)

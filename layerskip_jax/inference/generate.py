"""generate(): prompts in, tokens (and text) out, with per-row and total statistics (interfaces.md)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerskip_jax.data.tokenizer import Tokenizer
from layerskip_jax.errors import UsageError
from layerskip_jax.inference.cache import check_length
from layerskip_jax.inference.decode import STRATEGIES, Sampling, decode_loop, prefill
from layerskip_jax.inference.sampling import check_parameters
from layerskip_jax.model import ModelConfig, Transformer

DEFAULT_MAX_SPECULATIONS = 8  # the static bound d_max: every d up to it shares one compiled program


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


def check_request(config: ModelConfig, *, strategy: str, exit_layer: int | None, num_speculations: int,
                  temperature: float, top_k: int, top_p: float, max_speculations: int = DEFAULT_MAX_SPECULATIONS,
                  prefix: str = '') -> tuple[int, int]:
  """(exit layer, d_max) of a request, or UsageError naming the one value that is wrong. Needs only the model's
  config: the `generate` command calls it (prefix='--': messages name its flags) before loading the weights."""
  num_layers = config.num_hidden_layers
  if strategy not in STRATEGIES:
    raise UsageError(f'{prefix}strategy={strategy!r}: must be one of {", ".join(STRATEGIES)}')
  if strategy == 'autoregressive':
    exit_layer = num_layers if exit_layer is None else exit_layer
  elif exit_layer is None:
    raise UsageError(f'{prefix}exit_layer: required for {prefix}strategy={strategy}')
  high = num_layers - 1 if strategy == 'self_speculative' else num_layers
  if not 1 <= exit_layer <= high:
    raise UsageError(f'{prefix}exit_layer={exit_layer}: must be in 1..{high} for {prefix}strategy={strategy} '
                     f'(E counts layers run; the model has {num_layers})')
  if strategy == 'self_speculative' and not 1 <= num_speculations:
    raise UsageError(f'{prefix}num_speculations={num_speculations}: must be at least 1')
  check_parameters(temperature, top_k, top_p, prefix=prefix)
  d_max = max(max_speculations, num_speculations) if strategy == 'self_speculative' else 0
  return exit_layer, d_max


def uses_unstacked_layers() -> bool:
  """Whether decoding runs on separately stored layer weights: on a CPU, where slicing stacked weights copies them."""
  return jax.default_backend() == 'cpu'


def generate(model: Transformer, prompts: Sequence, *, tokenizer: Tokenizer | None = None,
             strategy: str = 'autoregressive', exit_layer: int | None = None, num_speculations: int = 4,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_ids: Sequence[int] | None = None, max_speculations: int = DEFAULT_MAX_SPECULATIONS,
             unstack_layers: bool | None = None, layer_params: tuple | None = None) -> GenerateResult:
  """Batched generation (ragged prompts allowed) with one of STRATEGIES; see layerskip_jax/inference/decode.py.

  unstack_layers: run the decode program on separately stored layer weights (see
  Transformer.run_layers_cached); None = on a CPU backend only. layer_params: `model.unstacked_layers()` made
  once, to reuse across calls (made here when needed and not given).
  """
  config = model.config
  exit_layer, d_max = check_request(config, strategy=strategy, exit_layer=exit_layer,
                                    num_speculations=num_speculations, temperature=temperature, top_k=top_k,
                                    top_p=top_p, max_speculations=max_speculations)
  rows = encode_prompts(prompts, tokenizer)
  for i, row in enumerate(rows):
    if min(row) < 0 or max(row) >= config.vocab_size:
      raise UsageError(f'prompts[{i}]: token ids must lie in [0, {config.vocab_size})')
  lengths = np.asarray([len(r) for r in rows], np.int32)
  width = int(lengths.max())
  cache_len = check_length(config, width, max_new_tokens, d_max)
  tokens = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  if eos_ids is None:
    eos_ids = tokenizer.eos_ids if tokenizer is not None else ()
  greedy = temperature == 0
  sampling = Sampling(jnp.float32(max(temperature, 1e-6)), jnp.int32(top_k), jnp.float32(top_p))
  graphdef, params = nnx.split(model)
  if unstack_layers is None:
    unstack_layers = uses_unstacked_layers()
  if not unstack_layers:
    layer_params = None
  elif layer_params is None:
    layer_params = model.unstacked_layers()
  static = dict(strategy=strategy, max_new=max_new_tokens, d_max=d_max, greedy=greedy, eos_ids=tuple(eos_ids))

  begin = time.perf_counter()
  state = prefill(graphdef, params, layer_params, jnp.asarray(tokens), jnp.asarray(lengths), exit_layer, sampling,
                  jax.random.key(seed), cache_len=cache_len, **static)
  jax.block_until_ready(state.n_out)
  prefill_seconds = time.perf_counter() - begin
  begin = time.perf_counter()
  state = decode_loop(graphdef, params, layer_params, state, exit_layer, num_speculations, sampling, **static)
  out, n_out, drafted, accepted, layer_rows = jax.device_get(
      (state.out, state.n_out, state.drafted, state.accepted, state.layer_rows))
  decode_seconds = time.perf_counter() - begin

  generated = [out[i, :n_out[i]].tolist() for i in range(len(rows))]
  per_row = [{'drafted': int(drafted[i]), 'accepted': int(accepted[i]),
              'acceptance_rate': _rate(int(accepted[i]), int(drafted[i])), 'new_tokens': int(n_out[i])}
             for i in range(len(rows))]
  total_drafted, total_accepted = int(drafted.sum()), int(accepted.sum())
  stats = {'rows': per_row, 'drafted': total_drafted, 'accepted': total_accepted,
           'acceptance_rate': _rate(total_accepted, total_drafted), 'new_tokens': int(n_out.sum()),
           'prefill_seconds': prefill_seconds, 'decode_seconds': decode_seconds,
           'layer_rows': layer_rows.tolist()}
  text = [tokenizer.decode(t) for t in generated] if tokenizer is not None else None
  return GenerateResult(tokens=generated, text=text, stats=stats)

"""The fixed-size KVQ cache of self-speculative decoding (spec section 2.2).

K and V of every layer, [layers, batch, kv_heads, max_len, head_dim], where a slot's index is its position; each row
has its own next position (`DecodeState.pos`). The exit-query buffer ("Q") holds the layer-E activations of the
d + 1 positions of a round, so verification starts from them: no layer runs twice for an accepted token. A roll-back
after a rejected draft only moves the row's position; slots past it are masked by causality and overwritten later.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp

from layerskip_jax.errors import UsageError
from layerskip_jax.model import ModelConfig


def cache_length(prompt_length: int, max_new_tokens: int, max_speculations: int) -> int:
  """Slots needed: a round writes up to d_max + 1 positions past the valid length (a static verify block)."""
  return prompt_length + max_new_tokens + max_speculations + 1


def check_length(
  config: ModelConfig, prompt_length: int, max_new_tokens: int, max_speculations: int, *, prefix: str = ''
) -> int:
  """The cache length, checked against the model's positions before anything compiles (never rely on
  dynamic_update_slice clamping an out-of-range write onto valid slots). `prefix` goes before the names in messages
  ('--' when the values came from command-line flags)."""
  if prompt_length < 1:
    raise UsageError('prompt: empty; give at least one token')
  if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool):
    raise UsageError(f'{prefix}max_new_tokens={max_new_tokens!r}: must be an integer of at least 1')
  if max_new_tokens < 1:
    raise UsageError(f'{prefix}max_new_tokens={max_new_tokens}: must be at least 1')
  length = cache_length(prompt_length, max_new_tokens, max_speculations)
  if length > config.max_position_embeddings:
    room = config.max_position_embeddings - cache_length(prompt_length, 0, max_speculations)
    fix = f'give {prefix}max_new_tokens <= {room}' if room >= 1 else 'shorten the prompt'
    raise UsageError(
      f'{prefix}max_new_tokens={max_new_tokens}: prompt ({prompt_length}) + max_new_tokens + '
      f'num_speculations bound ({max_speculations}) + 1 = {length} exceeds the model\'s '
      f'max_position_embeddings={config.max_position_embeddings}; {fix}'
    )
  return length


def init_cache(config: ModelConfig, batch: int, length: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  shape = (config.num_hidden_layers, batch, config.num_key_value_heads, length, config.head_dim)  # see layers.py
  return jnp.zeros(shape, config.compute_dtype), jnp.zeros(shape, config.compute_dtype)

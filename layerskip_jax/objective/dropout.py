"""Layer-dropout keep-masks: M_l ~ Bernoulli(1 - p_{l,t}), drawn from keys that are pure functions of
(seed, step, microbatch, layer). Spec section 1.1."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layerskip_jax.objective.keys import LAYER_DROPOUT, step_key
from layerskip_jax.objective.schedules import layer_dropout_probs
from layerskip_jax.sharding import ACT_LB, constrain

DROPOUT_MODES = ('per_sample', 'per_batch')  # layerskip.dropout_mode: one draw per sequence, or per microbatch


def keep_masks(
  num_layers: int,
  batch_size: int,
  step: int | jax.Array,
  microbatch: int | jax.Array,
  *,
  seed: int,
  p_max: float,
  total_steps: int,
  depth_schedule: str = 'exp',
  time_schedule: str = 'constant',
  mode: str = 'per_sample',
) -> tuple[jax.Array | None, jax.Array | None]:
  """(layer_keep [L] or None, sample_keep [L, batch] or None), as Transformer.run_train takes them.

  per_sample: one draw per sequence of the (global) microbatch per layer, the paper's choice.
  per_batch: one draw per layer, shared by the microbatch; a dropped layer is skipped with lax.cond.
  p_max = 0 draws nothing (None, None).
  """
  if p_max == 0:
    return None, None
  probs = layer_dropout_probs(num_layers, p_max, step, total_steps, depth_schedule, time_schedule)
  key = step_key(seed, LAYER_DROPOUT, step, microbatch)
  layer_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(num_layers))
  if mode == 'per_batch':
    drop = jax.vmap(lambda k, p: jax.random.bernoulli(k, p))(layer_keys, probs)
    return ~drop, None
  drop = jax.vmap(lambda k, p: jax.random.bernoulli(k, p, (batch_size,)))(layer_keys, probs)
  return None, constrain(~drop, ACT_LB)

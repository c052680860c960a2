"""LayerSkip's schedules as pure functions of (num_layers, step, total_steps, settings): spec section 1.

Index l is the layer (0..L-1); exit E = l + 1 decodes layer l's output. Every function works on Python ints and
on a traced `step` inside jax.jit, so a resumed run drops the same layers and supervises the same exits.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

DEPTH_SCHEDULES = ('exp', 'uniform', 'linear', 'log', 'sin', 'sigmoid')  # layerskip.depth_schedule: D(l)
TIME_SCHEDULES = ('constant', 'exp')  # layerskip.time_schedule: S(t)
CURRICULA = ('rotational', 'gradual', 'none')  # layerskip.curriculum: which exits are supervised


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f'{name}={value!r}: must be one of {", ".join(allowed)}')


def depth_scale(num_layers: int, schedule: str = 'exp') -> jax.Array:
  """D(l) for l = 0..L-1, in [0, 1]. exp (the paper's) is 2^(l/(L-1)) - 1: 0 at the first layer, 1 at the last."""
  _check('depth_schedule', schedule, DEPTH_SCHEDULES)
  l = jnp.arange(num_layers, dtype=jnp.float32)
  frac = l / (num_layers - 1)
  if schedule == 'exp':
    return 2.0**frac - 1.0
  if schedule == 'uniform':
    return jnp.ones_like(l)
  if schedule == 'linear':
    return frac
  if schedule == 'log':
    return jnp.log(l + 1.0) / math.log(num_layers)
  if schedule == 'sin':
    return jnp.sin(jnp.pi * frac / 2.0)
  return 1.0 / (1.0 + jnp.exp(-10.0 * (frac - 0.5)))  # sigmoid


def time_scale(step: int | jax.Array, total_steps: int, schedule: str = 'constant') -> jax.Array:
  """S(t): constant 1 (continual pretraining), or exp 2^(t/T) - 1 (from scratch: 0 at the start, toward 1)."""
  _check('time_schedule', schedule, TIME_SCHEDULES)
  t = jnp.asarray(step, jnp.float32)
  if schedule == 'constant':
    return jnp.ones_like(t)
  return 2.0 ** (t / total_steps) - 1.0


def layer_dropout_probs(
  num_layers: int,
  p_max: float,
  step: int | jax.Array,
  total_steps: int,
  depth_schedule: str = 'exp',
  time_schedule: str = 'constant',
) -> jax.Array:
  """p_{l,t} = S(t) * D(l) * p_max for l = 0..L-1: float32 [num_layers], each in [0, p_max]."""
  return time_scale(step, total_steps, time_schedule) * depth_scale(num_layers, depth_schedule) * p_max


def early_exit_scales(num_layers: int, e_scale: float = 1.0) -> jax.Array:
  """e(l): e_scale * sum_{i<=l} i for l < L-1, and (L-1) + e_scale * sum_{i<=L-2} i for the last layer.

  As in the paper, e(0) = 0: exit 1 is never trained, even when the curriculum activates it.
  """
  l = jnp.arange(num_layers, dtype=jnp.float32)
  scales = e_scale * l * (l + 1.0) / 2.0
  last = (num_layers - 1) + e_scale * (num_layers - 2) * (num_layers - 1) / 2.0
  return scales.at[-1].set(last)


def curriculum_mask(
  num_layers: int, step: int | jax.Array, total_steps: int, curriculum: str = 'rotational', rotation_period: int = 4
) -> jax.Array:
  """C(t, l) in {0, 1} as bool [num_layers]: which exits are supervised at step t. The last is always on.

  rotational: l mod R == t mod R. gradual: exits switch on from the last toward the first, one every T/(2L) steps
  (t >= (L-1-l) * T / (2L), all on by half-way). none: all, every step.
  """
  _check('curriculum', curriculum, CURRICULA)
  l = jnp.arange(num_layers)
  t = jnp.asarray(step, jnp.int32)
  if curriculum == 'rotational':
    active = (l % rotation_period) == (t % rotation_period)
  elif curriculum == 'gradual':
    active = t * (2 * num_layers) >= (num_layers - 1 - l) * total_steps  # integer form of t >= (L-1-l) T/(2L)
  else:
    active = jnp.ones((num_layers,), bool)
  return active | (l == num_layers - 1)


def early_exit_weights(
  num_layers: int,
  step: int | jax.Array,
  total_steps: int,
  curriculum: str = 'rotational',
  rotation_period: int = 4,
  e_scale: float = 1.0,
  draft_exit: int = 0,
) -> jax.Array:
  """w(t, l) = C(t,l) e(l) / sum_i C(t,i) e(i): float32 [num_layers], zero for inactive exits, summing to 1.

  draft_exit E > 0 (beyond the paper) supervises exit E at every step, whatever the curriculum says: the exit
  self-speculation will draft from gets the most training signal. 0 = the paper's curriculum alone."""
  c = curriculum_mask(num_layers, step, total_steps, curriculum, rotation_period)
  if draft_exit > 0:
    c = c | (jnp.arange(num_layers) == draft_exit - 1)
  weighted = jnp.where(c, early_exit_scales(num_layers, e_scale), 0.0)
  return weighted / jnp.sum(weighted)


@functools.lru_cache(maxsize=None)
def max_supervised_exits(
  num_layers: int, total_steps: int, curriculum: str, rotation_period: int, e_scale: float, draft_exit: int = 0
) -> int:
  """The most exits with non-zero weight at any step (a static bound: the loss computes this many per step)."""
  if curriculum == 'rotational':
    steps = range(min(rotation_period, total_steps))
  elif curriculum == 'gradual':
    steps = [total_steps - 1]  # exits only ever switch on
  else:
    steps = [0]
  with jax.ensure_compile_time_eval():
    return max(
      int(
        np.sum(
          np.asarray(early_exit_weights(num_layers, t, total_steps, curriculum, rotation_period, e_scale, draft_exit))
          > 0
        )
      )
      for t in steps
    )

"""One train step: gradient accumulation over microbatches, the LayerSkip objective, the optimizer update.

The train state is a `state.TrainState` (params: pure parameter dict, opt_state: optax state). `make_train_step`
returns a pure function; `state.compile_steps` is where it is jitted with explicit shardings and donated state, for
the trainer and the benchmarks alike (`compiled_train_step` here is its one-device form for benchmarks).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import config_dict

from layerskip_jax.objective import ObjectiveConfig, layerskip_loss

if TYPE_CHECKING:  # state.py compiles this module's step: import it there, not here
  from layerskip_jax.train.state import TrainState


def split_microbatches(batch: dict[str, jax.Array], num_microbatches: int) -> dict[str, jax.Array]:
  """[B, ...] -> [num_microbatches, B / num_microbatches, ...]: microbatch m holds rows m*b .. (m+1)*b - 1."""
  return jax.tree.map(lambda a: a.reshape(num_microbatches, a.shape[0] // num_microbatches, *a.shape[1:]), batch)


def make_train_step(
  graphdef: nnx.GraphDef, tx: optax.GradientTransformation, objective: ObjectiveConfig, grad_accum_steps: int = 1
) -> Callable[[TrainState, dict[str, jax.Array], jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
  """train_step(state, batch, step) -> (new state, metrics); `step` is t, the 0-based index of this update.

  The gradient is the mean over microbatches of each microbatch's gradient of J; metrics are averaged the same
  way, plus grad_norm (before clipping).
  """

  def loss_fn(params, batch, step, microbatch):
    return layerskip_loss(nnx.merge(graphdef, params), batch, step, microbatch, objective)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, jax.Array], step: jax.Array):
    params = state.params
    if grad_accum_steps == 1:
      (_, metrics), grads = grad_fn(params, batch, step, jnp.int32(0))
    else:
      micro = split_microbatches(batch, grad_accum_steps)

      def accumulate(carry, xs):
        mb, index = xs
        (_, m), g = grad_fn(params, mb, step, index)
        return jax.tree.map(jnp.add, carry, (g, m)), None

      first = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda a: a[0], micro), step, jnp.int32(0)))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (first[1], first[0][1]))
      (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(grad_accum_steps)))
      grads, metrics = jax.tree.map(lambda x: x / grad_accum_steps, (grads, metrics))
      metrics['tokens'] = metrics['tokens'] * grad_accum_steps
    updates, opt_state = tx.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return state.replace(params=new_params, opt_state=opt_state), metrics

  return train_step


def compiled_train_step(config: config_dict.ConfigDict, batch_size: int, seq_len: int, concrete: bool):
  """(compiled step, state) on one device, for benchmarks: the trainer's compiled step (state.compile_steps) for a
  global batch of batch_size x seq_len, with a fresh model and optimizer (concrete=True), or the abstract state
  only (concrete=False: compiled without allocating, for the memory analysis of models that do not fit). The step
  takes the trainer's batch dict (`synthetic_batch`)."""
  from layerskip_jax import sharding
  from layerskip_jax.train.state import compile_steps, init_state

  config = copy.deepcopy(config)
  config.train.batch_size, config.train.seq_len = batch_size, seq_len
  steps = compile_steps(config, sharding.single_device_mesh(), with_eval=False)
  return steps.train, (init_state(config, steps) if concrete else steps.abstract_state)


def synthetic_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, jax.Array]:
  """A batch of the trainer's layout of random tokens: one document per row (segment 1, positions 0..seq_len-1),
  every target counted."""
  tokens = np.random.default_rng(seed).integers(0, vocab_size, (batch_size, seq_len + 1))
  return {
    'inputs': jnp.asarray(tokens[:, :-1], jnp.int32),
    'targets': jnp.asarray(tokens[:, 1:], jnp.int32),
    'loss_mask': jnp.ones((batch_size, seq_len), jnp.float32),
    'segment_ids': jnp.ones((batch_size, seq_len), jnp.int32),
    'positions': jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch_size, seq_len)),
  }

"""One train step: gradient accumulation over microbatches, the LayerSkip objective, the optimizer update.

The train state is a pure pytree, {'params': pure parameter dict, 'opt_state': optax state}, the same tree a
checkpoint's `state` item holds. `make_train_step` returns a pure function to jit with explicit shardings and
donated state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from ml_collections import config_dict

from layerskip_jax.model import ModelConfig, abstract, create
from layerskip_jax.objective import ObjectiveConfig, layerskip_loss
from layerskip_jax.train.optimizer import make_optimizer

TrainState = dict[str, Any]  # {'params': ..., 'opt_state': ...}


def split_microbatches(batch: dict[str, jax.Array], num_microbatches: int) -> dict[str, jax.Array]:
  """[B, ...] -> [num_microbatches, B / num_microbatches, ...]: microbatch m holds rows m*b .. (m+1)*b - 1."""
  return jax.tree.map(lambda a: a.reshape(num_microbatches, a.shape[0] // num_microbatches, *a.shape[1:]), batch)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, objective: ObjectiveConfig,
                    grad_accum_steps: int = 1) -> Callable[[TrainState, dict[str, jax.Array], jax.Array],
                                                           tuple[TrainState, dict[str, jax.Array]]]:
  """train_step(state, batch, step) -> (new state, metrics); `step` is t, the 0-based index of this update.

  The gradient is the mean over microbatches of each microbatch's gradient of J; metrics are averaged the same
  way, plus grad_norm (before clipping).
  """

  def loss_fn(params, batch, step, microbatch):
    return layerskip_loss(nnx.merge(graphdef, params), batch, step, microbatch, objective)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, jax.Array], step: jax.Array):
    params = state['params']
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
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return {'params': new_params, 'opt_state': opt_state}, metrics

  return train_step


def compiled_train_step(config: config_dict.ConfigDict, batch_size: int, seq_len: int, concrete: bool):
  """(compiled step, state) for one device, for benchmarks: a fresh model and optimizer (concrete=True), or
  abstract shapes only (compile without allocating: memory analysis of models that do not fit)."""
  model_config = ModelConfig.from_config(config.model)
  model = create(model_config, config.train.seed) if concrete else abstract(model_config)
  graphdef, params_state = nnx.split(model)
  tx = make_optimizer(config.train, params_state)
  params = nnx.to_pure_dict(params_state)
  state = {'params': params, 'opt_state': (tx.init(params) if concrete else jax.eval_shape(tx.init, params))}
  step_fn = jax.jit(make_train_step(graphdef, tx, ObjectiveConfig.from_config(config), config.train.grad_accum_steps),
                    donate_argnums=0)
  batch = {'inputs': jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32),
           'targets': jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32),
           'loss_mask': jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32)}
  compiled = step_fn.lower(jax.eval_shape(lambda: state) if not concrete else state, batch,
                           jax.ShapeDtypeStruct((), jnp.int32)).compile()
  return compiled, state

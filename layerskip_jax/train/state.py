"""The train state, and the one place where the train and eval steps are compiled.

    steps = compile_steps(config, mesh)             # abstract inputs only: nothing is allocated
    state = init_state(config, steps)               # or a restored checkpoint (steps.abstract_state is its target)
    state, metrics = steps.train(state, batch, jnp.int32(step))

Why one compile path: the trainer, the benchmarks (train/bench.py, on a one-device mesh) and the compile-only
planner (train/plan.py) must compile the same program, or the planner's memory figures and the benchmark's
timings describe something the trainer never runs. Everything is lowered from ShapeDtypeStructs that carry their
shardings, so compiling a 13B model's step needs no memory for it: the same call plans runs that do not fit here.

`TrainState` is a typed pytree (a flax struct) rather than a string-keyed dict, so a misspelt field is an error
at trace time. Checkpoints keep the dict layout {'params': ..., 'opt_state': ...} (interfaces.md): the
Checkpointer converts with `to_tree` / `from_tree`, and checkpoints written before this type existed restore.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_dict

from layerskip_jax import sharding
from layerskip_jax.model import ModelConfig, abstract, create
from layerskip_jax.objective import ObjectiveConfig
from layerskip_jax.objective.loss import exit_statistics
from layerskip_jax.train.optimizer import make_optimizer
from layerskip_jax.train.step import make_train_step

BATCH_KEYS = ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')  # loss_mask float32, others int32


@flax.struct.dataclass
class TrainState:
  params: Any  # the model's pure parameter dict (nnx.to_pure_dict of its Param state)
  opt_state: Any  # optax state of make_optimizer

  def to_tree(self) -> dict[str, Any]:
    """The checkpoint layout (the Orbax `state` item)."""
    return {'params': self.params, 'opt_state': self.opt_state}

  @classmethod
  def from_tree(cls, tree: dict[str, Any]) -> TrainState:
    return cls(params=tree['params'], opt_state=tree['opt_state'])


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  state_shardings: TrainState  # NamedShardings
  abstract_state: TrainState  # ShapeDtypeStructs carrying shardings
  batch_sharding: NamedSharding  # of [batch, seq] inputs
  train: jax.stages.Compiled  # (state, batch dict, step int32 scalar) -> (state, metrics)
  eval: jax.stages.Compiled | None  # (params, batch dict of eval microbatch size) -> exit_statistics sums
  train_seconds: float  # compile times
  eval_seconds: float


def abstract_batch(
  batch_size: int, seq_len: int, batch_sharding: NamedSharding | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch dict a step takes: [batch_size, seq_len] per key, loss_mask float32 and the rest int32."""
  return {
    k: jax.ShapeDtypeStruct(
      (batch_size, seq_len), jnp.float32 if k == 'loss_mask' else jnp.int32, sharding=batch_sharding
    )
    for k in BATCH_KEYS
  }


def eval_batch_size(config: config_dict.ConfigDict) -> int:
  """Rows of one eval step: the train step's microbatch, so evaluation needs no more memory than training."""
  return config.train.batch_size // config.train.grad_accum_steps


def peak_bytes(compiled: jax.stages.Compiled) -> int:
  """Per-device memory a compiled step needs at its peak, from XLA's memory analysis: arguments + temporaries +
  outputs, less the outputs that reuse donated arguments (the train state)."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def _state_shardings(
  abstract_params_state: nnx.State, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> TrainState:
  """Parameters by the logical-axis rules; every params-shaped part of the optimizer state (Adam's moments) like
  its parameter (optax.tree_map_params), everything else (step counts) replicated.

  Not read off a compiled tx.init: its zeros are new arrays, and XLA left them replicated, so every device held
  the whole of Adam's moments (9.9 GB per device for Llama 3.2 1B on 8 devices instead of 1.2 GB)."""
  param_sh = nnx.to_pure_dict(sharding.param_shardings(abstract_params_state, mesh))
  abstract_opt_state = jax.eval_shape(tx.init, nnx.to_pure_dict(abstract_params_state))
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_sh = optax.tree_map_params(
    tx,
    lambda _, param_sharding: param_sharding,
    abstract_opt_state,
    param_sh,
    transform_non_params=lambda _: replicated,
  )
  return TrainState(params=param_sh, opt_state=opt_sh)


def compile_steps(config: config_dict.ConfigDict, mesh: jax.sharding.Mesh, *, with_eval: bool = True) -> CompiledSteps:
  """Lowers and compiles the train step (global batch train.batch_size x train.seq_len, donated state, explicit
  in/out shardings) and the eval step (microbatch = batch_size // grad_accum_steps rows) from abstract inputs:
  nothing is allocated, so it also serves compile-only planning of models that do not fit this machine."""
  t = config.train
  model_config = ModelConfig.from_config(config.model)
  graphdef, abstract_params_state = nnx.split(abstract(model_config))
  tx = make_optimizer(t, abstract_params_state)
  state_sh = _state_shardings(abstract_params_state, tx, mesh)
  abstract_params = nnx.to_pure_dict(abstract_params_state)
  shapes = TrainState(params=abstract_params, opt_state=jax.eval_shape(tx.init, abstract_params))
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, state_sh)
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sh = sharding.batch_sharding(mesh, 2)
  batch_shardings = {k: batch_sh for k in BATCH_KEYS}
  objective = ObjectiveConfig.from_config(config)

  with jax.set_mesh(mesh):
    begin = time.perf_counter()
    train = (
      jax.jit(
        make_train_step(graphdef, tx, objective, t.grad_accum_steps),
        in_shardings=(state_sh, batch_shardings, replicated),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
      )
      .lower(
        abstract_state,
        abstract_batch(t.batch_size, t.seq_len, batch_sh),
        jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
      )
      .compile()
    )
    train_seconds = time.perf_counter() - begin

    compiled_eval, eval_seconds = None, 0.0
    if with_eval:
      begin = time.perf_counter()
      compiled_eval = (
        jax.jit(
          lambda params, batch: exit_statistics(nnx.merge(graphdef, params), batch, objective.ce_chunk_len),
          in_shardings=(state_sh.params, batch_shardings),
          out_shardings=replicated,
        )
        .lower(abstract_state.params, abstract_batch(eval_batch_size(config), t.seq_len, batch_sh))
        .compile()
      )
      eval_seconds = time.perf_counter() - begin

  return CompiledSteps(
    graphdef=graphdef,
    tx=tx,
    state_shardings=state_sh,
    abstract_state=abstract_state,
    batch_sharding=batch_sh,
    train=train,
    eval=compiled_eval,
    train_seconds=train_seconds,
    eval_seconds=eval_seconds,
  )


def init_state(config: config_dict.ConfigDict, steps: CompiledSteps, params: Any = None) -> TrainState:
  """A fresh optimizer state around fresh parameters (seeded by train.seed), or around `params` (a pure parameter
  dict, e.g. restored for continual pretraining: cast to model.param_dtype). Created directly sharded."""
  model_config = ModelConfig.from_config(config.model)
  param_sh = steps.state_shardings.params
  with jax.set_mesh(steps.batch_sharding.mesh):
    if params is None:
      params = jax.jit(
        lambda: nnx.to_pure_dict(nnx.state(create(model_config, config.train.seed), nnx.Param)), out_shardings=param_sh
      )()
    else:
      params = jax.jit(
        lambda p: jax.tree.map(lambda a: a.astype(model_config.weight_dtype), p), out_shardings=param_sh
      )(params)
    opt_state = jax.jit(steps.tx.init, out_shardings=steps.state_shardings.opt_state)(params)
  return TrainState(params=params, opt_state=opt_state)

"""The training loop: sharded state, one compiled step, metrics, evaluation, checkpoints, preemption, resume.

    train(config, workdir)    # what `python -m layerskip_jax.train` runs

Running it again on the same workdir resumes from the latest checkpoint, bit-identically on CPU: the data iterator,
the parameters and optimizer state are restored, and every schedule and random draw is a function of the step.
"""

from __future__ import annotations

import math
import os
import pathlib
import shutil
import signal
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_dict
from tqdm import tqdm

import layerskip_jax
from layerskip_jax import checkpoint_dir, config as config_lib, sharding
from layerskip_jax.data import loader
from layerskip_jax.data.cache import ensure_prepared
from layerskip_jax.errors import UsageError
from layerskip_jax.model import ModelConfig, abstract, create
from layerskip_jax.objective import ObjectiveConfig
from layerskip_jax.objective.loss import exit_statistics
from layerskip_jax.train.checkpointing import Checkpointer
from layerskip_jax.train.metrics import MetricsWriter, train_flops_per_token
from layerskip_jax.train.optimizer import learning_rate_schedule, make_optimizer
from layerskip_jax.train.step import make_train_step

BATCH_KEYS = ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')


class NonFiniteLoss(Exception):
  pass


class _StopRequest:
  """SIGTERM/SIGINT (a cluster's preemption notice): finish the step, checkpoint, exit 0. A second signal exits
  at once."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def _handle(self, signum, frame):
    if self.requested:
      os._exit(128 + signum)
    self.requested = True

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self) -> bool:
    """Every process stops at the same step: the processes share their flags (a tiny all-gather per step)."""
    if jax.process_count() == 1:
      return self.requested
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))


def _check_workdir_config(config: config_dict.ConfigDict, workdir: pathlib.Path) -> None:
  saved_path = workdir / config_lib.CONFIG_FILE_NAME
  if not saved_path.is_file():
    return
  saved = config_lib.from_json(saved_path)
  for section in ('model', 'layerskip'):
    if saved[section] != config[section]:
      differing = [k for k in config[section].keys() if saved[section][k] != config[section][k]]
      key = differing[0] if differing else '?'
      raise UsageError(f'--workdir={workdir}: was started with {section}.{key}={saved[section][key]!r}, not '
                       f'{config[section][key]!r}; resume with the same config or use a new workdir')


def _state_shardings(abstract_params_state, tx, mesh):
  """Shardings of {'params', 'opt_state'}: parameters by the logical-axis rules, optimizer moments like their
  parameters (read off the compiled tx.init), scalars replicated."""
  param_sh = nnx.to_pure_dict(sharding.param_shardings(abstract_params_state, mesh))
  abstract_params = nnx.to_pure_dict(abstract_params_state)
  with jax.set_mesh(mesh):
    compiled_init = jax.jit(tx.init, in_shardings=(param_sh,)).lower(abstract_params).compile()
  opt_sh = compiled_init.output_shardings
  return {'params': param_sh, 'opt_state': opt_sh}


def _abstract_with(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _save_tokenizer(tokenizer: pathlib.Path, workdir: pathlib.Path) -> None:
  name = 'tokenizer.json' if tokenizer.suffix == '.json' else 'tokenizer.model'
  target = workdir / name
  if not target.exists() or target.read_bytes() != tokenizer.read_bytes():
    shutil.copyfile(tokenizer, target)
  for side in ('tokenizer_config.json', 'generation_config.json'):
    if name == 'tokenizer.json' and (tokenizer.parent / side).is_file():
      shutil.copyfile(tokenizer.parent / side, workdir / side)


def _format_bytes(n: float) -> str:
  return f'{n / 2**30:.2f} GiB' if n >= 2**28 else f'{n / 2**20:.1f} MiB'


def train(config: config_dict.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains to config.train.steps (or until a stop signal); returns {'step', 'status', 'last_row'}."""
  workdir = pathlib.Path(workdir).expanduser().absolute()
  is_main = jax.process_index() == 0
  _check_workdir_config(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  t = config.train
  data_parallel = mesh.shape['data'] * mesh.shape['fsdp']
  if (t.batch_size // t.grad_accum_steps) % data_parallel:
    raise UsageError(f'train.batch_size={t.batch_size}: each microbatch (batch_size / grad_accum_steps = '
                     f'{t.batch_size // t.grad_accum_steps}) must divide over the {data_parallel} data-parallel '
                     'devices (mesh.data x mesh.fsdp)')

  init_ckpt = checkpoint_dir.resolve(t.init_from) if t.init_from else None
  init_tokenizer = str(init_ckpt.tokenizer_path) if init_ckpt and init_ckpt.tokenizer_path else None
  prepared = ensure_prepared(config, tokenizer=config.data.tokenizer or init_tokenizer)
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    config_lib.save(config, workdir)
    _save_tokenizer(prepared.tokenizer, workdir)

  model_config = ModelConfig.from_config(config.model)
  graphdef, abstract_params_state = nnx.split(abstract(model_config))
  tx = make_optimizer(t, abstract_params_state)
  state_sh = _state_shardings(abstract_params_state, tx, mesh)
  abstract_params = nnx.to_pure_dict(abstract_params_state)
  abstract_state = _abstract_with({'params': abstract_params, 'opt_state': jax.eval_shape(tx.init, abstract_params)},
                                  state_sh)

  iterator = iter(loader.dataset(prepared.train, t.seq_len, t.batch_size, seed=t.seed,
                                 num_workers=config.data.num_workers))
  checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  start = checkpointer.latest_step()
  with jax.set_mesh(mesh):
    if start is not None:
      state, _ = checkpointer.restore(start, abstract_state, iterator)
      message = f'resumed from {checkpointer.directory / str(start)}'
    else:
      start = 0
      if init_ckpt is not None:
        init_config, params, _ = checkpoint_dir.restore_params(init_ckpt.step_dir, mesh)
        theirs, ours = ModelConfig.from_config(init_config.model).architecture(), model_config.architecture()
        differing = next((k for k in ours if theirs[k] != ours[k]), None)
        if differing is not None:  # numerics (dtype, param_dtype, remat_policy, ...) may differ: weights are cast
          raise UsageError(f'train.init_from={t.init_from}: its model.{differing}={theirs[differing]!r} differs '
                           f'from this config\'s {ours[differing]!r}; use --config.model.{differing}=... or its preset')
        params = jax.jit(lambda p: jax.tree.map(lambda a: a.astype(model_config.weight_dtype), p),
                         out_shardings=state_sh['params'])(params)
        message = f'initialised from {init_ckpt.step_dir} (weights only, fresh optimizer)'
      else:
        params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(create(model_config, t.seed), nnx.Param)),
                         out_shardings=state_sh['params'])()
        message = 'initialised from scratch'
      state = {'params': params,
               'opt_state': jax.jit(tx.init, out_shardings=state_sh['opt_state'])(params)}

    objective = ObjectiveConfig.from_config(config)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sh = sharding.batch_sharding(mesh, 2)
    step_fn = jax.jit(make_train_step(graphdef, tx, objective, t.grad_accum_steps),
                      in_shardings=(state_sh, {k: batch_sh for k in BATCH_KEYS}, replicated),
                      out_shardings=(state_sh, replicated), donate_argnums=0)
    abstract_batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.float32 if k == 'loss_mask'
                                              else jnp.int32, sharding=batch_sh) for k in BATCH_KEYS}
    begin = time.perf_counter()
    compiled = step_fn.lower(abstract_state, abstract_batch,
                             jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)).compile()
    memory = compiled.memory_analysis()
    if is_main:
      print(f'layerskip_jax {layerskip_jax.__version__}: {message}; {sharding.describe(mesh)}')
      if memory is not None:
        print(f'compiled train step in {time.perf_counter() - begin:.1f}s; per device: parameters+optimizer '
              f'{_format_bytes(memory.argument_size_in_bytes)}, temporaries {_format_bytes(memory.temp_size_in_bytes)}')

    eval_fn = jax.jit(lambda params, batch: exit_statistics(nnx.merge(graphdef, params), batch,
                                                            objective.ce_chunk_len),
                      in_shardings=(state_sh['params'], {k: batch_sh for k in BATCH_KEYS}))

  metrics_writer = MetricsWriter(workdir, config.logging, resume_step=start, enabled=is_main,
                                 run_config=config.to_dict())
  lr_schedule = learning_rate_schedule(t)
  flops_per_step = train_flops_per_token(model_config, t.seq_len) * t.batch_size * t.seq_len
  peak = t.peak_tflops * 1e12 * jax.device_count()

  def evaluate(step: int) -> dict | None:
    if prepared.heldout is None:
      return None
    totals = None
    for i, batch in enumerate(loader.dataset(prepared.heldout, t.seq_len, t.batch_size, shuffle=False,
                                             repeat=False)):
      if i >= t.eval_batches:
        break
      with jax.set_mesh(mesh):
        out = jax.device_get(eval_fn(state['params'], loader.to_global_array(batch, mesh)))
      totals = out if totals is None else jax.tree.map(np.add, totals, out)
    if totals is None:
      return None
    return metrics_writer.write({'split': 'heldout', 'step': step, **summarize_exits(totals)})

  def save(step: int) -> None:
    checkpointer.save(step, state, iterator, {'step': step, 'versions': {
        'layerskip_jax': layerskip_jax.__version__, 'jax': jax.__version__, 'flax': flax.__version__}})

  status, last_row, step, last_saved = 'finished', None, start, start
  last_log = (time.perf_counter(), start)
  progress = tqdm(total=t.steps, initial=start, desc='train', unit='step', dynamic_ncols=True,
                  disable=not (is_main and config.logging.progress_bar),
                  mininterval=0.1 if sys.stderr.isatty() else 30.0)  # a log file gets a line every 30 s
  try:
    with _StopRequest() as stop:
      while step < t.steps:
        if stop.agreed():
          status = 'preempted'
          break
        host_batch = next(iterator)
        with jax.set_mesh(mesh):
          state, metrics = compiled(state, loader.to_global_array(host_batch, mesh), jnp.int32(step))
        step += 1
        if step % t.log_every == 0 or step == t.steps:
          metrics = jax.device_get(metrics)
          now = time.perf_counter()
          step_time, last_log = (now - last_log[0]) / (step - last_log[1]), (now, step)
          if not math.isfinite(float(metrics['loss'])):
            raise NonFiniteLoss(f'non-finite loss ({float(metrics["loss"])}) at step {step}; stopped without '
                                f'saving: the last good checkpoint is step {checkpointer.latest_step()}')
          last_row = metrics_writer.write({
              'step': step, 'loss': metrics['loss'], 'ce_last': metrics['ce_last'], 'exit_ce': metrics['exit_ce'],
              'grad_norm': metrics['grad_norm'], 'learning_rate': float(lr_schedule(step - 1)),
              'tokens_per_sec': float(metrics['tokens']) / step_time, 'step_time': step_time,
              'mfu': flops_per_step / step_time / peak})
          progress.set_postfix(loss=f'{last_row["loss"]:.3f}', ce_last=f'{last_row["ce_last"]:.3f}',
                               tok_s=f'{last_row["tokens_per_sec"]:.0f}', refresh=False)
          if progress.disable and is_main:
            print(f'step {step}/{t.steps} loss {last_row["loss"]:.4f} ce_last {last_row["ce_last"]:.4f} '
                  f'{last_row["tokens_per_sec"]:.0f} tok/s', flush=True)
        progress.update(1)
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
          row = evaluate(step)
          if row is not None and is_main:
            progress.write(_eval_line(row))
          last_log = (time.perf_counter(), step)  # evaluation time is not step time
        if step % config.checkpoint.every_steps == 0 and step < t.steps:
          save(step)
          last_saved = step
      if status == 'finished':
        row = evaluate(step)
        if row is not None and is_main:
          progress.write(_eval_line(row))
      if last_saved != step:
        save(step)
      checkpointer.wait()
  finally:
    progress.close()
    checkpointer.close()
    metrics_writer.close()
  if is_main:
    print(f'{status} at step {step}; checkpoint {checkpointer.directory / str(step)}')
  return {'step': step, 'status': status, 'last_row': last_row}


def summarize_exits(totals: dict[str, np.ndarray]) -> dict[str, Any]:
  """Per-exit means (lists of length L) from summed exit_statistics."""
  tokens = max(float(totals['tokens']), 1.0)
  exit_ce = np.asarray(totals['ce']) / tokens
  return {'exit_ce': exit_ce, 'exit_ppl': np.exp(np.minimum(exit_ce, 50.0)),
          'exit_accuracy': np.asarray(totals['correct']) / tokens,
          'exit_agreement': np.asarray(totals['agree_final']) / tokens, 'tokens': float(totals['tokens'])}


def _eval_line(row: dict) -> str:
  ce = ' '.join(f'{v:.2f}' for v in row['exit_ce'])
  return f'heldout step {row["step"]}: cross-entropy per exit (1..L): {ce}'

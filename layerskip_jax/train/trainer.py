"""The training loop: sharded state, one compiled step, metrics, evaluation, checkpoints, preemption, resume.

    train(config, workdir)    # what `python -m layerskip_jax.train` runs

Running it again on the same workdir resumes from the latest checkpoint, bit-identically on CPU: the data iterator,
the parameters and optimizer state are restored, and every schedule and random draw is a function of the step.

`train` runs five phases, each one function: `_prepare` (workdir, mesh, data: checks only), `state.compile_steps`
(the train and eval steps, compiled from abstract shapes before anything is allocated), `_initial_state` (resume,
init_from or fresh; only then are the config and tokenizer written into the workdir, so a run refused before it
starts leaves the workdir as it was), `_Loop.run` (the steps) and `_Loop.finish` (last row, final evaluation,
checkpoint). `validate` makes every check of `_prepare` and writes nothing (`--dry_run`). A rerun of a finished
run does nothing.

The host never makes the device wait between steps: the next global batches are read and placed on the devices by
a background thread (`data.prefetch`); a step's metrics leave the device only on log steps (`train.log_every`),
fetched once the following step is queued, so the non-finite-loss check runs one step late (never after a
checkpoint of the bad update: a save checks first); and processes agree on a stop signal only every
`checkpoint.preemption_check_every` steps (an all-gather). The host waits for the device only at log rows (for the
step before the one running), evaluations and checkpoints.
"""

from __future__ import annotations

import dataclasses
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
from jax.experimental import multihost_utils
from ml_collections import config_dict
from tqdm import tqdm

import layerskip_jax
from layerskip_jax import checkpoint_dir, config as config_lib, outputs, sharding
from layerskip_jax.data import loader
from layerskip_jax.data.cache import PreparedData, ensure_prepared
from layerskip_jax.errors import UsageError
from layerskip_jax.model import ModelConfig
from layerskip_jax.model.model_config import NUMERICS_FIELDS
from layerskip_jax.objective.loss import summarize_exits
from layerskip_jax.train.checkpointing import Checkpointer
from layerskip_jax.train.metrics import MetricsWriter, train_flops_per_token
from layerskip_jax.train.optimizer import learning_rate_schedule
from layerskip_jax.train.state import CompiledSteps, TrainState, compile_steps, eval_batch_size, init_state


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
    """Every process stops at the same step: the processes share their flags (a tiny all-gather, so the loop
    asks only every checkpoint.preemption_check_every steps)."""
    if jax.process_count() == 1:
      return self.requested
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))


class _Profiler:
  """logging.profile_steps 'FIRST,LAST': a trace (jax.profiler) of the steps whose rows are FIRST..LAST, written
  to WORKDIR/tb by process 0. It stops once step LAST's state is computed, not merely queued."""

  def __init__(self, spec: str, directory: pathlib.Path, enabled: bool):
    self.range = config_lib.parse_profile_steps(spec) if enabled else None
    self.directory = directory
    self.active = False

  def before_step(self, step: int) -> None:
    """`step` is the number the step about to be dispatched will have (1-based, as in metrics rows)."""
    if self.range is not None and step == self.range[0]:
      self.directory.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.directory))
      self.active = True

  def after_step(self, step: int, state: TrainState) -> None:
    if self.active and step == self.range[1]:
      jax.block_until_ready(state)
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def _check_saved_config(config: config_dict.ConfigDict, workdir: pathlib.Path) -> None:
  saved = config_lib.from_json(workdir / config_lib.CONFIG_FILE_NAME)
  for section in ('model', 'layerskip'):
    # How the model computes may change on resume (attention kernel, remat, compute dtype: a workdir started
    # before attention_impl defaulted to 'auto' resumes); what it computes and the stored state's dtype may not.
    free = set(NUMERICS_FIELDS) - {'param_dtype'} if section == 'model' else set()
    differing = [k for k in config[section].keys() if k not in free and saved[section][k] != config[section][k]]
    if differing:
      key = differing[0]
      raise UsageError(
        f'--workdir={workdir}: was started with {section}.{key}={saved[section][key]!r}, not '
        f'{config[section][key]!r}; resume with the same config or use a new workdir'
      )


def check_workdir(config: config_dict.ConfigDict, workdir: pathlib.Path) -> int | None:
  """The latest finished step of `workdir` (None: a new run), after refusing a workdir the run cannot use: a file,
  an unwritable place, checkpoints whose config file is lost, or a saved config of another model. Writes nothing.

  A saved config binds the workdir only once a checkpoint exists: a run that failed before its first checkpoint
  (a rejected train.init_from, a crash while compiling) left nothing to resume, so a retry may change the config.
  """
  if workdir.exists() and not workdir.is_dir():
    raise UsageError(f'--workdir={workdir}: is a file; give a directory (it is created, or resumed if it exists)')
  outputs.check_writable('--workdir', workdir)
  finished = checkpoint_dir.steps(workdir)
  has_config = (workdir / config_lib.CONFIG_FILE_NAME).is_file()
  if finished and not has_config:
    raise UsageError(
      f'--workdir={workdir}: holds checkpoints (latest step {finished[-1]}) but no '
      f'{config_lib.CONFIG_FILE_NAME}, so the config they were trained with is unknown; restore the '
      'file from a copy, or use a new workdir'
    )
  if finished:
    _check_saved_config(config, workdir)
  return finished[-1] if finished else None


def check_init_from(config: config_dict.ConfigDict) -> checkpoint_dir.CheckpointDir | None:
  """train.init_from resolved, after checking that it has this config's architecture (numerics may differ: the
  weights are cast). None without init_from."""
  t = config.train
  if not t.init_from:
    return None
  init_ckpt = checkpoint_dir.resolve(t.init_from, 'train.init_from')
  theirs = ModelConfig.from_config(init_ckpt.read_config('train.init_from').model).architecture()
  ours = ModelConfig.from_config(config.model).architecture()
  differing = next((k for k in ours if theirs[k] != ours[k]), None)
  if differing is not None:
    raise UsageError(
      f'train.init_from={t.init_from}: its model.{differing}={theirs[differing]!r} differs '
      f'from this config\'s {ours[differing]!r}; use --config.model.{differing}=... or its preset'
    )
  return init_ckpt


def validate(config: config_dict.ConfigDict, workdir: str | pathlib.Path) -> str:
  """Every check a run makes before it writes anything (the config itself was validated when loaded); returns what
  the run would do. `python -m layerskip_jax.train --dry_run` prints it; the cluster launchers run that before
  submitting or stopping anything."""
  workdir = pathlib.Path(workdir).expanduser().absolute()
  latest = check_workdir(config, workdir)
  init_ckpt = check_init_from(config)
  if latest is not None and latest >= config.train.steps:
    return f'{workdir} is finished (step {latest}, train.steps={config.train.steps}): nothing to do'
  if latest is not None:
    return f'would resume {workdir} from step {latest}'
  if init_ckpt is not None:
    return f'would start {workdir} from the weights of {init_ckpt.step_dir}'
  return f'would start {workdir} from scratch'


def _save_tokenizer(tokenizer: pathlib.Path, workdir: pathlib.Path) -> None:
  name = 'tokenizer.json' if tokenizer.suffix == '.json' else 'tokenizer.model'
  target = workdir / name
  copies = [(tokenizer, target)] if not target.exists() or target.read_bytes() != tokenizer.read_bytes() else []
  for side in ('tokenizer_config.json', 'generation_config.json'):
    if name == 'tokenizer.json' and (tokenizer.parent / side).is_file():
      copies.append((tokenizer.parent / side, workdir / side))
  for source, destination in copies:  # whole or not at all: a killed run leaves no half-copied tokenizer
    with outputs.atomic_file(destination) as tmp:
      shutil.copyfile(source, tmp)


def _format_bytes(n: float) -> str:
  return f'{n / 2**30:.2f} GiB' if n >= 2**28 else f'{n / 2**20:.1f} MiB'


@dataclasses.dataclass(frozen=True)
class _Run:
  """What every phase reads: the config, where the run lives, its mesh and data."""

  config: config_dict.ConfigDict
  workdir: pathlib.Path
  mesh: jax.sharding.Mesh
  prepared: PreparedData | None  # None when the run is already finished
  init_ckpt: checkpoint_dir.CheckpointDir | None
  is_main: bool
  finished_step: int | None = None  # the workdir's last step, when it is already at train.steps


def _prepare(config: config_dict.ConfigDict, workdir: str | pathlib.Path) -> _Run:
  """Phase 1: checks that need no compile (workdir, batch over the mesh, init_from's architecture) and the data.
  Nothing is written into the workdir here: `_write_run_files` does that once the initial state exists."""
  workdir = pathlib.Path(workdir).expanduser().absolute()
  is_main = jax.process_index() == 0
  latest = check_workdir(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  t = config.train
  data_parallel = mesh.shape['data'] * mesh.shape['fsdp']
  if eval_batch_size(config) % data_parallel:
    raise UsageError(
      f'train.batch_size={t.batch_size}: each microbatch (batch_size / grad_accum_steps = '
      f'{eval_batch_size(config)}) must divide over the {data_parallel} data-parallel '
      'devices (mesh.data x mesh.fsdp)'
    )
  init_ckpt = check_init_from(config)
  if latest is not None and latest >= t.steps:
    return _Run(
      config=config,
      workdir=workdir,
      mesh=mesh,
      prepared=None,
      init_ckpt=init_ckpt,
      is_main=is_main,
      finished_step=latest,
    )
  init_tokenizer = str(init_ckpt.tokenizer_path) if init_ckpt and init_ckpt.tokenizer_path else None
  prepared = ensure_prepared(config, tokenizer=config.data.tokenizer or init_tokenizer)
  return _Run(config=config, workdir=workdir, mesh=mesh, prepared=prepared, init_ckpt=init_ckpt, is_main=is_main)


def _write_run_files(run: _Run) -> None:
  """The config and tokenizer of the run, written into the workdir (process 0) once the run has started."""
  if run.is_main:
    config_lib.save(run.config, run.workdir)
    _save_tokenizer(run.prepared.tokenizer, run.workdir)


def _initial_state(
  run: _Run, steps: CompiledSteps, checkpointer: Checkpointer, iterator
) -> tuple[TrainState, int, str]:
  """Phase 3: (state, start step, what was done): the latest checkpoint of the workdir (the data iterator is set
  to its position), else train.init_from's weights with a fresh optimizer, else a fresh model."""
  start = checkpointer.latest_step()
  with jax.set_mesh(run.mesh):
    if start is not None:
      state, _ = checkpointer.restore(start, steps.abstract_state, iterator)
      return state, start, f'resumed from {checkpointer.directory / str(start)}'
    if run.init_ckpt is not None:
      _, params, _ = checkpoint_dir.restore_params(run.init_ckpt.step_dir, run.mesh, flag='train.init_from')
      return (
        init_state(run.config, steps, params),
        0,
        f'initialised from {run.init_ckpt.step_dir} (weights only, fresh optimizer)',
      )
  return init_state(run.config, steps), 0, 'initialised from scratch'


def _describe_compiled(steps: CompiledSteps) -> str | None:
  train, evaluate = steps.train.memory_analysis(), steps.eval.memory_analysis() if steps.eval else None
  if train is None:
    return None
  line = (
    f'compiled train step in {steps.train_seconds:.1f}s; per device: parameters+optimizer '
    f'{_format_bytes(train.argument_size_in_bytes)}, temporaries {_format_bytes(train.temp_size_in_bytes)}'
  )
  if evaluate is not None:
    line += f'; eval step temporaries {_format_bytes(evaluate.temp_size_in_bytes)}'
  return line


def train(config: config_dict.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains to config.train.steps (or until a stop signal); returns {'step', 'status', 'last_row', 'loop'} (loop:
  {'steps' run, 'host_seconds' the loop's own work took, 'idle_dispatches': steps dispatched after the previous
  one had finished, i.e. the device waited for the host})."""
  run = _prepare(config, workdir)
  t = config.train
  if run.finished_step is not None:  # a rerun of a finished run: nothing is compiled, evaluated or appended
    if run.is_main:
      print(f'{run.workdir} is already finished at step {run.finished_step} (train.steps={t.steps}): nothing to do')
    return {
      'step': run.finished_step,
      'status': 'finished',
      'last_row': None,
      'loop': {'steps': 0, 'host_seconds': 0.0, 'idle_dispatches': 0},
    }
  iterator = iter(
    loader.dataset(
      run.prepared.train,
      t.seq_len,
      t.batch_size,
      seed=t.seed,  # before compiling: a
      num_workers=config.data.num_workers,  # corpus too small for a
      rows=loader.Rows.of_process(run.mesh, t.batch_size),
    )
  )  # batch is refused at once
  steps = compile_steps(config, run.mesh, with_eval=run.prepared.heldout is not None)
  checkpointer = Checkpointer(
    run.workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save, is_main=run.is_main
  )
  try:
    state, start, message = _initial_state(run, steps, checkpointer, iterator)
    _write_run_files(run)
    if run.is_main:
      print(f'layerskip_jax {layerskip_jax.__version__}: {message}; {sharding.describe(run.mesh)}')
      compiled = _describe_compiled(steps)
      if compiled is not None:
        print(compiled)
    loop = _Loop(run, steps, checkpointer, iterator, start)
  except BaseException:
    checkpointer.close()
    raise
  try:
    state = loop.run(state)
    loop.finish(state)
  finally:
    loop.close()
  if run.is_main:
    print(f'{loop.status} at step {loop.step}; checkpoint {checkpointer.directory / str(loop.step)}')
  return {
    'step': loop.step,
    'status': loop.status,
    'last_row': loop.last_row,
    'loop': {'steps': loop.step - start, 'host_seconds': loop.host_seconds, 'idle_dispatches': loop.idle_dispatches},
  }


class _Loop:
  """Phases 4 and 5: the steps from `start` to train.steps (or a stop signal), then the last row, the final
  evaluation and checkpoint. Owns the checkpointer, the data feed (a Prefetcher over `iterator`, positioned at
  `start`) and the metrics writer, and closes them."""

  def __init__(self, run: _Run, steps: CompiledSteps, checkpointer: Checkpointer, iterator, start: int):
    self.setup, self.steps, self.checkpointer = run, steps, checkpointer
    config, t = run.config, run.config.train
    self.config, self.t = config, t
    self.step = self.last_saved = self.checked = start
    self.status, self.last_row = 'finished', None
    self.pending = None  # (step, metrics on device) of the last log step, its row not yet written
    self.latest = None  # (step, metrics on device) of the last dispatched step
    self.metrics_writer = MetricsWriter(
      run.workdir, config.logging, resume_step=start, enabled=run.is_main, run_config=config.to_dict()
    )
    # The schedule is evaluated once here: evaluated per row on the device, it would queue behind the steps.
    self.learning_rates = np.asarray(jax.jit(jax.vmap(learning_rate_schedule(t)))(np.arange(t.steps)))
    self.flops_per_step = (
      train_flops_per_token(ModelConfig.from_config(config.model), t.seq_len) * t.batch_size * t.seq_len
    )
    self.peak = t.peak_tflops * 1e12 * jax.device_count()
    self.profiler = _Profiler(config.logging.profile_steps, run.workdir / 'tb', enabled=run.is_main)
    self.progress = tqdm(
      total=t.steps,
      initial=start,
      desc='train',
      unit='step',
      dynamic_ncols=True,
      disable=not (run.is_main and config.logging.progress_bar),
      mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )  # a log file gets a line every 30 s
    self.last_log = (time.perf_counter(), start)  # (time, step) of the last row: step_time averages since then
    # What the loop costs the device (train.bench --what loop): host seconds per step outside waits for the device
    # (evaluations and saves excluded), and steps dispatched only after the previous one had finished.
    self.host_seconds, self.idle_dispatches = 0.0, 0
    self.iterator = iterator
    # last: its thread starts here
    self.feed = loader.Prefetcher(iterator, run.mesh, config.data.prefetch, iterator.rows)

  def run(self, state: TrainState) -> TrainState:
    t, every = self.t, self.config.checkpoint.every_steps
    check_every = 1 if jax.process_count() == 1 else self.config.checkpoint.preemption_check_every
    with _StopRequest() as stop:
      while self.step < t.steps:
        begin = time.perf_counter()
        if self.step % check_every == 0 and stop.agreed():
          self.status = 'preempted'
          break
        self.profiler.before_step(self.step + 1)
        batch = self.feed.next()
        self.idle_dispatches += self.latest is not None and self.latest[1]['loss'].is_ready()
        state, metrics = self.steps.train(state, batch, jnp.int32(self.step))
        self.step += 1
        self.host_seconds += time.perf_counter() - begin
        self._write_pending()  # the previous log step's row, now that this step is queued behind it
        self.latest = (self.step, metrics)
        if self.step % t.log_every == 0 or self.step == t.steps:
          self.pending = self.latest
        self.profiler.after_step(self.step, state)
        evaluate = t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps
        save = self.step % every == 0 and self.step < t.steps
        if evaluate or save:
          self._write_pending()  # the train row before the held-out row, and its loss checked before a save
        self.progress.update(1)
        if evaluate:
          self._evaluate(state)
          self.last_log = (time.perf_counter(), self.step)  # evaluation time is not step time
        if save:
          self._save(state)
    return state

  def finish(self, state: TrainState) -> None:
    self._write_pending()
    if self.status == 'finished':
      self._evaluate(state)
    if self.last_saved != self.step:
      self._save(state)
    self.checkpointer.wait()

  def close(self) -> None:
    self.profiler.stop()
    self.progress.close()
    self.feed.close()
    self.iterator.close()
    self.checkpointer.close()
    self.metrics_writer.close()

  def _check_finite(self, step: int, loss: float) -> None:
    if not math.isfinite(loss):
      raise NonFiniteLoss(
        f'non-finite loss ({loss}) at step {step}; stopped without saving: the last good '
        f'checkpoint is step {self.checkpointer.latest_step()}'
      )
    self.checked = step

  def _write_pending(self) -> None:
    """Fetches the pending log step's metrics (waiting for that step, not for the one queued after it), checks
    its loss and writes its row."""
    if self.pending is None:
      return
    step, metrics = self.pending
    self.pending = None
    metrics = jax.device_get(metrics)
    now = time.perf_counter()
    step_time, self.last_log = (now - self.last_log[0]) / (step - self.last_log[1]), (now, step)
    self._check_finite(step, float(metrics['loss']))
    row = self.metrics_writer.write(
      {
        'step': step,
        'loss': metrics['loss'],
        'ce_last': metrics['ce_last'],
        'exit_ce': metrics['exit_ce'],
        'grad_norm': metrics['grad_norm'],
        'learning_rate': float(self.learning_rates[step - 1]),
        'tokens_per_sec': float(metrics['tokens']) / step_time,
        'step_time': step_time,
        'mfu': self.flops_per_step / step_time / self.peak,
      }
    )
    self.last_row = row
    self.progress.set_postfix(
      loss=f'{row["loss"]:.3f}', ce_last=f'{row["ce_last"]:.3f}', tok_s=f'{row["tokens_per_sec"]:.0f}', refresh=False
    )
    if self.progress.disable and self.setup.is_main:
      print(
        f'step {step}/{self.t.steps} loss {row["loss"]:.4f} ce_last {row["ce_last"]:.4f} '
        f'{row["tokens_per_sec"]:.0f} tok/s',
        flush=True,
      )
    self.host_seconds += time.perf_counter() - now  # the row's own work, after the wait for its step
    self.checkpointer.check()  # a failed background save stops the run now, not at the next save

  def _save(self, state: TrainState) -> None:
    """Checkpoints the state after self.step, with the data position after the last batch trained on. The step's
    loss is checked first (a blocking fetch, as the save's own copy is), so a non-finite update is never saved."""
    if self.latest is not None and self.checked != self.step:
      self._check_finite(self.step, float(jax.device_get(self.latest[1]['loss'])))
    self.checkpointer.save(
      self.step,
      state,
      self.feed.iterator_state(),
      {
        'step': self.step,
        'versions': {'layerskip_jax': layerskip_jax.__version__, 'jax': jax.__version__, 'flax': flax.__version__},
      },
    )
    self.last_saved = self.step

  def _evaluate(self, state: TrainState) -> None:
    """Held-out statistics of every exit over train.eval_batches batches of train.batch_size sequences (the
    same sequences at every evaluation), each run as grad_accum_steps microbatches of the train step's size: the
    eval step needs no more memory than the train step. Writes (and prints) the held-out row."""
    run, t = self.setup, self.t
    if run.prepared.heldout is None:
      return
    micro = eval_batch_size(self.config)
    outputs = []
    held = loader.Rows.of_process(run.mesh, t.batch_size, t.grad_accum_steps)  # each microbatch sharded
    batches = loader.dataset(run.prepared.heldout, t.seq_len, t.batch_size, shuffle=False, repeat=False, rows=held)
    for i, batch in enumerate(batches):
      if i >= t.eval_batches:
        break
      for m in range(t.grad_accum_steps):
        where, rows = held.slice(m * micro, (m + 1) * micro)
        microbatch = {k: v[where] for k, v in batch.items()}
        outputs.append(self.steps.eval(state.params, loader.to_global_array(microbatch, run.mesh, rows)))
    if not outputs:
      return
    outputs = jax.device_get(outputs)  # once, after every microbatch is queued
    totals = outputs[0]
    for out in outputs[1:]:
      totals = jax.tree.map(np.add, totals, out)
    row = self.metrics_writer.write({'split': 'heldout', 'step': self.step, **summarize_exits(totals)})
    if run.is_main:
      self.progress.write(_eval_line(row))


def _eval_line(row: dict) -> str:
  ce = ' '.join(f'{v:.2f}' for v in row['exit_ce'])
  return f'heldout step {row["step"]}: cross-entropy per exit (1..L): {ce}'

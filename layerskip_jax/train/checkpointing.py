"""Training checkpoints: an Orbax CheckpointManager over WORKDIR/checkpoints with the items of interfaces.md,
`state` ({'params', 'opt_state'}), `data_iter` (the grain iterator's state) and `meta` (step, versions).

Saves are asynchronous (the device arrays are copied before `save` returns, so the train step may donate them);
restoring takes an abstract state carrying the target shardings, so a run saved on one mesh resumes on another.

The trainer's state is a `TrainState`; on disk it stays the dict {'params', 'opt_state'}, converted here, so
checkpoints of every version restore. The data item is written from a recorded iterator state, not from the
iterator: a prefetching loader has read ahead of the last batch trained on, and the checkpoint must hold the
position after that batch. The files are the ones grain's own handler writes (process_<i>-of-<n>.json, one per
process). The loader's state is the position in the global stream, the same on every process, so a restore reads
the file of the lowest process whatever the number of processes now (a run saved on 2 hosts resumes on 1 or 4);
checkpoints of earlier versions, whose per-process files also held one and the same state, restore the same way.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import sys
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from layerskip_jax import outputs
from layerskip_jax.checkpoint_dir import CHECKPOINTS_SUBDIR, DATA_ITER_ITEM, META_ITEM, STATE_ITEM, steps
from layerskip_jax.errors import UsageError, one_line
from layerskip_jax.train.state import TrainState


class _RecordedIteratorState:
  """What grain's CheckpointHandler saves for an iterator, from a state recorded earlier (iterator.get_state()).
  The handler writes `get_state()` of a non-DatasetIterator item as text (its bytes decoded); these are the bytes
  it writes for a DatasetIterator in that state, so either kind of checkpoint restores into the iterator."""

  def __init__(self, state: dict[str, Any]):
    self._state = state

  def get_state(self) -> bytes:
    return json.dumps(self._state, indent=4).encode()


TMP_DIR_SUFFIX = '.orbax-checkpoint-tmp'  # what Orbax appends to a step's name until the step is finished


class CheckpointWriteError(Exception):
  """A checkpoint could not be written (a full disk, a quota, a lost mount). The message is one line: the path,
  the OS error and the last good checkpoint, which is left intact."""


def _os_error(e: BaseException) -> OSError | None:
  """The OSError behind an Orbax/tensorstore failure (a chain of causes, or only its message for tensorstore)."""
  seen = e
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno:
      return seen
    seen = seen.__cause__ or seen.__context__
  text = str(e)
  for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS, errno.EIO):
    if os.strerror(code) in text or errno.errorcode[code] in text:
      return OSError(code, os.strerror(code))
  return None


class Checkpointer:
  def __init__(self, workdir: str | pathlib.Path, *, keep: int, async_save: bool = True, is_main: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / CHECKPOINTS_SUBDIR
    # An interrupted save (kill -9, a second Ctrl-C, a full disk) leaves STEP.orbax-checkpoint-tmp-*: never a
    # finished step (steps() ignores it); Orbax removes it here, and the console says so.
    stale = sorted(p.name for p in self.directory.glob(f'*{TMP_DIR_SUFFIX}*')) if self.directory.is_dir() else []
    if stale and is_main:
      print(
        f'removing {len(stale)} unfinished checkpoint(s) left by an interrupted save in {self.directory}: '
        f'{", ".join(stale)}',
        file=sys.stderr,
      )
    # create=False: nothing is written into the workdir until the first save (a run refused while it restores
    # train.init_from leaves no trace); Orbax makes the directory then.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, create=False, cleanup_tmp_directories=True
    )
    handlers = {
      STATE_ITEM: ocp.StandardCheckpointHandler(),
      META_ITEM: ocp.JsonCheckpointHandler(),
      DATA_ITER_ITEM: grain.checkpoint.CheckpointHandler(),
    }
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._last: int | None = None  # the step of the last save started (it may still be committing)

  def latest_step(self) -> int | None:
    finished = steps(self.directory.parent)
    return finished[-1] if finished else None

  def save(self, step: int, state: TrainState, iterator_state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Saves `state` with the data position `iterator_state` (get_state() of the iterator after the last batch
    trained on). A failed write (this one, or the previous asynchronous one, which Orbax reports here) raises
    CheckpointWriteError."""
    with self._write_errors(step):
      self.manager.save(
        step,
        args=ocp.args.Composite(
          **{
            STATE_ITEM: ocp.args.StandardSave(state.to_tree()),
            DATA_ITER_ITEM: grain.checkpoint.CheckpointSave(_RecordedIteratorState(iterator_state)),
            META_ITEM: ocp.args.JsonSave(meta),
          }
        ),
        force=True,
      )
    self._last = step

  @contextlib.contextmanager
  def _write_errors(self, step: int):
    try:
      yield
    except Exception as e:  # noqa: BLE001 Orbax wraps I/O errors of its threads in many types
      cause = _os_error(e)
      if cause is None:
        raise
      # Orbax reports a failed asynchronous save at the next call: the failed step is the last one started
      # unless that one finished, then `step`.
      finished = steps(self.directory.parent)
      failed = self._last if self._last is not None and self._last not in finished else step
      last_good = [s for s in finished if s != failed]
      good = f'step {last_good[-1]} ({self.directory / str(last_good[-1])})' if last_good else 'none'
      raise CheckpointWriteError(
        f'checkpoint step {failed} could not be written to {cause.filename or self.directory / str(failed)}: '
        f'{outputs.describe_os_error(cause)}; the last good checkpoint is {good}, left intact: free space (or fix '
        'the file system) and run the same command to resume from it'
      ) from None

  def restore(self, step: int, abstract_state: TrainState, iterator: grain.DatasetIterator) -> tuple[TrainState, dict]:
    """(state, meta) at `step`; the iterator is set to its saved position. A checkpoint that is unreadable or
    does not match the config is refused with the step named, and left as it is."""
    abstract_tree = abstract_state.to_tree()
    try:
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
          **{STATE_ITEM: ocp.args.StandardRestore(abstract_tree), META_ITEM: ocp.args.JsonRestore()}
        ),
      )
      iterator.set_state(self._data_state(step))
    except Exception as e:  # Orbax and tensorstore raise many types for a damaged or mismatched checkpoint
      raise UsageError(
        f'checkpoint {self.directory / str(step)} cannot be restored: it is corrupt or does not '
        f'match the config ({one_line(e, 240)}); it was left untouched: move it '
        'away to resume from an earlier step, or use a new workdir'
      ) from None
    for got, want in zip(jax.tree.leaves(restored[STATE_ITEM]), jax.tree.leaves(abstract_tree)):
      if got.shape != want.shape:
        raise UsageError(
          f'checkpoint {self.directory / str(step)} holds an array of shape {got.shape} where the '
          f'config implies {want.shape}: it was written for another model'
        )
    return TrainState.from_tree(restored[STATE_ITEM]), dict(restored[META_ITEM])

  def _data_state(self, step: int) -> dict[str, Any]:
    """The data iterator's state saved at `step`: the file of the lowest process (every process saved the same)."""
    files = sorted(
      self.directory.joinpath(str(step), DATA_ITER_ITEM).glob('process_*-of-*.json'),
      key=lambda p: int(p.name.split('_')[1].split('-')[0]),
    )
    if not files:
      raise FileNotFoundError(f'no process_<i>-of-<n>.json in {self.directory / str(step) / DATA_ITER_ITEM}')
    return json.loads(files[0].read_text())

  def check(self) -> None:
    """Raises CheckpointWriteError if an asynchronous save has failed (cheap: no wait)."""
    if self._last is not None:
      with self._write_errors(self._last):
        self.manager.check_for_errors()

  def wait(self) -> None:
    with self._write_errors(self._last or 0):
      self.manager.wait_until_finished()

  def close(self) -> None:
    with self._write_errors(self._last or 0):
      self.manager.close()

"""Training checkpoints: an Orbax CheckpointManager over WORKDIR/checkpoints with the items of interfaces.md,
`state` ({'params', 'opt_state'}), `data_iter` (the grain iterator's state) and `meta` (step, versions).

Saves are asynchronous (the device arrays are copied before `save` returns, so the train step may donate them);
restoring takes an abstract state carrying the target shardings, so a run saved on one mesh resumes on another.

The trainer's state is a `TrainState`; on disk it stays the dict {'params', 'opt_state'}, converted here, so
checkpoints of every version restore. The data item is written from a recorded iterator state, not from the
iterator: a prefetching loader has read ahead of the last batch trained on, and the checkpoint must hold the
position after that batch. The file is the one grain's own handler writes (process_<i>-of-<n>.json), and it is
read back by that handler into the live iterator.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from layerskip_jax.checkpoint_dir import CHECKPOINTS_SUBDIR, DATA_ITER_ITEM, META_ITEM, STATE_ITEM, steps
from layerskip_jax.errors import UsageError
from layerskip_jax.train.state import TrainState


class _RecordedIteratorState:
  """What grain's CheckpointHandler saves for an iterator, from a state recorded earlier (iterator.get_state()).
  The handler writes `get_state()` of a non-DatasetIterator item as text (its bytes decoded); these are the bytes
  it writes for a DatasetIterator in that state, so either kind of checkpoint restores into the iterator."""

  def __init__(self, state: dict[str, Any]):
    self._state = state

  def get_state(self) -> bytes:
    return json.dumps(self._state, indent=4).encode()


class Checkpointer:

  def __init__(self, workdir: str | pathlib.Path, *, keep: int, async_save: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / CHECKPOINTS_SUBDIR
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(), META_ITEM: ocp.JsonCheckpointHandler(),
                DATA_ITER_ITEM: grain.checkpoint.CheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    finished = steps(self.directory.parent)
    return finished[-1] if finished else None

  def save(self, step: int, state: TrainState, iterator_state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Saves `state` with the data position `iterator_state` (get_state() of the iterator after the last batch
    trained on)."""
    self.manager.save(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state.to_tree()),
        DATA_ITER_ITEM: grain.checkpoint.CheckpointSave(_RecordedIteratorState(iterator_state)),
        META_ITEM: ocp.args.JsonSave(meta)}), force=True)

  def restore(self, step: int, abstract_state: TrainState, iterator: grain.DatasetIterator
              ) -> tuple[TrainState, dict]:
    """(state, meta) at `step`; the iterator is set to its saved position. A checkpoint that is unreadable or
    does not match the config is refused with the step named, and left as it is."""
    abstract_tree = abstract_state.to_tree()
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardRestore(abstract_tree),
          DATA_ITER_ITEM: grain.checkpoint.CheckpointRestore(iterator),
          META_ITEM: ocp.args.JsonRestore()}))
    except Exception as e:  # Orbax and tensorstore raise many types for a damaged or mismatched checkpoint
      raise UsageError(f'checkpoint {self.directory / str(step)} cannot be restored: it is corrupt or does not '
                       f'match the config ({" ".join(str(e).split())[:240]}); it was left untouched: move it '
                       'away to resume from an earlier step, or use a new workdir') from None
    for got, want in zip(jax.tree.leaves(restored[STATE_ITEM]), jax.tree.leaves(abstract_tree)):
      if got.shape != want.shape:
        raise UsageError(f'checkpoint {self.directory / str(step)} holds an array of shape {got.shape} where the '
                         f'config implies {want.shape}: it was written for another model')
    return TrainState.from_tree(restored[STATE_ITEM]), dict(restored[META_ITEM])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

"""Training checkpoints: an Orbax CheckpointManager over WORKDIR/checkpoints with the items of interfaces.md,
`state` ({'params', 'opt_state'}), `data_iter` (the grain iterator) and `meta` (step, versions).

Saves are asynchronous (the device arrays are copied before `save` returns, so the train step may donate them);
restoring takes an abstract state carrying the target shardings, so a run saved on one mesh resumes on another.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from layerskip_jax.checkpoint_dir import CHECKPOINTS_SUBDIR, DATA_ITER_ITEM, META_ITEM, STATE_ITEM, steps
from layerskip_jax.errors import UsageError


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

  def save(self, step: int, state: Any, iterator: grain.DatasetIterator, meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state),
        DATA_ITER_ITEM: grain.checkpoint.CheckpointSave(iterator),
        META_ITEM: ocp.args.JsonSave(meta)}), force=True)

  def restore(self, step: int, abstract_state: Any, iterator: grain.DatasetIterator) -> tuple[Any, dict]:
    """(state, meta) at `step`; the iterator is set to its saved position. A checkpoint that is unreadable or
    does not match the config is refused with the step named, and left as it is."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**{
          STATE_ITEM: ocp.args.StandardRestore(abstract_state),
          DATA_ITER_ITEM: grain.checkpoint.CheckpointRestore(iterator),
          META_ITEM: ocp.args.JsonRestore()}))
    except Exception as e:  # Orbax and tensorstore raise many types for a damaged or mismatched checkpoint
      raise UsageError(f'checkpoint {self.directory / str(step)} cannot be restored: it is corrupt or does not '
                       f'match the config ({" ".join(str(e).split())[:240]}); it was left untouched: move it '
                       'away to resume from an earlier step, or use a new workdir') from None
    for got, want in zip(jax.tree.leaves(restored[STATE_ITEM]), jax.tree.leaves(abstract_state)):
      if got.shape != want.shape:
        raise UsageError(f'checkpoint {self.directory / str(step)} holds an array of shape {got.shape} where the '
                         f'config implies {want.shape}: it was written for another model')
    return restored[STATE_ITEM], dict(restored[META_ITEM])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

"""The one resolver of checkpoint directories (interfaces.md), used by every command that takes a checkpoint.

    DIR/layerskip_config.json       the resolved config
    DIR/tokenizer.model | DIR/tokenizer.json   optional
    DIR/checkpoints/<step>/         Orbax CheckpointManager steps (items: state, data_iter, meta)
    DIR/metrics.jsonl, DIR/tb/      training runs only

`resolve` accepts DIR (its latest step) or DIR/checkpoints/<step> (that step).
"""

from __future__ import annotations

import dataclasses
import pathlib

from layerskip_jax.config import CONFIG_FILE_NAME
from layerskip_jax.errors import UsageError

CHECKPOINTS_SUBDIR = 'checkpoints'
TOKENIZER_FILES = ('tokenizer.model', 'tokenizer.json')


@dataclasses.dataclass(frozen=True)
class CheckpointDir:
  root: pathlib.Path  # DIR
  step: int  # the resolved step

  @property
  def config_path(self) -> pathlib.Path:
    return self.root / CONFIG_FILE_NAME

  @property
  def step_dir(self) -> pathlib.Path:
    return self.root / CHECKPOINTS_SUBDIR / str(self.step)

  @property
  def tokenizer_path(self) -> pathlib.Path | None:
    """The tokenizer file saved with the checkpoint, or None (sentencepiece preferred when both exist)."""
    for name in TOKENIZER_FILES:
      if (self.root / name).is_file():
        return self.root / name
    return None


def steps(root: str | pathlib.Path) -> list[int]:
  """The finished steps under ROOT/checkpoints, ascending. Orbax writes a step to a temporary name and renames it
  when complete, so only directories named by an integer count."""
  directory = pathlib.Path(root) / CHECKPOINTS_SUBDIR
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def resolve(path: str | pathlib.Path) -> CheckpointDir:
  """DIR -> its latest step; DIR/checkpoints/<step> -> that step. Raises UsageError naming what is missing."""
  path = pathlib.Path(path).expanduser()
  if path.name.isdigit() and path.parent.name == CHECKPOINTS_SUBDIR:
    root, step = path.parent.parent, int(path.name)
  else:
    root, step = path, None
  if not root.is_dir():
    raise UsageError(f'--ckpt={path}: no such directory')
  if not (root / CONFIG_FILE_NAME).is_file():
    raise UsageError(f'--ckpt={path}: not a layerskip_jax checkpoint directory (no {CONFIG_FILE_NAME} in {root}); '
                     'give a training workdir or a directory written by `convert import_hf`')
  available = steps(root)
  if step is None:
    if not available:
      raise UsageError(f'--ckpt={path}: {root / CHECKPOINTS_SUBDIR} holds no finished checkpoint step')
    step = available[-1]
  elif step not in available:
    raise UsageError(f'--ckpt={path}: step {step} is not a finished checkpoint; available steps: {available}')
  return CheckpointDir(root=root, step=step)

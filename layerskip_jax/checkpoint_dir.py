"""The one resolver of checkpoint directories (interfaces.md), used by every command that takes a checkpoint.

    DIR/layerskip_config.json       the resolved config
    DIR/tokenizer.model | DIR/tokenizer.json   optional
    DIR/checkpoints/<step>/         Orbax CheckpointManager steps (items: state, data_iter, meta)
    DIR/metrics.jsonl, DIR/tb/      training runs only

`resolve` accepts DIR (its latest step) or DIR/checkpoints/<step> (that step). `restore_model` builds the model
from any such directory (a training workdir or a converted checkpoint: the parameter tree paths are the same);
`write_params_dir` writes a parameters-only directory (one step, 0) atomically (outputs.atomic_directory).
"""

from __future__ import annotations

import dataclasses
import os
import re
import pathlib
from collections.abc import Callable
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from ml_collections import config_dict

import layerskip_jax
from layerskip_jax import config as config_lib, outputs
from layerskip_jax.config import CONFIG_FILE_NAME
from layerskip_jax.errors import UsageError, one_line
from layerskip_jax.model import ModelConfig, Transformer, abstract
from layerskip_jax.sharding import param_shardings, single_device_mesh

STATE_ITEM, DATA_ITER_ITEM, META_ITEM = 'state', 'data_iter', 'meta'  # Orbax items of a step (interfaces.md)

CHECKPOINTS_SUBDIR = 'checkpoints'
TOKENIZER_FILES = ('tokenizer.model', 'tokenizer.json')
# What else a checkpoint directory may hold: tokenizer side files, and a training run's metrics and TensorBoard events.
RUN_FILES = (
  *TOKENIZER_FILES,
  'tokenizer_config.json',
  'generation_config.json',
  'special_tokens_map.json',
  'metrics.jsonl',
  'tb',
)


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
  def parts(self) -> list[pathlib.Path]:
    """What the checkpoint directory is made of (config, steps, tokenizer files, a run's metrics), present or not:
    an output may be written beside them, as launch/local.sh writes RUN/eval.json, never over them
    (outputs.check_file inputs)."""
    return [self.config_path, self.root / CHECKPOINTS_SUBDIR, *(self.root / name for name in RUN_FILES)]

  def read_config(self, flag: str = '--ckpt') -> config_dict.ConfigDict:
    """The saved config; a damaged or invalid one is one line naming `flag` and the file."""
    try:
      return config_lib.from_json(self.config_path)
    except config_lib.ConfigError as e:
      raise UsageError(f'{flag}={self.root}: {str(e).removeprefix(f"{self.root}{os.sep}")}') from None

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


def resolve(path: str | pathlib.Path, flag: str = '--ckpt') -> CheckpointDir:
  """DIR -> its latest step; DIR/checkpoints/<step> -> that step. Raises UsageError naming `flag` (the flag or
  config key the user gave: --ckpt, --compare, train.init_from) and what is missing."""
  path = pathlib.Path(path).expanduser()
  if path.name.isdigit() and path.parent.name == CHECKPOINTS_SUBDIR:
    root, step = path.parent.parent, int(path.name)
  else:
    root, step = path, None
  if root.exists() and not root.is_dir():
    raise UsageError(f'{flag}={path}: is a file; give a checkpoint directory (DIR or DIR/checkpoints/<step>)')
  if not root.is_dir():
    raise UsageError(f'{flag}={path}: no such directory')
  if not (root / CONFIG_FILE_NAME).is_file():
    raise UsageError(
      f'{flag}={path}: not a layerskip_jax checkpoint directory (no {CONFIG_FILE_NAME} in {root}); '
      'give a training workdir or a directory written by `convert import_hf`'
    )
  available = steps(root)
  if step is None:
    if not available:
      raise UsageError(f'{flag}={path}: {root / CHECKPOINTS_SUBDIR} holds no finished checkpoint step')
    step = available[-1]
  elif step not in available:
    raise UsageError(f'{flag}={path}: step {step} is not a finished checkpoint; available steps: {available}')
  return CheckpointDir(root=root.absolute(), step=step)  # absolute: Orbax refuses relative paths


# tensorstore reports a failure as a status: 'OUT_OF_RANGE: Error reading ...' (a file cut short), 'DATA_LOSS: ...'
# (a checksum or format error); other statuses (RESOURCE_EXHAUSTED, PERMISSION_DENIED, ...) are not damage.
_STORAGE_ERROR = re.compile(r'[A-Z][A-Z_]+: ')
_DAMAGED = re.compile(r'(OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION|NOT_FOUND): ')


def _storage_status(e: BaseException | None) -> str | None:
  """The tensorstore status message behind an error (Orbax raises its own exception from it), or None."""
  while e is not None:
    if _STORAGE_ERROR.match(str(e)):
      return str(e)
    e = e.__cause__ or e.__context__
  return None


def _meta(step: int, **extra: Any) -> dict[str, Any]:
  return {
    'step': step,
    'versions': {'layerskip_jax': layerskip_jax.__version__, 'jax': jax.__version__, 'flax': flax.__version__},
    **extra,
  }


def write_params_dir(
  out: str | pathlib.Path,
  config: config_dict.ConfigDict,
  params: dict[str, Any],
  *,
  overwrite: bool = False,
  extra_files: dict[str, Callable[[pathlib.Path], None]] | None = None,
  meta: dict[str, Any] | None = None,
  inputs: dict[str, Any] | None = None,
) -> pathlib.Path:
  """Writes a parameters-only checkpoint directory: config, step 0 holding {'params': params}, extra files.

  `params` is the model's pure parameter dict (nnx.to_pure_dict of its Param state), numpy or jax arrays.
  `extra_files` maps a file name to a function writing it (tokenizers); `inputs` ({flag: path}) are what the
  directory is made from, which it must not replace (outputs.check_dir).
  """
  with outputs.atomic_directory(out, kind=outputs.CHECKPOINT, inputs=inputs or {}, overwrite=overwrite) as tmp:
    config_lib.save(config, tmp)
    for name, write in (extra_files or {}).items():
      write(tmp / name)
    # Orbax deep-copies numpy arrays before writing them, and compression holds every compressed chunk until the
    # commit: each is another copy of the model (and float weights barely compress). Neither is needed here.
    registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
      (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    handlers = {
      STATE_ITEM: ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False),
      META_ITEM: ocp.JsonCheckpointHandler(),
    }
    with ocp.CheckpointManager(tmp / CHECKPOINTS_SUBDIR, item_handlers=handlers) as manager:
      manager.save(
        0,
        args=ocp.args.Composite(
          **{
            STATE_ITEM: ocp.args.PyTreeSave({'params': params}),
            META_ITEM: ocp.args.JsonSave(_meta(0, **(meta or {}))),
          }
        ),
      )
      manager.wait_until_finished()
  return pathlib.Path(out)


def abstract_params(model_config: ModelConfig, mesh: jax.sharding.Mesh | None = None):
  """(graphdef, abstract pure parameter dict) of the model; leaves carry shardings on `mesh` (or device 0)."""
  graphdef, state = nnx.split(abstract(model_config))
  shardings = nnx.to_pure_dict(param_shardings(state, mesh or single_device_mesh()))
  shapes = nnx.to_pure_dict(state)
  return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def restore_params(
  path: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None, *, host: bool = False, flag: str = '--ckpt'
) -> tuple[config_dict.ConfigDict, dict[str, Any], CheckpointDir]:
  """(config, pure parameter dict, resolved directory) from a checkpoint directory.

  Parameters land on `mesh` (default: device 0), or in host numpy arrays with `host=True` (for export: no device
  copy). Works for training workdirs (whose state also holds the optimizer state: only params are read) and for
  converted checkpoints alike. Errors name `flag` (as resolve) and the step directory.
  """
  ckpt = resolve(path, flag)
  config = ckpt.read_config(flag)
  _, target = abstract_params(ModelConfig.from_config(config.model), mesh)
  if host:
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
    restore_args = jax.tree.map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray, dtype=a.dtype), target)
  else:
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  # Reading at most ~1 GB at a time bounds the host buffers next to the restored model.
  handlers = {STATE_ITEM: ocp.PyTreeCheckpointHandler(restore_concurrent_gb=1)}
  try:
    with ocp.CheckpointManager(ckpt.root / CHECKPOINTS_SUBDIR, item_handlers=handlers) as manager:
      restored = manager.restore(
        ckpt.step,
        args=ocp.args.Composite(
          **{
            STATE_ITEM: ocp.args.PyTreeRestore(
              item={'params': target}, restore_args={'params': restore_args}, partial_restore=True
            )
          }
        ),
      )
  except Exception as e:  # noqa: BLE001 Orbax wraps tensorstore's statuses in several types
    status = _storage_status(e)
    if status is not None and _DAMAGED.match(status):
      raise UsageError(
        f'{flag}={path}: {ckpt.step_dir} cannot be read: it is truncated or damaged '
        f'({one_line(status, 200)}); restore it from a copy, or give an earlier step '
        '(DIR/checkpoints/<step>)'
      ) from None
    if status is not None or not isinstance(e, (ValueError, KeyError)):
      raise  # out of memory, permission, I/O: not the checkpoint's fault, not to be called damage
    raise UsageError(
      f'{flag}={path}: the parameters in {ckpt.step_dir} do not match {ckpt.config_path.name} ({one_line(e, 200)})'
    ) from None
  params = restored[STATE_ITEM]['params']
  for key_path, want in jax.tree_util.tree_leaves_with_path(target):
    got = params
    for key in key_path:
      got = got[key.key]
    if tuple(got.shape) != tuple(want.shape):
      name = '/'.join(str(k.key) for k in key_path)
      raise UsageError(
        f'{flag}={path}: parameter {name} has shape {tuple(got.shape)}, but {ckpt.config_path.name} '
        f'implies {tuple(want.shape)}'
      )
  return config, params, ckpt


def restore_model(
  path: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None, *, flag: str = '--ckpt'
) -> tuple[config_dict.ConfigDict, Transformer, CheckpointDir]:
  """(config, model, resolved directory) from a checkpoint directory; parameters placed on `mesh` (or device 0)."""
  config, params, ckpt = restore_params(path, mesh, flag=flag)
  graphdef, state = nnx.split(abstract(ModelConfig.from_config(config.model)))
  nnx.replace_by_pure_dict(state, params)
  return config, nnx.merge(graphdef, state), ckpt

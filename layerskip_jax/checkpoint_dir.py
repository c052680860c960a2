"""The one resolver of checkpoint directories (interfaces.md), used by every command that takes a checkpoint.

    DIR/layerskip_config.json       the resolved config
    DIR/tokenizer.model | DIR/tokenizer.json   optional
    DIR/checkpoints/<step>/         Orbax CheckpointManager steps (items: state, data_iter, meta)
    DIR/metrics.jsonl, DIR/tb/      training runs only

`resolve` accepts DIR (its latest step) or DIR/checkpoints/<step> (that step). `restore_model` builds the model
from any such directory (a training workdir or a converted checkpoint: the parameter tree paths are the same);
`write_params_dir` writes a parameters-only directory (one step, 0) atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from ml_collections import config_dict

import layerskip_jax
from layerskip_jax import config as config_lib
from layerskip_jax.config import CONFIG_FILE_NAME
from layerskip_jax.errors import UsageError
from layerskip_jax.model import ModelConfig, Transformer, abstract
from layerskip_jax.sharding import param_shardings, single_device_mesh

STATE_ITEM, DATA_ITER_ITEM, META_ITEM = 'state', 'data_iter', 'meta'  # Orbax items of a step (interfaces.md)

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
  return CheckpointDir(root=root.absolute(), step=step)  # absolute: Orbax refuses relative paths


@contextlib.contextmanager
def atomic_directory(out: str | pathlib.Path, overwrite: bool) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling of `out` to fill; renames it to `out` only if the block succeeds.

  An existing `out` is an error unless `overwrite`; a failure leaves neither a half-written `out` nor the
  temporary directory behind.
  """
  out = pathlib.Path(out).expanduser().absolute()
  if out.exists() and not overwrite:
    raise UsageError(f'--out={out}: already exists; pass --overwrite to replace it')
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f'.{out.name}.tmp-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    yield tmp
    if out.exists():
      shutil.rmtree(out)
    tmp.rename(out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _meta(step: int, **extra: Any) -> dict[str, Any]:
  return {'step': step, 'versions': {'layerskip_jax': layerskip_jax.__version__, 'jax': jax.__version__,
                                     'flax': flax.__version__}, **extra}


def write_params_dir(out: str | pathlib.Path, config: config_dict.ConfigDict, params: dict[str, Any], *,
                     overwrite: bool = False, extra_files: dict[str, Callable[[pathlib.Path], None]] | None = None,
                     meta: dict[str, Any] | None = None) -> pathlib.Path:
  """Writes a parameters-only checkpoint directory: config, step 0 holding {'params': params}, extra files.

  `params` is the model's pure parameter dict (nnx.to_pure_dict of its Param state), numpy or jax arrays.
  `extra_files` maps a file name to a function writing it (tokenizers).
  """
  with atomic_directory(out, overwrite) as tmp:
    config_lib.save(config, tmp)
    for name, write in (extra_files or {}).items():
      write(tmp / name)
    # Orbax deep-copies numpy arrays before writing them, and compression holds every compressed chunk until the
    # commit: each is another copy of the model (and float weights barely compress). Neither is needed here.
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()))
    handlers = {STATE_ITEM: ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False),
                META_ITEM: ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(tmp / CHECKPOINTS_SUBDIR, item_handlers=handlers) as manager:
      manager.save(0, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.PyTreeSave({'params': params}),
                                                 META_ITEM: ocp.args.JsonSave(_meta(0, **(meta or {})))}))
      manager.wait_until_finished()
  return pathlib.Path(out)


def abstract_params(model_config: ModelConfig, mesh: jax.sharding.Mesh | None = None):
  """(graphdef, abstract pure parameter dict) of the model; leaves carry shardings on `mesh` (or device 0)."""
  graphdef, state = nnx.split(abstract(model_config))
  shardings = nnx.to_pure_dict(param_shardings(state, mesh or single_device_mesh()))
  shapes = nnx.to_pure_dict(state)
  return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def restore_params(path: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None, *, host: bool = False
                   ) -> tuple[config_dict.ConfigDict, dict[str, Any], CheckpointDir]:
  """(config, pure parameter dict, resolved directory) from a checkpoint directory.

  Parameters land on `mesh` (default: device 0), or in host numpy arrays with `host=True` (for export: no device
  copy). Works for training workdirs (whose state also holds the optimizer state: only params are read) and for
  converted checkpoints alike.
  """
  ckpt = resolve(path)
  config = config_lib.from_json(ckpt.config_path)
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
      restored = manager.restore(ckpt.step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.PyTreeRestore(
          item={'params': target}, restore_args={'params': restore_args}, partial_restore=True)}))
  except (ValueError, KeyError) as e:
    raise UsageError(f'--ckpt={path}: parameters do not match {ckpt.config_path.name} '
                     f'({" ".join(str(e).split())[:300]})') from None
  params = restored[STATE_ITEM]['params']
  for key_path, want in jax.tree_util.tree_leaves_with_path(target):
    got = params
    for key in key_path:
      got = got[key.key]
    if tuple(got.shape) != tuple(want.shape):
      name = '/'.join(str(k.key) for k in key_path)
      raise UsageError(f'--ckpt={path}: parameter {name} has shape {tuple(got.shape)}, but {ckpt.config_path.name} '
                       f'implies {tuple(want.shape)}')
  return config, params, ckpt


def restore_model(path: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None
                  ) -> tuple[config_dict.ConfigDict, Transformer, CheckpointDir]:
  """(config, model, resolved directory) from a checkpoint directory; parameters placed on `mesh` (or device 0)."""
  config, params, ckpt = restore_params(path, mesh)
  graphdef, state = nnx.split(abstract(ModelConfig.from_config(config.model)))
  nnx.replace_by_pure_dict(state, params)
  return config, nnx.merge(graphdef, state), ckpt

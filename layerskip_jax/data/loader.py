"""One deterministic, seeded stream of packed global batches from prepared shards (grain), and its sharding.

Each document's (input, target) pairs are packed end to end into rows of seq_len (grain's concat-then-split):
`segment_ids` keep attention inside a document and restart `positions`; a target never crosses a document
boundary, because each document contributes its own pairs (ids[:-1] -> ids[1:]). `loss_mask` is 0 on padding and
on fine-tuning prompts. Every process builds the same global batch and keeps the rows of its own devices
(`to_global_array`), so one process and several see the same global batches; the iterator's state is saved with
each checkpoint (item `data_iter`) for exact resumption.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import numpy as np

from layerskip_jax.data.prepare import decode_record, read_manifest
from layerskip_jax.errors import UsageError
from layerskip_jax.sharding import batch_sharding

FEATURES = ('inputs', 'targets', 'loss_mask')


def _example(record: bytes) -> dict[str, np.ndarray]:
  ids, prompt_length = decode_record(record)
  mask = (np.arange(1, len(ids)) >= prompt_length).astype(np.int32)
  return {'inputs': ids[:-1], 'targets': ids[1:], 'loss_mask': mask}


def _rename(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {'inputs': packed['inputs'].astype(np.int32), 'targets': packed['targets'].astype(np.int32),
          'loss_mask': packed['loss_mask'].astype(np.float32),
          'segment_ids': packed['inputs_segment_ids'].astype(np.int32),
          'positions': packed['inputs_positions'].astype(np.int32)}


def shard_files(directory: str | pathlib.Path) -> tuple[list[str], dict]:
  directory = pathlib.Path(directory).expanduser()
  manifest = read_manifest(directory)
  if manifest is None:
    raise UsageError(f'{directory}: no prepared shards (manifest.json); run python -m layerskip_jax.data.prepare')
  return [str(directory / shard['file']) for shard in manifest['shards']], manifest


def dataset(directory: str | pathlib.Path, seq_len: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
            repeat: bool = True, num_workers: int = 0) -> grain.IterDataset:
  """Batches of packed rows: dicts of [batch_size, seq_len] arrays (inputs, targets, loss_mask, segment_ids,
  positions). With repeat, an endless stream reshuffled each epoch; without, one pass (the last batch dropped)."""
  files, _ = shard_files(directory)
  ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(files))
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  packed = grain.experimental.ConcatThenSplitIterDataset(
      ds.map(_example).to_iter_dataset(), length_struct={name: seq_len for name in FEATURES})
  batches = packed.batch(batch_size, drop_remainder=True).map(_rename)
  if num_workers > 0:
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return batches


def to_global_array(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """The global batch (identical on every process) as jax.Arrays sharded over the mesh's batch axes; each process
  contributes only the rows of its own devices."""
  def put(array: np.ndarray) -> jax.Array:
    sharding = batch_sharding(mesh, array.ndim)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
  return {k: put(v) for k, v in batch.items()}


def count_tokens(batch: dict[str, Any]) -> int:
  return int(np.sum(batch['loss_mask']))

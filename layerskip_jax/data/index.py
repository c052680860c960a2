"""The chunk index of prepared shards: which record and offset chunk c of the corpus is, memory-mapped.

A document of n tokens has n - 1 (input, target) pairs and is cut into ceil((n - 1) / seq_len) chunks of at most
seq_len pairs; the chunks of the corpus are numbered shard by shard, record by record. Beside each shard,
`<shard>.chunks-<seq_len>.npy` holds int64 `first[r]`, the number of the shard's first chunk of record r
(r = 0 .. records; the last entry is the shard's chunk count). It is built once per shard and sequence length, when
the directory is first opened for that length (the trainer does it in `ensure_prepared`, on process 0), written
atomically (processes that build it at once write the same bytes), and read memory-mapped with the shard's lengths
sidecar: a process holds no per-chunk or per-record array of the corpus in its own memory, only what it maps, and
opening a directory reads one small header per shard. Where the directory cannot be written, the index of a shard is
computed in memory instead (one warning line); a directory whose shards lack sidecars (written by early versions)
gets them the same way.
"""

from __future__ import annotations

import os
import pathlib
import sys
import uuid

import numpy as np

from layerskip_jax.errors import UsageError, one_line


def lengths_file(shard_file: str | pathlib.Path) -> pathlib.Path:
  """The sidecar of a shard: int64 token counts of its records, in order."""
  return pathlib.Path(f'{shard_file}.lengths.npy')


def chunks_file(shard_file: str | pathlib.Path, seq_len: int) -> pathlib.Path:
  """The chunk index of a shard for one sequence length: int64 first chunk of each record, and the total."""
  return pathlib.Path(f'{shard_file}.chunks-{seq_len}.npy')


def first_chunks(lengths: np.ndarray, seq_len: int) -> np.ndarray:
  """int64 [records + 1]: the first chunk of each record and, last, the number of chunks."""
  pairs = np.maximum(np.asarray(lengths, np.int64) - 1, 0)
  first = np.zeros(len(pairs) + 1, np.int64)
  np.cumsum(-(-pairs // seq_len), out=first[1:])
  return first


def _save_atomic(path: pathlib.Path, array: np.ndarray) -> bool:
  """Writes `array` to `path` through a unique temporary and a rename; False if the directory is not writable."""
  tmp = path.with_name(f'.{path.name}.{uuid.uuid4().hex[:8]}.tmp')
  try:
    with open(tmp, 'wb') as f:
      np.save(f, array)
    os.replace(tmp, path)
    return True
  except OSError:
    tmp.unlink(missing_ok=True)
    return False


def _record_lengths(shard: str) -> np.ndarray:
  """Token counts of a shard's records, read from the records (shards of early versions have no sidecar)."""
  from array_record.python.array_record_module import ArrayRecordReader

  reader = ArrayRecordReader(shard)
  try:
    return np.asarray([len(r) // 4 - 1 for r in reader.read_all()], np.int64)
  finally:
    reader.close()


class ChunkIndex:
  """Chunk c of the shards `files` -> (file, record, first pair, length), from memory-mapped per-shard arrays.

      index = ChunkIndex(files, seq_len)   # builds missing per-shard indexes once
      len(index)                           # chunks of the corpus
      index.locate(c)                      # (global record number, first pair, number of pairs)

  Only the per-shard arrays' pages that are read become resident: memory does not grow with the corpus.
  """

  def __init__(self, files: list[str], seq_len: int):
    self.files, self.seq_len = list(files), seq_len
    self._lengths, self._first = [], []
    warned = False
    for file in self.files:
      sidecar = lengths_file(file)
      if not sidecar.is_file():
        lengths = _record_lengths(file)
        if not _save_atomic(sidecar, lengths):
          warned = warned or self._warn(file)
      else:
        lengths = np.load(sidecar, mmap_mode='r')
      path = chunks_file(file, seq_len)
      first = self._load_first(path, len(lengths))
      if first is None:
        first = first_chunks(lengths, seq_len)
        if _save_atomic(path, first):
          first = np.load(path, mmap_mode='r')
        else:
          warned = warned or self._warn(file)
      self._lengths.append(lengths)
      self._first.append(first)
    self._shard_chunks = np.zeros(len(self.files) + 1, np.int64)
    np.cumsum([int(f[-1]) for f in self._first], out=self._shard_chunks[1:])
    self._shard_records = np.zeros(len(self.files) + 1, np.int64)
    np.cumsum([len(x) for x in self._lengths], out=self._shard_records[1:])

  @staticmethod
  def _load_first(path: pathlib.Path, records: int) -> np.ndarray | None:
    """The saved index of a shard, or None if there is none or it does not fit the shard (rebuilt then)."""
    if not path.is_file():
      return None
    try:
      first = np.load(path, mmap_mode='r')
    except (ValueError, OSError) as e:
      print(f'warning: {path}: unreadable chunk index ({one_line(e, 100)}); rebuilding it', file=sys.stderr)
      return None
    if first.shape != (records + 1,) or first.dtype != np.int64:
      print(
        f'warning: {path}: does not match its shard ({first.shape} entries for {records} records); rebuilding it',
        file=sys.stderr,
      )
      return None
    return first

  @staticmethod
  def _warn(file: str) -> bool:
    print(
      f'warning: {pathlib.Path(file).parent} is not writable: the chunk index is held in memory (write it once '
      'with python -m layerskip_jax.data.prepare --index_seq_len N)',
      file=sys.stderr,
    )
    return True

  def __len__(self) -> int:
    return int(self._shard_chunks[-1])

  def locate(self, chunk: int) -> tuple[int, int, int]:
    """(record number across all shards, index of its first pair, number of pairs) of chunk `chunk`."""
    shard = int(np.searchsorted(self._shard_chunks, chunk, side='right')) - 1
    local = chunk - int(self._shard_chunks[shard])
    first = self._first[shard]
    record = int(np.searchsorted(first, local, side='right')) - 1
    start = (local - int(first[record])) * self.seq_len
    pairs = int(self._lengths[shard][record]) - 1
    return int(self._shard_records[shard]) + record, start, min(self.seq_len, pairs - start)

  def file_of(self, record: int) -> str:
    return self.files[int(np.searchsorted(self._shard_records, record, side='right')) - 1]

  def check_rows(self, batch_size: int, directory: str | pathlib.Path) -> None:
    """A corpus must fill one global batch: at least batch_size chunks (one row each at the least)."""
    if len(self) < batch_size:
      raise UsageError(
        f'{directory}: holds {len(self)} chunks of at most {self.seq_len} tokens, fewer than one global '
        f'batch of {batch_size} rows; use a larger corpus or a smaller train.batch_size'
      )

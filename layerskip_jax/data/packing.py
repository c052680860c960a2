"""Which chunks make up each row of a global batch, decided from chunk lengths alone, and the rows built from them.

The rule is grain's first-fit packing with one bin per row (`grain.experimental.FirstFitPackIterDataset` with
num_packing_bins = batch size, shuffle_bins=False), the rule every checkpoint of this project was trained with:
chunks are taken in stream order, each into the first row with room for it; the first chunk that fits no row closes
the batch and opens the next one. A batch is therefore a contiguous range of the chunk stream, and its plan needs
only the lengths of its chunks (from the index), never their tokens: every process plans the whole global batch,
which is cheap, and reads, decodes and packs only its own rows.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def first_fit(
  length_at: Callable[[int], int | None], start: int, batch_size: int, seq_len: int
) -> tuple[list[list[int]], int] | None:
  """(chunks of each row as stream positions, the next batch's first position) of the batch that starts at stream
  position `start`; `length_at(t)` is the length of the chunk at position t, None past the end of a finite stream.
  None if the stream ends before the batch's rows are all used (the last, partial batch is dropped)."""
  free = np.full(batch_size, seq_len, np.int64)
  rows: list[list[int]] = [[] for _ in range(batch_size)]
  t = start
  while True:
    length = length_at(t)
    if length is None:
      return (rows, t) if rows[-1] else None
    fits = free >= length
    if not fits.any():
      return rows, t
    row = int(np.argmax(fits))
    free[row] -= length
    rows[row].append(t)
    t += 1


def pack_row(pieces: list[dict[str, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
  """One row of seq_len from chunks ({'inputs', 'targets', 'loss_mask'}), end to end, zero-padded: segment_ids
  count the chunks from 1 (0 = padding) and positions restart at 0 in each."""
  row = {
    'inputs': np.zeros(seq_len, np.int32),
    'targets': np.zeros(seq_len, np.int32),
    'loss_mask': np.zeros(seq_len, np.float32),
    'segment_ids': np.zeros(seq_len, np.int32),
    'positions': np.zeros(seq_len, np.int32),
  }
  at = 0
  for segment, piece in enumerate(pieces, start=1):
    n = len(piece['inputs'])
    for key in ('inputs', 'targets', 'loss_mask'):
      row[key][at : at + n] = piece[key]
    row['segment_ids'][at : at + n] = segment
    row['positions'][at : at + n] = np.arange(n, dtype=np.int32)
    at += n
  return row

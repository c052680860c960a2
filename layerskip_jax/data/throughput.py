"""The loader's throughput: tokens/s a process reads (used by data.bench, and by train.bench --what input, which
compares it with the train step's; a module without command-line flags, so both can import it)."""

from __future__ import annotations

import time

from layerskip_jax.data import loader


def loader_rate(
  directory, seq_len: int, batch_size: int, rows: loader.Rows, batches: int, seed: int, workers: int = 0
) -> float:
  """Tokens/s of the rows `rows` of each global batch, over `batches` batches after a first one."""
  it = iter(loader.dataset(directory, seq_len, batch_size, seed=seed, num_workers=workers, rows=rows))
  try:
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * len(rows.indices) * seq_len / (time.perf_counter() - start)
  finally:
    it.close()

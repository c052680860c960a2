"""Training metrics: WORKDIR/metrics.jsonl (interfaces.md), TensorBoard (tensorboardX), W&B when asked for; FLOPs.

On resume, rows after the restored step are dropped first, so the file reads as one run. A torn last line (the
process was killed, or the disk filled, mid-write) is dropped too, with a warning; a damaged line elsewhere is an
error naming the file and line, since the file was then edited, not interrupted.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Any

import numpy as np
from ml_collections import config_dict

from layerskip_jax import outputs
from layerskip_jax.errors import UsageError
from layerskip_jax.model import ModelConfig

METRICS_FILE = 'metrics.jsonl'


def train_flops_per_token(model: ModelConfig, seq_len: int) -> float:
  """Forward + backward FLOPs per trained token of the plain step: 6 x (matmul parameters) + causal attention
  (12 x layers x seq x heads x head_dim / 2). Rematerialisation and early-exit heads are not counted (MFU counts
  useful work)."""
  layer = (
    model.hidden_size * model.head_dim * (2 * model.num_attention_heads + 2 * model.num_key_value_heads)
    + 3 * model.hidden_size * model.intermediate_size
  )
  matmul_params = model.num_hidden_layers * layer + model.hidden_size * model.vocab_size
  attention = 12 * model.num_hidden_layers * seq_len * model.num_attention_heads * model.head_dim / 2
  return 6.0 * matmul_params + attention


def read_rows(
  path: str | pathlib.Path, *, warn: bool = False, flag: str | None = None
) -> list[tuple[int, dict[str, Any]]]:
  """(line number, row) of each row of a metrics.jsonl. A last line that is not JSON (torn by a kill or a full
  disk) is skipped (with a warning on stderr when `warn`); any other line that is not a JSON object raises
  UsageError naming the file and line (and `flag`, the flag that named the file)."""
  path = pathlib.Path(path)
  where = f'{flag}={path}' if flag else str(path)
  try:
    lines = path.read_bytes().split(b'\n')
  except OSError as e:
    raise UsageError(f'{where}: cannot be read ({outputs.describe_os_error(e)})') from None
  numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
  rows = []
  for n, (number, line) in enumerate(numbered):
    try:
      row = json.loads(line.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      if n == len(numbered) - 1:
        if warn:
          print(f'warning: {path}:{number}: dropping a torn last line (the run was killed mid-write)', file=sys.stderr)
        break
      raise UsageError(
        f'{where}:{number}: not a JSON row ({type(e).__name__}); a metrics file has one JSON object '
        'per line: remove or fix the line'
      ) from None
    if not isinstance(row, dict):
      raise UsageError(
        f'{where}:{number}: a {type(row).__name__}, not a JSON object; a metrics file has one JSON '
        'object per line: remove or fix the line'
      )
    rows.append((number, row))
  return rows


def _clean(value: Any) -> Any:
  """JSON-ready: arrays to lists, NaN (an exit not computed this step) to null."""
  if isinstance(value, (np.ndarray, list, tuple)):
    array = np.asarray(value)
    return _clean(array.item()) if array.ndim == 0 else [_clean(v) for v in array.tolist()]
  if isinstance(value, (np.floating, float)):
    return None if not math.isfinite(float(value)) else float(value)
  if isinstance(value, np.integer):
    return int(value)
  return value


class MetricsWriter:
  def __init__(
    self,
    workdir: str | pathlib.Path,
    logging: config_dict.ConfigDict,
    *,
    resume_step: int,
    enabled: bool,
    run_config: dict | None = None,
  ):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / METRICS_FILE
    self._tb = self._wandb = None
    if not enabled:
      return
    if self.path.exists():  # keep the rows of the run up to the restored step only
      kept = [json.dumps(row) for _, row in read_rows(self.path, warn=True) if row.get('step', 0) <= resume_step]
      outputs.write_text(self.path, ''.join(line + '\n' for line in kept))
    self._file = open(self.path, 'a')
    if logging.tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(str(pathlib.Path(workdir) / 'tb'))
    if logging.wandb:
      try:
        import wandb

        self._wandb = wandb.init(
          project=logging.wandb_project,
          dir=str(workdir),
          config=run_config,
          resume='allow',
          name=pathlib.Path(workdir).name,
        )
      except ImportError:
        print(
          'warning: logging.wandb=true but wandb is not installed (pip install wandb); not logging to W&B',
          file=sys.stderr,
        )

  def write(self, row: dict[str, Any]) -> dict[str, Any]:
    row = {k: _clean(v) for k, v in row.items()}
    if not self.enabled:
      return row
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()
    prefix = f'{row["split"]}/' if 'split' in row else 'train/'
    scalars = {}
    for key, value in row.items():
      if isinstance(value, (int, float)) and key not in ('step',):
        scalars[prefix + key] = value
      elif isinstance(value, list):
        scalars.update({f'{prefix}{key}/exit_{i + 1:02d}': v for i, v in enumerate(value) if v is not None})
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, value, row['step'])
    if self._wandb is not None:
      self._wandb.log(scalars, step=row['step'])
    return row

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()

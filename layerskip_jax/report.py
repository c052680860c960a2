"""The summary at the end of `launch/local.sh`: the per-exit table and the self-speculative speed-up, from the JSON
files that `layerskip_jax.evaluate` and `layerskip_jax.benchmark` wrote; and training curves of several runs.

    python -m layerskip_jax.report --eval RUN/eval.json --benchmark RUN/benchmark.json
    python -m layerskip_jax.report --curves runs/tiny,runs/tiny_baseline --plot curves.png

--curves draws each run's last-exit training cross-entropy (smoothed) against steps and against training time
(the sum of step times: compilation and evaluation excluded), and its held-out cross-entropy per exit at each
evaluation, from the runs' metrics.jsonl.

Every input is read and checked before anything is printed: a file of the wrong kind (a benchmark.json given as
--eval, a list, a hand-edited row) is one line naming the flag, the file (and the line of a metrics.jsonl) and the
field, not a KeyError halfway through the table. A torn last row of a metrics.jsonl (a run killed mid-write) is
skipped with a warning: that is what a killed run leaves, not a damaged file.

"""

from __future__ import annotations

import json
import numbers
import pathlib
from typing import Any

import numpy as np
from absl import flags

from layerskip_jax import cli, outputs
from layerskip_jax.errors import UsageError, describe_json

# --- reading and checking the inputs --------------------------------------------------------------------------

_WRITERS = {'--eval': 'layerskip_jax.evaluate --json', '--benchmark': 'layerskip_jax.benchmark --json'}


def _a(kind: str) -> str:
  if kind == 'null':
    return kind
  return f'an {kind}' if kind[0] in 'aeiou' else f'a {kind}'


def _number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _numbers(value: Any) -> bool:
  """A non-empty list of numbers (null allowed: an exit not computed)."""
  return isinstance(value, list) and bool(value) and all(v is None or _number(v) for v in value)


_KINDS = {
  'number': _number,
  'integer': _integer,
  'string': lambda v: isinstance(v, str),
  'object': lambda v: isinstance(v, dict),
  'list of numbers': _numbers,
  'number or null': lambda v: v is None or _number(v),
  'object or null': lambda v: v is None or isinstance(v, dict),
}


def _read(path: str, flag: str) -> dict:
  """The JSON object in `path`, given as `flag` (--eval, --benchmark)."""
  writer = _WRITERS[flag]
  file = pathlib.Path(path).expanduser()
  if file.is_dir():
    raise UsageError(f'{flag}={path}: is a directory; give the JSON file that {writer} wrote')
  try:
    text = file.read_text(encoding='utf-8')
  except FileNotFoundError:
    raise UsageError(f'{flag}={path}: no such file') from None
  except UnicodeDecodeError:
    raise UsageError(f'{flag}={path}: not UTF-8 text, so not JSON; give the JSON file that {writer} wrote') from None
  except OSError as e:
    raise UsageError(f'{flag}={path}: cannot be read ({outputs.describe_os_error(e)})') from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise UsageError(
      f'{flag}={path}: not JSON ({e.msg} at line {e.lineno} column {e.colno}); give the JSON file that {writer} wrote'
    ) from None
  if not isinstance(data, dict):
    raise UsageError(
      f'{flag}={path}: holds {describe_json(data)}, not an object; give the JSON file that {writer} wrote'
    )
  return data


def _require(data: dict, key: str, kind: str, where: str, fix: str, prefix: str = '') -> Any:
  if key not in data:
    raise UsageError(f'{where}: has no "{prefix}{key}" field; {fix}')
  value = data[key]
  if not _KINDS[kind](value):
    raise UsageError(f'{where}: "{prefix}{key}" is {describe_json(value)}, not {_a(kind)}; {fix}')
  return value


def read_eval(path: str, flag: str = '--eval') -> dict:
  """An eval.json of layerskip_jax.evaluate, checked for every field the report reads."""
  data = _read(path, flag)
  where = f'{flag}={path}'
  if 'exit_ppl' not in data and 'settings' in data:
    raise UsageError(
      f'{where}: is a benchmark result ({_WRITERS["--benchmark"]}), not an evaluation; pass it as --benchmark'
    )
  fix = f'this is not an eval.json of {_WRITERS[flag]}: give that file (or rerun the evaluation)'
  _require(data, 'ckpt', 'string', where, fix)
  _require(data, 'step', 'integer', where, fix)
  compare = _require(data, 'compare', 'object or null', where, fix) if 'compare' in data else None
  exits = None
  for run, prefix in ((data, ''), (compare, 'compare.')):
    if run is None:
      continue
    for key in ('exit_ppl', 'exit_accuracy', 'exit_agreement'):
      values = _require(run, key, 'list of numbers', where, fix, prefix)
      exits = exits or len(values)
      if len(values) != exits:
        raise UsageError(f'{where}: "{prefix}{key}" has {len(values)} values, "exit_ppl" {exits}; {fix}')
  if compare is not None:
    _require(compare, 'ckpt', 'string', where, fix, 'compare.')
  if 'layerwise' in data:
    grid = _require(data, 'layerwise', 'object', where, fix)
    _require(grid, 'mean_settle_exit', 'number', where, fix, 'layerwise.')
    _require(grid, 'num_layers', 'integer', where, fix, 'layerwise.')
  return data


def read_benchmark(path: str, flag: str = '--benchmark') -> dict:
  """A benchmark.json of layerskip_jax.benchmark, checked for every field the report reads."""
  data = _read(path, flag)
  where = f'{flag}={path}'
  if 'best' not in data and 'exit_ppl' in data:
    raise UsageError(f'{where}: is an evaluation ({_WRITERS["--eval"]}), not a benchmark result; pass it as --eval')
  fix = f'this is not a benchmark.json of {_WRITERS[flag]}: give that file (or rerun the benchmark)'
  best = _require(data, 'best', 'object', where, fix)
  for batch, setting in best.items():
    if setting is None:
      continue
    prefix = f'best.{batch}.'
    if not isinstance(setting, dict):
      raise UsageError(f'{where}: "best.{batch}" is {describe_json(setting)}, not an object or null; {fix}')
    for key, kind in (
      ('speedup', 'number'),
      ('exit_layer', 'integer'),
      ('num_speculations', 'integer'),
      ('acceptance_rate', 'number or null'),
      ('agreement', 'number'),
    ):
      _require(setting, key, kind, where, fix, prefix)
  if 'autoregressive_over_floor' in data:
    _require(data, 'autoregressive_over_floor', 'number', where, fix)
    _require(data, 'floor_ms_per_token', 'number', where, fix)
  return data


def read_metrics(run: str, *, for_plot: bool = False, flag: str = '--curves') -> tuple[list[dict], list[dict]]:
  """(training rows, held-out rows) of a run's metrics.jsonl, each row checked for the fields the summary (and,
  `for_plot`, the figure) reads."""
  from layerskip_jax.train.metrics import METRICS_FILE, read_rows

  directory = pathlib.Path(run).expanduser()
  if directory.exists() and not directory.is_dir():
    raise UsageError(f'{flag}={run}: is a file; give training workdirs (directories holding {METRICS_FILE})')
  if not directory.is_dir():
    raise UsageError(f'{flag}={run}: no such directory')
  path = directory / METRICS_FILE
  if not path.is_file():
    raise UsageError(f'{flag}={run}: has no {METRICS_FILE}; give training workdirs')
  train, heldout = [], []
  for number, row in read_rows(path, warn=True, flag=flag):
    where = f'{flag}={path}:{number}'
    fix = 'not a row that layerskip_jax.train writes: remove or fix the line'
    _require(row, 'step', 'integer', where, fix)
    if 'split' not in row:
      if 'step_time' in row:
        _require(row, 'step_time', 'number or null', where, fix)
      if for_plot:
        _require(row, 'ce_last', 'number or null', where, fix)
      train.append(row)
    elif row['split'] == 'heldout':
      _require(row, 'exit_ce', 'list of numbers', where, fix)
      heldout.append(row)
  if for_plot and not train:
    raise UsageError(
      f'{flag}={run}: {METRICS_FILE} has no training rows yet, so no curve to draw; give runs that have logged a step'
    )
  return train, heldout


# --- the summary ----------------------------------------------------------------------------------------------


def _fixed(value: float | None, digits: int) -> str:
  return '-' if value is None else f'{value:.{digits}f}'


def exit_table(evaluation: dict) -> str:
  """Held-out perplexity, accuracy and agreement with the last exit at every exit (and the baseline's, if any)."""
  runs = [evaluation] + ([evaluation['compare']] if evaluation.get('compare') else [])
  names = ['layerskip' if len(runs) > 1 else pathlib.Path(evaluation['ckpt']).name, 'baseline'][: len(runs)]
  head = f'{"exit":>4} ' + ' '.join(f'{n + " ppl":>15} {"acc":>5} {"agree":>5}' for n in names)
  if len(runs) > 1:
    head += f' {"ppl ratio":>9}'
  lines = [head]
  for i in range(len(evaluation['exit_ppl'])):
    row = f'{i + 1:>4} ' + ' '.join(
      f'{_fixed(r["exit_ppl"][i], 2):>15} {_fixed(r["exit_accuracy"][i], 3):>5} {_fixed(r["exit_agreement"][i], 2):>5}'
      for r in runs
    )
    if len(runs) > 1:
      ours, base = runs[0]['exit_ppl'][i], runs[1]['exit_ppl'][i]
      row += f' {base / ours:>8.2f}x' if ours and base is not None else f' {"-":>9}'
    lines.append(row)
  return '\n'.join(lines)


def speedup_lines(benchmark: dict) -> list[str]:
  lines = []
  for batch, best in benchmark.get('best', {}).items():
    if best:
      interval = best.get('speedup_interval')  # benchmarks before 2026-12 have none
      spread = f' [{interval[0]:.2f}, {interval[1]:.2f}]' if isinstance(interval, list) and len(interval) == 2 else ''
      lines.append(
        f'self-speculative at batch {batch}: {best["speedup"]:.2f}x autoregressive{spread} '
        f'(E={best["exit_layer"]}, d={best["num_speculations"]}, acceptance '
        f'{_fixed(best["acceptance_rate"], 2)}, agreement with autoregressive {best["agreement"]:.2f})'
      )
  for batch, auto in (benchmark.get('auto') or {}).items():
    if isinstance(auto, dict) and isinstance(auto.get('speedup'), (int, float)):
      lines.append(
        f'auto (E={auto.get("exit_layer")}, d={auto.get("num_speculations")}) at batch {batch}: '
        f'{auto["speedup"]:.2f}x autoregressive, {_fixed(auto.get("ratio_to_best"), 2)} of the best'
      )
  if 'autoregressive_over_floor' in benchmark:
    lines.append(
      f'autoregressive: {benchmark["autoregressive_over_floor"]:.2f}x the weight-matmul floor '
      f'({benchmark["floor_ms_per_token"]:.3f} ms/token)'
    )
  return lines


def plot_curves(metrics: dict[str, tuple[list[dict], list[dict]]], path: str) -> None:
  """Draws {run: read_metrics(run, for_plot=True)} into a figure (the format its suffix names; none = PNG)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, (by_step, by_time, held) = plt.subplots(1, 3, figsize=(16, 4.5))
  window = 1
  for run, (train, heldout) in metrics.items():
    name = pathlib.Path(run).name
    ce = np.asarray([np.nan if r['ce_last'] is None else r['ce_last'] for r in train], float)
    window = min(20, len(ce))
    smooth = np.convolve(ce, np.ones(window) / window, mode='valid')
    steps = np.asarray([r['step'] for r in train])[window - 1 :]
    seconds = np.cumsum([r.get('step_time') or 0.0 for r in train])[window - 1 :]
    by_step.plot(steps, smooth, label=name)
    by_time.plot(seconds, smooth, label=name)
    for row in heldout[-1:]:
      exit_ce = [np.nan if c is None else c for c in row['exit_ce']]
      held.plot(range(1, len(exit_ce) + 1), exit_ce, marker='o', label=f'{name} (step {row["step"]})')
  by_step.set(xlabel='step', ylabel=f'training cross-entropy, last exit (mean of {window})')
  by_time.set(xlabel='training time (s, sum of step times)', ylabel='training cross-entropy, last exit')
  held.set(xlabel='exit E', ylabel='held-out cross-entropy')
  for ax in (by_step, by_time, held):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=110)


def main(args: cli.Args, f: flags.FlagValues | None = None) -> None:
  f = flags.FLAGS if f is None else f
  runs = [r for r in f.curves if r]
  if not runs and not f.eval and not f.benchmark:
    raise UsageError('give --eval and/or --benchmark (JSON files of layerskip_jax.evaluate / .benchmark), or --curves')
  if f.plot and not runs:
    raise UsageError(f'--plot={f.plot}: draws the training curves of --curves; give training workdirs')
  # Everything is read and checked before anything is printed or drawn.
  from layerskip_jax.checkpoint_dir import CHECKPOINTS_SUBDIR, RUN_FILES  # jax and Orbax: only when needed
  from layerskip_jax.config import CONFIG_FILE_NAME

  run_parts = [pathlib.Path(run) / name for run in runs for name in (CONFIG_FILE_NAME, CHECKPOINTS_SUBDIR, *RUN_FILES)]
  outputs.check_plot('--plot', f.plot, inputs={'--eval': f.eval, '--benchmark': f.benchmark, '--curves': run_parts})
  evaluation = read_eval(f.eval) if f.eval else None
  benchmark = read_benchmark(f.benchmark) if f.benchmark else None
  metrics = {run: read_metrics(run, for_plot=bool(f.plot)) for run in runs}
  for run, (train, heldout) in metrics.items():
    seconds = sum(r.get('step_time') or 0.0 for r in train)
    line = f'{run}: {len(train)} steps in {seconds:.0f} s of step time'
    if heldout:
      line += f'; held-out CE per exit at step {heldout[-1]["step"]}: ' + ' '.join(
        _fixed(c, 3) for c in heldout[-1]['exit_ce']
      )
    print(line)
  if f.plot:
    plot_curves(metrics, f.plot)
    print(f'wrote {f.plot}')
  if evaluation is None and benchmark is None:
    return
  print('=' * 80)
  if evaluation is not None:
    print(f'held-out evaluation of {evaluation["ckpt"]} (step {evaluation["step"]}), every exit:')
    print(exit_table(evaluation))
    if 'layerwise' in evaluation:
      grid = evaluation['layerwise']
      print(
        f'layer-wise: a token\'s prediction settles after {grid["mean_settle_exit"]:.2f} of '
        f'{grid["num_layers"]} layers on average'
      )
  if benchmark is not None:
    for line in speedup_lines(benchmark):
      print(line)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags (defined only when it runs; tests define them on their own FlagValues)."""
  flags.DEFINE_string('eval', None, 'eval.json written by python -m layerskip_jax.evaluate', flag_values=flag_values)
  flags.DEFINE_string(
    'benchmark', None, 'benchmark.json written by python -m layerskip_jax.benchmark', flag_values=flag_values
  )
  flags.DEFINE_list(
    'curves', [], 'training workdirs whose metrics.jsonl to summarise (and plot with --plot)', flag_values=flag_values
  )
  flags.DEFINE_string(
    'plot', None, 'with --curves: draw the training curves into this PNG (or .pdf, .svg)', flag_values=flag_values
  )


if __name__ == '__main__':
  define_flags()
  cli.run(main)

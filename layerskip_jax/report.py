"""The summary at the end of `launch/local.sh`: the per-exit table and the self-speculative speed-up, from the JSON
files that `layerskip_jax.evaluate` and `layerskip_jax.benchmark` wrote; and training curves of several runs.

    python -m layerskip_jax.report --eval RUN/eval.json --benchmark RUN/benchmark.json
    python -m layerskip_jax.report --curves runs/tiny,runs/tiny_baseline --plot curves.png

--curves draws each run's last-exit training cross-entropy (smoothed) against steps and against training time
(the sum of step times: compilation and evaluation excluded), and its held-out cross-entropy per exit at each
evaluation, from the runs' metrics.jsonl.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from absl import flags

from layerskip_jax import cli
from layerskip_jax.errors import UsageError


def _read(path: str, flag: str) -> dict:
  try:
    return json.loads(pathlib.Path(path).read_text())
  except FileNotFoundError:
    raise UsageError(f'--{flag}={path}: no such file') from None
  except json.JSONDecodeError:
    raise UsageError(f'--{flag}={path}: not JSON') from None


def exit_table(evaluation: dict) -> str:
  """Held-out perplexity, accuracy and agreement with the last exit at every exit (and the baseline's, if any)."""
  runs = [evaluation] + ([evaluation['compare']] if evaluation.get('compare') else [])
  names = ['layerskip' if len(runs) > 1 else pathlib.Path(evaluation['ckpt']).name, 'baseline'][:len(runs)]
  head = f'{"exit":>4} ' + ' '.join(f'{n + " ppl":>15} {"acc":>5} {"agree":>5}' for n in names)
  if len(runs) > 1:
    head += f' {"ppl ratio":>9}'
  lines = [head]
  for i in range(len(evaluation['exit_ppl'])):
    row = f'{i + 1:>4} ' + ' '.join(
        f'{r["exit_ppl"][i]:>15.2f} {r["exit_accuracy"][i]:>5.3f} {r["exit_agreement"][i]:>5.2f}' for r in runs)
    if len(runs) > 1:
      row += f' {runs[1]["exit_ppl"][i] / runs[0]["exit_ppl"][i]:>8.2f}x'
    lines.append(row)
  return '\n'.join(lines)


def speedup_lines(benchmark: dict) -> list[str]:
  lines = []
  for batch, best in benchmark.get('best', {}).items():
    if best:
      lines.append(f'self-speculative at batch {batch}: {best["speedup"]:.2f}x autoregressive (E={best["exit_layer"]}, '
                   f'd={best["num_speculations"]}, acceptance {best["acceptance_rate"]:.2f}, '
                   f'agreement with autoregressive {best["agreement"]:.2f})')
  if 'autoregressive_over_floor' in benchmark:
    lines.append(f'autoregressive: {benchmark["autoregressive_over_floor"]:.2f}x the weight-matmul floor '
                 f'({benchmark["floor_ms_per_token"]:.3f} ms/token)')
  return lines


def read_metrics(run: str) -> tuple[list[dict], list[dict]]:
  """(training rows, held-out rows) of a run's metrics.jsonl."""
  path = pathlib.Path(run) / 'metrics.jsonl'
  if not path.is_file():
    raise UsageError(f'--curves: {run} has no metrics.jsonl (give training workdirs)')
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [r for r in rows if 'split' not in r], [r for r in rows if r.get('split') == 'heldout']


def plot_curves(metrics: dict[str, tuple[list[dict], list[dict]]], path: str) -> None:
  """Draws {run: read_metrics(run)} into a PNG."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (by_step, by_time, held) = plt.subplots(1, 3, figsize=(16, 4.5))
  for run, (train, heldout) in metrics.items():
    name = pathlib.Path(run).name
    ce = np.asarray([r['ce_last'] for r in train])
    window = min(20, len(ce))
    smooth = np.convolve(ce, np.ones(window) / window, mode='valid')
    steps = np.asarray([r['step'] for r in train])[window - 1:]
    seconds = np.cumsum([r.get('step_time') or 0.0 for r in train])[window - 1:]
    by_step.plot(steps, smooth, label=name)
    by_time.plot(seconds, smooth, label=name)
    for row in heldout[-1:]:
      held.plot(range(1, len(row['exit_ce']) + 1), row['exit_ce'], marker='o', label=f'{name} (step {row["step"]})')
  by_step.set(xlabel='step', ylabel=f'training cross-entropy, last exit (mean of {window})')
  by_time.set(xlabel='training time (s, sum of step times)', ylabel='training cross-entropy, last exit')
  held.set(xlabel='exit E', ylabel='held-out cross-entropy')
  for ax in (by_step, by_time, held):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(args: cli.Args) -> None:
  f = flags.FLAGS
  runs = [r for r in f.curves if r]
  if not runs and not f.eval and not f.benchmark:
    raise UsageError('give --eval and/or --benchmark (JSON files of layerskip_jax.evaluate / .benchmark), or --curves')
  if f.plot and not runs:
    raise UsageError(f'--plot={f.plot}: draws the training curves of --curves; give training workdirs')
  metrics = {run: read_metrics(run) for run in runs}
  for run, (train, heldout) in metrics.items():
    seconds = sum(r.get('step_time') or 0.0 for r in train)
    line = f'{run}: {len(train)} steps in {seconds:.0f} s of step time'
    if heldout:
      line += f'; held-out CE per exit at step {heldout[-1]["step"]}: ' + ' '.join(
          f'{c:.3f}' for c in heldout[-1]['exit_ce'])
    print(line)
  if f.plot:
    plot_curves(metrics, f.plot)
    print(f'wrote {f.plot}')
  if not f.eval and not f.benchmark:
    return
  print('=' * 80)
  if f.eval:
    evaluation = _read(f.eval, 'eval')
    print(f'held-out evaluation of {evaluation["ckpt"]} (step {evaluation["step"]}), every exit:')
    print(exit_table(evaluation))
    if 'layerwise' in evaluation:
      grid = evaluation['layerwise']
      print(f'layer-wise: a token\'s prediction settles after {grid["mean_settle_exit"]:.2f} of '
            f'{grid["num_layers"]} layers on average')
  if f.benchmark:
    for line in speedup_lines(_read(f.benchmark, 'benchmark')):
      print(line)


def define_flags() -> None:
  flags.DEFINE_string('eval', None, 'eval.json written by python -m layerskip_jax.evaluate')
  flags.DEFINE_string('benchmark', None, 'benchmark.json written by python -m layerskip_jax.benchmark')
  flags.DEFINE_list('curves', [], 'training workdirs whose metrics.jsonl to summarise (and plot with --plot)')
  flags.DEFINE_string('plot', None, 'with --curves: draw the training curves into this PNG')


if __name__ == '__main__':
  define_flags()
  cli.run(main)

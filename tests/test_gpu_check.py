"""launch/gpu_check.sh: its code path end to end on a CPU (--smoke); on a machine without an accelerator and
without --smoke it refuses with one line."""

import json
import subprocess

import pytest
from conftest import ROOT, host_devices_env

pytestmark = pytest.mark.slow


def test_gpu_check_smoke_writes_train_and_decode_numbers(tmp_path):
  out = tmp_path / 'check.json'
  result = subprocess.run(
    ['bash', 'launch/gpu_check.sh', '--smoke', '--json', str(out)],
    env=host_devices_env(1),
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(out.read_text())
  for objective in ('plain', 'layerskip'):
    r = report['train'][objective]
    assert r['batch_size'] >= 1 and r['tokens_per_sec'] > 0 and r['peak_bytes'] > 0
  strategies = {s['strategy'] for s in report['decode']['settings']}
  assert strategies == {'autoregressive', 'self_speculative'}
  assert report['decode']['weight_bytes'] > 0 and report['decode']['matmul_chain_floor_ms'] > 0


def test_gpu_check_without_an_accelerator_is_one_line(tmp_path):
  result = subprocess.run(
    ['bash', 'launch/gpu_check.sh', '--json', str(tmp_path / 'x.json')],
    env=host_devices_env(1),
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
  )
  assert result.returncode == 2 and result.stderr.startswith('error: no GPU or TPU found')
  assert result.stderr.strip().count('\n') == 0 and not (tmp_path / 'x.json').exists()

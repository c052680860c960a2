"""Shared fixtures: one small model per test session (compiles are the suite's main cost)."""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from layerskip_jax.model import ModelConfig, create  # noqa: E402

SMALL = ModelConfig(
  vocab_size=128,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=4,
  num_attention_heads=4,
  num_key_value_heads=2,
  rms_norm_eps=1e-6,
  initializer_range=0.1,
)


@pytest.fixture(scope='session')
def small_config() -> ModelConfig:
  return SMALL


@pytest.fixture(scope='session')
def small_model():
  """A 4-layer GQA model with large enough weights that layers change the residual stream visibly. Read-only."""
  return create(SMALL, seed=0)


def host_devices_env(devices: int = 1) -> dict:
  """Environment for a subprocess that sees `devices` CPU devices and imports this checkout."""
  import os

  return dict(
    os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}'
  )


def run_on_host_devices(script: str, devices: int = 8, timeout: int = 600) -> str:
  """Runs `script` in a subprocess with `devices` CPU devices; returns its stdout, failing with its stderr."""
  import subprocess

  result = subprocess.run(
    [sys.executable, '-c', script], env=host_devices_env(devices), capture_output=True, text=True, timeout=timeout
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def run_processes(
  script: str, num_processes: int = 2, devices_per_process: int = 2, timeout: int = 600, extra_env: dict | None = None
) -> list[str]:
  """Runs `script` in `num_processes` local processes joined by jax.distributed on 127.0.0.1 (each with
  `devices_per_process` CPU devices; the script reads LS_COORDINATOR, LS_NUM_PROCESSES, LS_PROCESS_ID). Returns
  each process's stdout; fails with their stderr if any exits non-zero."""
  import socket
  import subprocess

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = []
  for pid in range(num_processes):
    env = dict(
      host_devices_env(devices_per_process),
      LS_COORDINATOR=f'127.0.0.1:{port}',
      LS_NUM_PROCESSES=str(num_processes),
      LS_PROCESS_ID=str(pid),
      **(extra_env or {}),
    )
    procs.append(
      subprocess.Popen(
        [sys.executable, '-c', script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
      )
    )
  outputs = []
  for pid, proc in enumerate(procs):
    try:
      out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    assert proc.returncode == 0, f'process {pid} failed:\n{err[-3000:]}'
    outputs.append(out)
  return outputs

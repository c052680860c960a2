"""Joining a multi-process JAX cluster: explicit flags, or the environment of SLURM / Cloud TPU, or nothing."""

from __future__ import annotations

import os

import jax


def cluster_environment() -> str | None:
  """The cluster JAX can detect by itself, if this process runs in one with several processes."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_STEP_NODELIST' in os.environ:
    return 'slurm'
  if len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1:
    return 'tpu'
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """jax.distributed.initialize with explicit values, or bare where a cluster environment is detected (JAX reads
  SLURM_* / the TPU metadata itself); a single process on a laptop does nothing."""
  if coordinator_address or num_processes:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  elif cluster_environment():
    jax.distributed.initialize()

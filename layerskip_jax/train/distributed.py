"""Joining a multi-process JAX cluster: explicit flags, or the environment of SLURM / Cloud TPU, or nothing."""

from __future__ import annotations

import os

import jax


def _on_cloud_tpu_vm() -> bool:
  """JAX's own test, made when jax is imported: libtpu is installed and this machine has TPU chips. On a Cloud TPU
  VM (`gcloud compute tpus tpu-vm`) JAX reads the workers from the metadata server, not from the environment."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms and 'tpu' not in platforms.split(','):
    return False  # e.g. JAX_PLATFORMS=cpu on a TPU VM: a single process
  try:
    from jax._src import cloud_tpu_init  # private: fall back to the environment test if it moves
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False))


def cluster_environment() -> str | None:
  """The cluster JAX can detect by itself, if this process runs in one with several processes (or on a Cloud TPU
  VM, where initializing is harmless with one worker and needed with several: Orbax's barriers use the client)."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_STEP_NODELIST' in os.environ:
    return 'slurm'
  if len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1 or _on_cloud_tpu_vm():
    return 'tpu'
  return None


def initialize(
  coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
  """jax.distributed.initialize with explicit values, or bare where a cluster environment is detected (JAX reads
  SLURM_* / the TPU metadata itself); a single process on a laptop does nothing."""
  if coordinator_address or num_processes:
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  elif cluster_environment():
    jax.distributed.initialize()

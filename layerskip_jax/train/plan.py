"""Compile-only planning (like MaxText's train_compile): will a preset fit N devices, and at which batch?

    python -m layerskip_jax.train.plan --config llama2_7b --devices 8 [--config.mesh.fsdp=8 ...] [--json OUT]
    python -m layerskip_jax.train.plan --config llama3_2_1b --devices 8 --max_batch     # largest batch that fits

The train step and the eval step are lowered from abstract inputs (nothing is allocated) for `--devices` simulated
CPU devices (XLA's host platform device count) with the preset's mesh and sharding rules, compiled, and read back:
per device, the bytes of parameters, optimizer state and temporaries (XLA's memory analysis of the partitioned
program), the peak (arguments + temporaries + outputs - donated aliases), and the model's FLOPs per step (forward
and backward of the plain step; XLA's own cost analysis counts a scanned layer once, so it is not reported). A plan
whose peak exceeds `--device_memory_gb` x `--memory_fraction` (80 x 0.9: what launch/slurm/train.sbatch lets XLA
allocate) is refused with one line (exit 2).

What this is and is not: the same program a GPU run would partition, compiled by XLA's CPU backend. Buffer sizes
of parameters, optimizer state and activations are the GPU's; the CPU backend's fusion and scheduling decisions
differ, so temporaries are an estimate. One difference is known and errs on the safe side: the CPU backend computes
bf16 matmuls in float32 and keeps float32 copies of saved bf16 activations (seen in the compiled program), so
policies that save matmul outputs (remat save_dots, save_proj) read up to ~2x high per sequence. Attention `auto`
is compiled as the blockwise kernel here (the CPU's choice): its memory is what a flash kernel (cuDNN, splash)
needs, O(seq), not the O(seq^2) of dense attention.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from absl import flags

from layerskip_jax import cli, outputs
from layerskip_jax import config as config_lib
from layerskip_jax.errors import UsageError

flags.DEFINE_string('config', 'tiny', 'config file, or the name of a preset in configs/')
flags.DEFINE_integer('devices', 8, 'simulated devices to plan for (the mesh is built over them from the config)')
flags.DEFINE_float('device_memory_gb', 80.0, 'memory of one device in GB (1e9 bytes)')
flags.DEFINE_float(
  'memory_fraction',
  0.9,
  'share of it the run may use (XLA_PYTHON_CLIENT_MEM_FRACTION, which '
  'launch/slurm/train.sbatch sets to 0.9): plans over device_memory_gb x memory_fraction are refused',
)
flags.DEFINE_bool(
  'max_batch',
  False,
  'search the largest global batch (a multiple of the data-parallel size) that '
  'fits, instead of planning train.batch_size',
)
flags.DEFINE_bool('eval', True, 'also compile the eval step (held-out evaluation at the train microbatch)')
flags.DEFINE_string('json', None, 'write the plan here')

_GB = 1e9
_MAX_PER_DEVICE = 1024  # --max_batch stops doubling here


def _set_host_devices(devices: int) -> None:
  """Makes the CPU backend expose `devices` devices; must run before jax is imported."""
  if 'jax' in sys.modules:
    import jax

    if jax.device_count() != devices:
      raise UsageError(f'--devices={devices}: jax is already initialised with {jax.device_count()} devices')
    return
  flags_now = [f for f in os.environ.get('XLA_FLAGS', '').split() if 'xla_force_host_platform_device_count' not in f]
  os.environ['XLA_FLAGS'] = ' '.join(flags_now + [f'--xla_force_host_platform_device_count={devices}'])
  os.environ['JAX_PLATFORMS'] = 'cpu'


def _sharded_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings (the largest shard of each leaf)."""
  import jax
  import numpy as np

  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def plan_once(config, mesh, *, with_eval: bool) -> dict[str, Any]:
  """Compiles the steps of `config` on `mesh`; returns the per-device numbers (bytes, FLOPs, compile seconds)."""
  from layerskip_jax.model import ModelConfig
  from layerskip_jax.train.metrics import train_flops_per_token
  from layerskip_jax.train.state import compile_steps, peak_bytes

  steps = compile_steps(config, mesh, with_eval=with_eval)
  train_mem = steps.train.memory_analysis()
  t = config.train
  model_flops = train_flops_per_token(ModelConfig.from_config(config.model), t.seq_len) * t.batch_size * t.seq_len
  result = {
    'batch_size': t.batch_size,
    'seq_len': t.seq_len,
    'grad_accum_steps': t.grad_accum_steps,
    'batch_per_device': t.batch_size / (mesh.shape['data'] * mesh.shape['fsdp']),
    'param_bytes': _sharded_bytes(steps.abstract_state.params),
    'opt_state_bytes': _sharded_bytes(steps.abstract_state.opt_state),
    'train_temp_bytes': int(train_mem.temp_size_in_bytes),
    'train_peak_bytes': peak_bytes(steps.train),
    # forward + backward of the plain step (train_flops_per_token): XLA's cost analysis counts a scanned layer
    # once, not once per layer, so it is not used here
    'model_flops_per_device': model_flops / mesh.size,
    'train_compile_s': steps.train_seconds,
  }
  if steps.eval is not None:
    eval_mem = steps.eval.memory_analysis()
    result.update(
      eval_temp_bytes=int(eval_mem.temp_size_in_bytes),
      eval_peak_bytes=peak_bytes(steps.eval),
      eval_compile_s=steps.eval_seconds,
    )
  result['peak_bytes'] = max(result['train_peak_bytes'], result.get('eval_peak_bytes', 0))
  return result


def _with_batch(config, batch_size: int):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.train.batch_size = batch_size
    config.train.grad_accum_steps = 1
  config_lib.validate(config)
  return config


def search_max_batch(config, mesh, limit_bytes: float, *, with_eval: bool) -> tuple[dict | None, list[dict]]:
  """The largest global batch (a multiple of the data-parallel size, one microbatch) whose peak fits: doubling,
  then bisection. Returns (the plan that fits or None, every plan compiled)."""
  unit = mesh.shape['data'] * mesh.shape['fsdp']
  tried: dict[int, dict] = {}

  def fits(per_device: int) -> bool:
    if per_device not in tried:
      tried[per_device] = plan_once(_with_batch(config, per_device * unit), mesh, with_eval=with_eval)
      print(
        f'  batch {per_device * unit:5d} ({per_device} per device): peak '
        f'{tried[per_device]["peak_bytes"] / _GB:7.1f} GB',
        flush=True,
      )
    return tried[per_device]['peak_bytes'] <= limit_bytes

  if not fits(1):
    return None, list(tried.values())
  low, high = 1, 2
  while fits(high):
    if high >= _MAX_PER_DEVICE:
      return tried[high], [tried[k] for k in sorted(tried)]
    low, high = high, high * 2
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (mid, high) if fits(mid) else (low, mid)
  return tried[low], [tried[k] for k in sorted(tried)]


def _line(name: str, p: dict) -> str:
  gb = lambda key: f'{p[key] / _GB:7.2f}' if key in p else '      -'  # noqa: E731
  return (
    f'{name:>10} {p["batch_size"]:6d} {p["batch_per_device"]:6.1f} {gb("param_bytes")} {gb("opt_state_bytes")} '
    f'{gb("train_temp_bytes")} {gb("eval_temp_bytes")} {gb("peak_bytes")} '
    f'{p["model_flops_per_device"] / 1e12:9.1f}'
  )


def main(args: cli.Args) -> None:
  f = flags.FLAGS
  if f.devices < 1:
    raise UsageError(f'--devices={f.devices}: must be at least 1')
  if f.device_memory_gb <= 0:
    raise UsageError(f'--device_memory_gb={f.device_memory_gb}: must be positive')
  json_path = outputs.check_file('--json', f.json)
  _set_host_devices(f.devices)  # first: validating the config imports jax (the model's schema, model_config.py)
  config = config_lib.load(f.config, args.config_overrides)  # validated before anything compiles
  if config.model.attention_impl in ('cudnn', 'pallas_gpu', 'splash'):  # accelerator kernels do not compile here
    print(
      f'model.attention_impl={config.model.attention_impl}: planned with the blockwise kernel (the same O(seq) '
      'memory class; an accelerator kernel cannot be compiled for CPU devices)'
    )
    with config.unlocked():
      config.model.attention_impl = 'blockwise'
  import jax
  from layerskip_jax import sharding

  mesh = sharding.make_mesh(config.mesh, jax.devices()[: f.devices])
  if not 0 < f.memory_fraction <= 1:
    raise UsageError(f'--memory_fraction={f.memory_fraction}: must be in (0, 1]')
  limit = f.device_memory_gb * f.memory_fraction * _GB
  limit_text = (
    f'{limit / _GB:.4g} GB (--device_memory_gb={f.device_memory_gb:g} x --memory_fraction={f.memory_fraction:g})'
  )
  print(
    f'planning {f.config} on {sharding.describe(mesh)} (simulated; compile only), seq {config.train.seq_len}, '
    f'{config.model.dtype} compute, remat {config.model.remat_policy}, attention {config.model.attention_impl}'
  )
  begin = time.perf_counter()
  if f.max_batch:
    plan, tried = search_max_batch(config, mesh, limit, with_eval=f.eval)
  else:
    t = config.train
    unit = mesh.shape['data'] * mesh.shape['fsdp']
    if (t.batch_size // t.grad_accum_steps) % unit:
      raise UsageError(
        f'train.batch_size={t.batch_size}: each microbatch (batch_size / grad_accum_steps) must divide '
        f'over the {unit} data-parallel devices; try --config.train.batch_size={unit}'
      )
    plan = plan_once(config, mesh, with_eval=f.eval)
    tried = [plan]
  print(
    f'{"":>10} {"batch":>6} {"/dev":>6} {"params":>7} {"opt":>7} {"temp":>7} {"eval":>7} {"peak":>7} '
    f'{"TFLOP":>9}   (per device; GB = 1e9 bytes; model TFLOP per step)'
  )
  for p in tried:
    print(_line('fits' if p['peak_bytes'] <= limit else 'too big', p))
  report = {
    'config': f.config,
    'devices': f.devices,
    'mesh': dict(mesh.shape),
    'device_memory_gb': f.device_memory_gb,
    'memory_fraction': f.memory_fraction,
    'dtype': config.model.dtype,
    'remat_policy': config.model.remat_policy,
    'attention_impl': config.model.attention_impl,
    'seq_len': config.train.seq_len,
    'plan': plan,
    'tried': tried,
    'seconds': time.perf_counter() - begin,
  }
  if json_path:
    outputs.write_text(json_path, json.dumps(report, indent=2))
    print(f'wrote {f.json}')
  if plan is None:
    raise UsageError(
      f'{f.config} does not fit {limit_text} per device on {f.devices} devices even at one sequence '
      'per device; shard more (mesh.fsdp, mesh.tensor), use model.remat_policy=full, or a shorter '
      'train.seq_len'
    )
  if plan['peak_bytes'] > limit:
    raise UsageError(
      f'{f.config} at train.batch_size={plan["batch_size"]} needs {plan["peak_bytes"] / _GB:.1f} GB per '
      f'device, more than {limit_text}; use --max_batch to find what fits'
    )
  print(
    f'fits: batch {plan["batch_size"]} ({plan["batch_per_device"]:g} per device), peak '
    f'{plan["peak_bytes"] / _GB:.1f} GB of {limit_text} per device'
  )


if __name__ == '__main__':
  cli.run(main)

"""One accelerator check: the train step of a preset at the largest batch that fits, and batch-1 decoding.

    bash launch/gpu_check.sh [--json OUT.json]          # = python -m layerskip_jax.gpu_check --config llama3_2_1b
    python -m layerskip_jax.gpu_check --smoke           # the same code path on a CPU with the tiny preset

On the device it finds (one GPU or TPU chip): (1) for the plain objective and for LayerSkip (the preset's recipe),
the largest per-device batch whose compiled train step fits the device's memory (XLA's memory analysis against
the allocator's limit), then timed steps: tokens/s, MFU against the device's bf16 peak, compiled and peak memory;
(2) a randomly initialised model of the same shape decoding at batch 1: autoregressive and self-speculative
ms/token, against the weight-streaming floor (bytes of weights / memory bandwidth). Nothing but jax, flax, optax
and this package is imported (no data pipeline: synthetic batches). Writes one JSON.
"""

from __future__ import annotations

import json
import time
from typing import Any

from absl import flags

from layerskip_jax import cli, outputs
from layerskip_jax.errors import UsageError

flags.DEFINE_string('config', 'llama3_2_1b', 'preset of the check (bf16 presets: the MFU is against the bf16 peak)')
flags.DEFINE_bool('smoke', False, 'a CPU run of the same code path: tiny preset, 2 layers, seq 128, 2 steps')
flags.DEFINE_integer('steps', 10, 'timed train steps per objective (after 2 warm-up steps)')
flags.DEFINE_integer('max_new_tokens', 64, 'tokens decoded per generation run')
flags.DEFINE_float('peak_tflops', 0.0, 'bf16 peak of the device in TFLOP/s (0: from the device kind)')
flags.DEFINE_float('memory_bandwidth_gbs', 0.0, 'memory bandwidth of the device in GB/s (0: from the device kind)')
flags.DEFINE_string('json', 'gpu_check.json', 'write the results here')

# device_kind substring -> (dense bf16 TFLOP/s, memory GB/s), from the vendors' data sheets
DEVICE_PEAKS = {
  'H200': (989.0, 4800.0),
  'H100': (989.0, 3350.0),
  'A100': (312.0, 2039.0),
  'L4': (121.0, 300.0),
  'TPU v5 lite': (197.0, 819.0),
  'TPU v5p': (459.0, 2765.0),
  'TPU v4': (275.0, 1228.0),
  'TPU v6': (918.0, 1640.0),
}


def _device_peaks(device, peak_tflops: float, bandwidth_gbs: float) -> tuple[float | None, float | None]:
  known = next((v for k, v in DEVICE_PEAKS.items() if k.lower() in device.device_kind.lower()), (None, None))
  return (peak_tflops or known[0]), (bandwidth_gbs or known[1])


def _memory_limit(device) -> int | None:
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  return int(stats['bytes_limit']) if stats and 'bytes_limit' in stats else None


def _config(name: str, smoke: bool, overrides: dict[str, Any]):
  from layerskip_jax import config as config_lib

  base = {'model.num_hidden_layers': 2, 'train.seq_len': 128} if smoke else {}
  return config_lib.load('tiny' if smoke else name, {**base, **overrides, 'train.grad_accum_steps': 1})


def train_check(
  name: str, smoke: bool, objective: dict[str, Any], steps: int, peak_tflops: float | None, limit: int | None
) -> dict[str, Any]:
  """The largest batch (1, 2, 4, ...) whose step fits `limit` bytes (without a limit: batch 1), then timed steps."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from layerskip_jax import sharding
  from layerskip_jax.model import ModelConfig
  from layerskip_jax.train.metrics import train_flops_per_token
  from layerskip_jax.train.state import compile_steps, init_state, peak_bytes
  from layerskip_jax.train.step import synthetic_batch

  mesh = sharding.single_device_mesh()
  best, batch = None, 1
  while True:
    config = _config(name, smoke, {**objective, 'train.batch_size': batch})
    compiled = compile_steps(config, mesh, with_eval=False)
    peak = peak_bytes(compiled.train)
    if limit is not None and peak > 0.95 * limit:
      break
    best = (config, compiled, peak, compiled.train.memory_analysis().temp_size_in_bytes)
    if limit is None or batch >= 256:
      break
    batch *= 2
  if best is None:
    return {'error': f'batch 1 needs more than {limit / 1e9:.1f} GB'}
  config, compiled, peak, temp = best
  b, t = config.train.batch_size, config.train.seq_len
  state = init_state(config, compiled)
  data = jax.device_put(synthetic_batch(config.model.vocab_size, b, t), compiled.batch_sharding)
  times = []
  for i in range(steps + 2):
    begin = time.perf_counter()
    state, metrics = compiled.train(state, data, jnp.int32(i))
    jax.block_until_ready(metrics)
    if i >= 2:
      times.append(time.perf_counter() - begin)
  step_s = float(np.median(times))
  flops = train_flops_per_token(ModelConfig.from_config(config.model), t) * b * t
  return {
    'batch_size': b,
    'seq_len': t,
    'step_ms': 1e3 * step_s,
    'tokens_per_sec': b * t / step_s,
    'mfu': flops / step_s / (peak_tflops * 1e12) if peak_tflops else None,
    'peak_bytes': int(peak),
    'temp_bytes': int(temp),
    'loss': float(metrics['loss']),
    'compile_s': compiled.train_seconds,
  }


def decode_check(name: str, smoke: bool, max_new: int, bandwidth_gbs: float | None) -> dict[str, Any]:
  """Batch-1 decoding of a random model of the preset's shape: autoregressive and self-speculative (E = L/2, d = 4;
  a random model's drafts are rarely accepted, so this measures the cost of a round, not a speed-up)."""
  import jax
  import numpy as np
  from flax import nnx
  from layerskip_jax import api, benchmark
  from layerskip_jax.model import ModelConfig, create

  config = _config(name, smoke, {})
  model = create(ModelConfig.from_config(config.model), seed=0)
  lm = api.LoadedModel(config=config, model=model, tokenizer=None, checkpoint=None)
  prompts = np.random.default_rng(0).integers(0, config.model.vocab_size, (2, 32)).tolist()
  num_layers = config.model.num_hidden_layers
  result = benchmark.run_benchmark(
    lm,
    prompts,
    strategies=('autoregressive', 'self_speculative'),
    exit_layers=[max(1, num_layers // 2)],
    num_speculations=[4],
    batch_sizes=[1],
    max_new_tokens=max_new,
    repeats=2,
  )
  weight_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(nnx.state(model, nnx.Param)))
  ar = next(s for s in result['settings'] if s['strategy'] == 'autoregressive')
  floor_ms = 1e3 * weight_bytes / (bandwidth_gbs * 1e9) if bandwidth_gbs else None
  return {
    'settings': [{k: v for k, v in s.items() if k != 'tokens'} for s in result['settings']],
    'weight_bytes': int(weight_bytes),
    'bandwidth_floor_ms': floor_ms,
    'autoregressive_over_floor': ar['ms_per_token'] / floor_ms if floor_ms else None,
    'matmul_chain_floor_ms': 1e3 * benchmark.weight_matmul_floor(lm, repeats=20),
  }


def main(args: cli.Args) -> None:
  f = flags.FLAGS
  json_path = outputs.check_file('--json', f.json) if f.json else None
  _config(f.config, f.smoke, {})  # validated before anything compiles
  import jax

  device = jax.devices()[0]
  if device.platform == 'cpu' and not f.smoke:
    raise UsageError('no GPU or TPU found (jax.devices() is CPU): install a CUDA jax build, or use --smoke')
  peak_tflops, bandwidth = _device_peaks(device, f.peak_tflops, f.memory_bandwidth_gbs)
  limit = _memory_limit(device)
  report: dict[str, Any] = {
    'device': device.device_kind,
    'platform': device.platform,
    'jax': jax.__version__,
    'config': 'tiny (smoke)' if f.smoke else f.config,
    'peak_tflops': peak_tflops,
    'memory_bandwidth_gbs': bandwidth,
    'memory_limit_bytes': limit,
    'date': time.strftime('%Y-%m-%d'),
    'train': {},
  }
  print(
    f'{device.device_kind} ({device.platform}): bf16 peak {peak_tflops} TFLOP/s, {bandwidth} GB/s, '
    f'memory limit {limit / 1e9 if limit else "?"} GB'
  )
  for objective, overrides in (('plain', {'layerskip.p_max': 0.0, 'layerskip.e_scale': 0.0}), ('layerskip', {})):
    r = report['train'][objective] = train_check(
      f.config, f.smoke, overrides, 2 if f.smoke else f.steps, peak_tflops, limit
    )
    if 'error' in r:
      print(f'train {objective}: {r["error"]}')
      continue
    mfu = f'{r["mfu"]:.3f}' if r['mfu'] is not None else '?'
    print(
      f'train {objective:9s} batch {r["batch_size"]} x {r["seq_len"]}: {r["step_ms"]:.1f} ms/step, '
      f'{r["tokens_per_sec"]:.0f} tokens/s, MFU {mfu}, peak {r["peak_bytes"] / 1e9:.1f} GB'
    )
  plain, ls = report['train'].get('plain', {}), report['train'].get('layerskip', {})
  if 'step_ms' in plain and 'step_ms' in ls and plain['batch_size'] == ls['batch_size']:
    report['layerskip_step_over_plain'] = ls['step_ms'] / plain['step_ms']
  report['decode'] = d = decode_check(f.config, f.smoke, 8 if f.smoke else f.max_new_tokens, bandwidth)
  for s in d['settings']:
    print(f'decode {s["strategy"]:17s} batch 1: {s["ms_per_token"]:.3f} ms/token')
  if d['bandwidth_floor_ms']:
    print(
      f'weight-streaming floor {d["bandwidth_floor_ms"]:.3f} ms/token ({d["weight_bytes"] / 1e9:.2f} GB of '
      f'weights): autoregressive is {d["autoregressive_over_floor"]:.2f}x it'
    )
  if json_path:
    outputs.write_text(json_path, json.dumps(report, indent=2))
    print(f'wrote {json_path}')


if __name__ == '__main__':
  cli.run(main)

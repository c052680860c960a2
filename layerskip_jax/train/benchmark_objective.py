"""What the LayerSkip objective costs: step time against the plain (baseline) step, and compiled memory.

    python -m layerskip_jax.train.benchmark_objective --json objective.json            # speed on tiny + memory
    python -m layerskip_jax.train.benchmark_objective --what memory --memory_config llama_1_5b --memory_seq_len 2048

speed: full train steps (forward, backward, AdamW) of the `--config` model, compiled once per setting, timed after
warm-up over a multiple of the rotation period; the median step time and its ratio to the baseline.
memory: the train step of a larger model is compiled (never run) with the early-exit loss on every exit and on the
last exit only; `compiled.memory_analysis()` gives the temporary memory of each.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from layerskip_jax import cli
from layerskip_jax import config as config_lib
from layerskip_jax.train.step import compiled_train_step

flags.DEFINE_string('config', 'tiny', 'config (file or preset) of the speed benchmark')
flags.DEFINE_list('what', ['speed', 'memory'], 'speed, memory, or both')
flags.DEFINE_integer('steps', 16, 'timed steps per setting (after 2 warm-up steps)')
flags.DEFINE_string('memory_config', 'llama_1_5b', 'config of the memory benchmark (compiled, never run)')
flags.DEFINE_integer('memory_seq_len', 2048, 'sequence length of the memory benchmark')
flags.DEFINE_integer('memory_batch', 1, 'batch of the memory benchmark')
flags.DEFINE_string('json', None, 'write the results here')

SPEED_SETTINGS = {  # name -> layerskip overrides (train.steps and the rest come from --config)
    'baseline': dict(p_max=0.0, e_scale=0.0),
    'layerskip_R4_p0.1': dict(p_max=0.1, e_scale=1.0, curriculum='rotational', rotation_period=4,
                              time_schedule='constant'),
    'layerskip_R4_p0.1_tokens0.25': dict(p_max=0.1, e_scale=1.0, curriculum='rotational', rotation_period=4,
                                         time_schedule='constant', exit_token_fraction=0.25),
    'per_batch_p0.5_last_exit': dict(p_max=0.5, e_scale=0.0, dropout_mode='per_batch', time_schedule='constant'),
    'per_batch_p0.5_R4': dict(p_max=0.5, e_scale=1.0, dropout_mode='per_batch', time_schedule='constant',
                              curriculum='rotational', rotation_period=4),
    'all_exits_every_step': dict(p_max=0.1, e_scale=1.0, curriculum='none', time_schedule='constant'),
}


def speed(config_name: str, steps: int) -> dict:
  results = {}
  for name, overrides in SPEED_SETTINGS.items():
    config = config_lib.load(config_name, {f'layerskip.{k}': v for k, v in overrides.items()})
    b, t = config.train.batch_size, config.train.seq_len
    start = time.perf_counter()
    compiled, state = compiled_train_step(config, b, t, concrete=True)
    compile_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.model.vocab_size, (b, t + 1)), jnp.int32)
    batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': jnp.ones((b, t), jnp.float32)}
    times = []
    for i in range(steps + 2):
      begin = time.perf_counter()
      state, metrics = compiled(state, batch, jnp.int32(i))
      jax.block_until_ready(metrics)
      if i >= 2:
        times.append(time.perf_counter() - begin)
    results[name] = {'median_ms': 1e3 * float(np.median(times)), 'mean_ms': 1e3 * float(np.mean(times)),
                     'compile_s': compile_s, 'tokens_per_sec': b * t / float(np.median(times)),
                     'overrides': overrides}
  base = results['baseline']['median_ms']
  for r in results.values():
    r['vs_baseline'] = r['median_ms'] / base
  return {'config': config_name, 'steps': steps, 'settings': results}


def memory(config_name: str, seq_len: int, batch: int) -> dict:
  results = {}
  for name, overrides in {'last_exit_only': dict(p_max=0.0, e_scale=0.0),
                          'all_exits': dict(p_max=0.1, e_scale=1.0, curriculum='none')}.items():
    config = config_lib.load(config_name, {**{f'layerskip.{k}': v for k, v in overrides.items()},
                                           'train.seq_len': seq_len, 'train.batch_size': batch,
                                           'train.grad_accum_steps': 1})
    compiled, _ = compiled_train_step(config, batch, seq_len, concrete=False)
    analysis = compiled.memory_analysis()
    results[name] = {'temp_bytes': int(analysis.temp_size_in_bytes),
                     'argument_bytes': int(analysis.argument_size_in_bytes),
                     'output_bytes': int(analysis.output_size_in_bytes)}
  results['all_over_last_temp'] = results['all_exits']['temp_bytes'] / results['last_exit_only']['temp_bytes']
  return {'config': config_name, 'seq_len': seq_len, 'batch': batch, **results}


def main(args: cli.Args) -> None:
  f = flags.FLAGS
  report = {'backend': jax.default_backend(), 'devices': jax.device_count()}
  if 'speed' in f.what:
    report['speed'] = speed(f.config, f.steps)
    print(f'step time on {f.config} ({report["backend"]}), median of {f.steps} steps:')
    for name, r in report['speed']['settings'].items():
      print(f'  {name:32s} {r["median_ms"]:8.1f} ms  {r["vs_baseline"]:5.2f}x baseline  '
            f'{r["tokens_per_sec"]:8.0f} tok/s')
  if 'memory' in f.what:
    report['memory'] = m = memory(f.memory_config, f.memory_seq_len, f.memory_batch)
    print(f'compiled train-step temporary memory, {f.memory_config}, seq {f.memory_seq_len}, batch '
          f'{f.memory_batch}:')
    for name in ('last_exit_only', 'all_exits'):
      print(f'  {name:16s} {m[name]["temp_bytes"] / 2**30:8.2f} GiB')
    print(f'  all exits / last exit only: {m["all_over_last_temp"]:.3f}x')
  if f.json:
    with open(f.json, 'w') as fh:
      json.dump(report, fh, indent=2)
    print(f'wrote {f.json}')


if __name__ == '__main__':
  cli.run(main)

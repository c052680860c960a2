"""Tokens per second the loader delivers on the stdlib corpus, against what the tiny model's train step consumes.

    python -m layerskip_jax.data.bench [--config tiny] [--batches 300] [--json data_bench.json]
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from layerskip_jax import cli, outputs
from layerskip_jax import config as config_lib
from layerskip_jax.data import loader
from layerskip_jax.data.cache import ensure_prepared
from layerskip_jax.errors import UsageError

flags.DEFINE_string('config', 'tiny', 'config whose data, batch and sequence length are measured')
flags.DEFINE_integer('batches', 300, 'batches to time')
flags.DEFINE_integer('train_steps', 6, 'train steps to time for the comparison (0: skip)')
flags.DEFINE_string('json', None, 'write the results here')


def main(args: cli.Args) -> None:
  f = flags.FLAGS
  if f.batches < 1 or f.train_steps < 0:
    bad = ('batches', f.batches, 1) if f.batches < 1 else ('train_steps', f.train_steps, 0)
    raise UsageError(f'--{bad[0]}={bad[1]}: must be at least {bad[2]}')
  json_path = outputs.check_file('--json', f.json)  # before the benchmark, not after it
  config = config_lib.load(f.config, args.config_overrides)
  prepared = ensure_prepared(config)
  b, t = config.train.batch_size, config.train.seq_len
  it = iter(loader.dataset(prepared.train, t, b, seed=config.train.seed, num_workers=config.data.num_workers))
  next(it)
  start = time.perf_counter()
  for _ in range(f.batches):
    next(it)
  loader_tps = f.batches * b * t / (time.perf_counter() - start)
  report = {'config': f.config, 'batch': b, 'seq_len': t, 'loader_tokens_per_sec': loader_tps}
  print(f'loader: {loader_tps:,.0f} tokens/s ({f.batches} batches of {b} x {t})')
  if f.train_steps:
    from layerskip_jax.train.step import compiled_train_step
    compiled, state = compiled_train_step(config, b, t, concrete=True)
    batch = {k: jnp.asarray(v) for k, v in next(it).items()}  # the trainer's batch, as the step takes it
    times = []
    for i in range(f.train_steps + 1):
      begin = time.perf_counter()
      state, metrics = compiled(state, batch, jnp.int32(i))
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - begin)
    step_tps = b * t / float(np.median(times[1:]))
    report.update(train_step_tokens_per_sec=step_tps, loader_over_train=loader_tps / step_tps)
    print(f'train step: {step_tps:,.0f} tokens/s -> the loader delivers {loader_tps / step_tps:,.0f}x that')
  if json_path:
    outputs.write_text(json_path, json.dumps(report, indent=2))


if __name__ == '__main__':
  cli.run(main)

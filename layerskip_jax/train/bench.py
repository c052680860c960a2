"""Training speed and memory: tokens/s and MFU of the train step, what the LayerSkip objective costs over the
plain step, a Hugging Face torch Llama of the same shape trained in the same run, and compiled memory.

    python -m layerskip_jax.train.bench --json train_bench.json     # speed, torch, memory
    python -m layerskip_jax.train.bench --what memory --memory_config llama_1_5b --memory_seq_len 2048
    python -m layerskip_jax.train.bench --what flops --memory_config llama_1_5b --memory_seq_len 4096
    python -m layerskip_jax.train.bench --what loop --json loop.json [--config.data.cache_dir=...]
    python -m layerskip_jax.train.bench --what input [--config.data.cache_dir=...]

peak: the machine's float32 matmul throughput, measured here (the MFU denominator of this report).
speed: full train steps (forward, backward, AdamW) of the `--config` model (tiny: the 6.3M reference shape, hidden
256, 8 layers, 4/2 heads, intermediate 688, vocab 1024, batch 16 x 256), compiled once per setting, timed after
warm-up over a multiple of the rotation period, the settings interleaved step by step (`--speed_settings` picks
them; `preset` is the config as given, --config.k=v included); median step time, tokens/s, MFU, ratio to the plain
step, and the plain steps that take as long as the preset's train.steps (launch/local.sh --with-baseline=time).
torch: transformers' LlamaForCausalLM of the same shape with torch.optim.AdamW (when torch is installed).
memory: the train step of a larger model is compiled (never run) with the early-exit loss on every exit and on the
last exit only; `compiled.memory_analysis()` gives the temporary memory of each.
flops: the same larger model's train step compiled (never run) as the plain step, the preset's recipe and its cheaper
forms; XLA's cost analysis of each gives the FLOPs one step costs and its ratio to the plain step (`flops` says how;
--config.k=v overrides apply to its config too).
loop: what the training loop costs beyond its compiled step. The trainer itself runs `--loop_steps` steps of the
`--config` model on its real data (no evaluation, no checkpoint but the last; `--config.k=v` overrides apply) in
a few loop settings, and reports the host's own work per step (data, transfers, metrics rows, preemption checks:
the loop's time outside its waits for the device) and how many steps were dispatched only after the previous step
had finished, i.e. how often that work stalled the device. Also its wall time per step (rows' step_time, after
the first row) and tokens/s, against the compiled step alone, timed back to back on one device-resident batch
just before and after each run. On a CPU the "device" shares the cores with the host, so work moved off the
critical path still competes for them, and a shared machine's load makes wall times vary 20-30%.
input: the input pipeline against the train step, in one run: the loader's tokens/s on the config's data (one
process reading every row; data/throughput.py: loader_rate, `--input_batches` batches) and the compiled step's tokens/s on a
batch of that data (`--steps` steps after a first), and their ratio: above 1 the loader keeps the step fed.
`python -m layerskip_jax.data.bench` measures the loader alone: per simulated process, at another preset's shape.

Every step is compiled by `state.compile_steps`, the trainer's one compile path (on a one-device mesh here, except
the loop's, which uses the trainer's own mesh).
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from layerskip_jax import cli, outputs
from layerskip_jax import config as config_lib
from layerskip_jax.errors import UsageError
from layerskip_jax.train.step import compiled_train_step, synthetic_batch

flags.DEFINE_string('config', 'tiny', 'config (file or preset) of the speed benchmark')
WHAT = ('speed', 'torch', 'memory', 'flops', 'loop', 'input')
flags.DEFINE_list('what', ['speed', 'torch', 'memory'], 'any of ' + ', '.join(WHAT))
flags.DEFINE_integer('steps', 16, 'timed steps per setting (after 2 warm-up steps)')
flags.DEFINE_list('speed_settings', None, 'speed: the settings to time (default all); baseline is always timed')
flags.DEFINE_string('memory_config', 'llama_1_5b', 'config of the memory and flops benchmarks (compiled, never run)')
flags.DEFINE_integer('memory_seq_len', 2048, 'sequence length of the memory and flops benchmarks')
flags.DEFINE_integer('memory_batch', 1, 'batch of the memory and flops benchmarks')
flags.DEFINE_integer('loop_steps', 40, 'loop: train steps per loop setting (rows after the first are timed)')
flags.DEFINE_integer('input_batches', 100, 'input: global batches the loader reads (after a first)')
flags.DEFINE_string('json', None, 'write the results here')

SPEED_SETTINGS = {  # name -> layerskip overrides (train.steps and the rest come from --config)
  'preset': {},  # the --config as given, --config.k=v included: the recipe a run of it trains with
  'preset_tokens0.25': dict(exit_token_fraction=0.25),  # ... with early exits scored on a quarter of positions
  'preset_tokens0.125': dict(exit_token_fraction=0.125),
  'preset_per_batch': dict(dropout_mode='per_batch'),  # ... with dropped layers skipped for the whole batch
  'preset_dropout_only': dict(e_scale=0.0),  # ... its layer-dropout masks alone (last exit only): what they cost
  'preset_exits_only': dict(p_max=0.0),  # ... its early-exit loss alone (no layer dropout)
  'preset_distilled': dict(distill_weight=0.5, distill='soft', distill_warmup=0.5),  # ... with self-distillation
  'baseline': dict(p_max=0.0, e_scale=0.0),
  'layerskip_R4_p0.1': dict(
    p_max=0.1, e_scale=1.0, curriculum='rotational', rotation_period=4, time_schedule='constant'
  ),
  'layerskip_R4_p0.1_tokens0.25': dict(
    p_max=0.1,
    e_scale=1.0,
    curriculum='rotational',
    rotation_period=4,
    time_schedule='constant',
    exit_token_fraction=0.25,
  ),
  'per_batch_p0.5_last_exit': dict(p_max=0.5, e_scale=0.0, dropout_mode='per_batch', time_schedule='constant'),
  'per_batch_p0.5_R4': dict(
    p_max=0.5,
    e_scale=1.0,
    dropout_mode='per_batch',
    time_schedule='constant',
    curriculum='rotational',
    rotation_period=4,
  ),
  'all_exits_every_step': dict(p_max=0.1, e_scale=1.0, curriculum='none', time_schedule='constant'),
  'layerskip_R4_p0.1_distill_soft0.5': dict(
    p_max=0.1,
    e_scale=1.0,
    curriculum='rotational',
    rotation_period=4,
    time_schedule='constant',
    distill_weight=0.5,
    distill='soft',
  ),
}


def matmul_peak_flops(size: int = 2048, repeats: int = 10) -> float:
  """float32 matmul FLOP/s of this device, measured (the best of `repeats`)."""
  a = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def torch_reference(config_name: str, steps: int) -> dict | None:
  """Tokens/s of transformers' Llama (same shape, batch and AdamW) in torch, or None without torch."""
  try:
    import torch
    import transformers
  except ImportError:
    return None
  config = config_lib.load(config_name)
  m, b, t = config.model, config.train.batch_size, config.train.seq_len
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(
    transformers.LlamaConfig(
      vocab_size=m.vocab_size,
      hidden_size=m.hidden_size,
      intermediate_size=m.intermediate_size,
      num_hidden_layers=m.num_hidden_layers,
      num_attention_heads=m.num_attention_heads,
      num_key_value_heads=m.num_key_value_heads,
      max_position_embeddings=m.max_position_embeddings,
      tie_word_embeddings=m.tie_word_embeddings,
    )
  )
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  tokens = torch.randint(0, m.vocab_size, (b, t + 1))
  times = []
  for i in range(steps + 2):
    begin = time.perf_counter()
    loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if i >= 2:
      times.append(time.perf_counter() - begin)
  return {
    'median_ms': 1e3 * float(np.median(times)),
    'tokens_per_sec': b * t / float(np.median(times)),
    'threads': torch.get_num_threads(),
    'torch': torch.__version__,
  }


def speed(config_name: str, steps: int, peak: float, names: list[str] | None = None, overrides: list[str] = ()) -> dict:
  """Each setting's train step, compiled once, then timed interleaved: `steps` rounds that each run every setting
  once in turn, so the machine's drift falls on all settings alike (a shared CPU's speed varies 20-30% over
  minutes). `preset` is the config exactly as given (with `overrides`); the others replace layerskip keys.
  With `preset` the report also gives `equal_time_baseline_steps`: the plain steps that take as long as the
  preset's train.steps (launch/local.sh --with-baseline=time trains the baseline that long)."""
  from layerskip_jax.model import ModelConfig
  from layerskip_jax.train.metrics import train_flops_per_token

  names = list(SPEED_SETTINGS) if names is None else list(dict.fromkeys(['baseline', *names]))
  runs = {}
  for name in names:
    applied = [*overrides, *(f'layerskip.{k}={v}' for k, v in SPEED_SETTINGS[name].items())]
    config = config_lib.load(config_name, applied)
    b, t = config.train.batch_size, config.train.seq_len
    start = time.perf_counter()
    compiled, state = compiled_train_step(config, b, t, concrete=True)
    runs[name] = {
      'config': config,
      'applied': applied,
      'compiled': compiled,
      'state': state,
      'compile_s': time.perf_counter() - start,
      'batch': synthetic_batch(config.model.vocab_size, b, t),
      'times': [],
    }
  for i in range(steps + 2):
    for r in runs.values():
      begin = time.perf_counter()
      r['state'], metrics = r['compiled'](r['state'], r['batch'], jnp.int32(i))
      jax.block_until_ready(metrics)
      if i >= 2:
        r['times'].append(time.perf_counter() - begin)
  results = {}
  for name, r in runs.items():
    config, median = r['config'], float(np.median(r['times']))
    b, t = config.train.batch_size, config.train.seq_len
    flops = train_flops_per_token(ModelConfig.from_config(config.model), t) * b * t
    results[name] = {
      'median_ms': 1e3 * median,
      'mean_ms': 1e3 * float(np.mean(r['times'])),
      'compile_s': r['compile_s'],
      'tokens_per_sec': b * t / median,
      'mfu': flops / median / peak,
      'overrides': r['applied'],
    }
  base = results['baseline']['median_ms']
  for r in results.values():
    r['vs_baseline'] = r['median_ms'] / base
  report = {'config': config_name, 'steps': steps, 'settings': results}
  if 'preset' in results:
    preset_steps = runs['preset']['config'].train.steps
    report['equal_time_baseline_steps'] = round(preset_steps * results['preset']['vs_baseline'])
  return report


def memory(config_name: str, seq_len: int, batch: int) -> dict:
  results = {}
  for name, overrides in {
    'last_exit_only': dict(p_max=0.0, e_scale=0.0),
    'all_exits': dict(p_max=0.1, e_scale=1.0, curriculum='none'),
    'all_exits_distilled': dict(p_max=0.1, e_scale=1.0, curriculum='none', distill_weight=0.5, distill='soft'),
  }.items():
    config = config_lib.load(
      config_name,
      {
        **{f'layerskip.{k}': v for k, v in overrides.items()},
        'train.seq_len': seq_len,
        'train.batch_size': batch,
        'train.grad_accum_steps': 1,
      },
    )
    compiled, _ = compiled_train_step(config, batch, seq_len, concrete=False)
    analysis = compiled.memory_analysis()
    results[name] = {
      'temp_bytes': int(analysis.temp_size_in_bytes),
      'argument_bytes': int(analysis.argument_size_in_bytes),
      'output_bytes': int(analysis.output_size_in_bytes),
    }
  results['all_over_last_temp'] = results['all_exits']['temp_bytes'] / results['last_exit_only']['temp_bytes']
  results['distilled_over_all_temp'] = results['all_exits_distilled']['temp_bytes'] / results['all_exits']['temp_bytes']
  return {'config': config_name, 'seq_len': seq_len, 'batch': batch, **results}


FLOPS_SETTINGS = ('baseline', 'preset', 'preset_tokens0.25', 'preset_tokens0.125')


def flops(
  config_name: str, seq_len: int, batch: int, names: tuple[str, ...] = FLOPS_SETTINGS, overrides: list[str] = ()
) -> dict:
  """FLOPs of one train step of `config_name` at batch x seq_len, per SPEED_SETTINGS entry, from XLA's cost analysis
  of the compiled step (never run), and each one's ratio to the plain step.

  XLA counts a loop's body once, whatever its trip count, so each step is compiled with its layers unrolled
  (model.scan_unroll = L), each exit's cross-entropy in one chunk (ce_chunk_len = seq_len) and dense attention
  (attention_impl xla: no loop over key blocks; it also counts the masked half of the causal scores, so the ratios
  are slightly conservative). What remains a loop is the scan over the early exits a step computes, a static count
  n (the curriculum's maximum: entries of zero weight are computed too), whose body, one exit's head, loss and
  gradient, is counted once. So a setting's step costs plain + n x (its count - the plain count); the layer-dropout
  masks, also in that difference, are counted n times over (a few elementwise FLOPs per layer and sample).
  `overrides` (k=v) apply to config_name before each setting's own."""
  from layerskip_jax.objective.objective_config import ObjectiveConfig

  results = {}
  for name in dict.fromkeys(['baseline', *names]):
    applied = [
      *overrides,
      *(f'layerskip.{k}={v}' for k, v in SPEED_SETTINGS[name].items()),
      f'train.seq_len={seq_len}',
      f'train.batch_size={batch}',
      'train.grad_accum_steps=1',
      f'layerskip.ce_chunk_len={seq_len}',
      'model.attention_impl=xla',
    ]
    config = config_lib.load(config_name, applied)
    config = config_lib.load(config_name, [*applied, f'model.scan_unroll={config.model.num_hidden_layers}'])
    compiled, _ = compiled_train_step(config, batch, seq_len, concrete=False)
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    early = ObjectiveConfig.from_config(config).num_early_exits(config.model.num_hidden_layers)
    results[name] = {
      'counted_flops': float(analysis['flops']),
      'early_exits_computed': early,
      'overrides': SPEED_SETTINGS[name],
    }
  plain = results['baseline']['counted_flops']
  for r in results.values():
    r['one_exit_flops'] = r['counted_flops'] - plain if r['early_exits_computed'] else 0.0
    r['step_flops'] = plain + r['early_exits_computed'] * r['one_exit_flops']
    r['vs_baseline'] = r['step_flops'] / plain
  return {'config': config_name, 'seq_len': seq_len, 'batch': batch, 'settings': results}


LOOP_SETTINGS = {  # name -> overrides of the trainer's config (on top of --config and the command line's)
  'log_every_1': {'train.log_every': 1},
  'log_every_10': {'train.log_every': 10},
  'log_every_1_no_prefetch': {'train.log_every': 1, 'data.prefetch': 0},
}


class _CompiledStepTimer:
  """The trainer's compiled step alone, on one device-resident batch of the run's data: steps dispatched back to
  back without waiting, one block at the end. Timed right before and after each loop run (a shared machine's
  load drifts)."""

  def __init__(self, config):
    from layerskip_jax import sharding
    from layerskip_jax.data import loader
    from layerskip_jax.data.cache import ensure_prepared
    from layerskip_jax.train.state import compile_steps, init_state

    mesh = sharding.make_mesh(config.mesh)
    self.steps = compile_steps(config, mesh, with_eval=False)
    self.state = init_state(config, self.steps)
    t = config.train
    host = next(iter(loader.dataset(ensure_prepared(config).train, t.seq_len, t.batch_size, seed=t.seed)))
    self.batch = loader.to_global_array(host, mesh)
    self.ms(3)  # warm-up

  def ms(self, repeats: int) -> float:
    """ms per step over `repeats` steps."""
    begin = time.perf_counter()
    for i in range(repeats):
      self.state, metrics = self.steps.train(self.state, self.batch, jnp.int32(i))
    jax.block_until_ready((self.state, metrics))
    return 1e3 * (time.perf_counter() - begin) / repeats


def _loop_ms(rows: list[dict]) -> float:
  """The loop's wall ms per step from its rows' step_time (each the mean since the previous row), rows after the
  first (which holds the warm-up)."""
  total = steps = 0
  for previous, row in zip(rows, rows[1:]):
    total += row['step_time'] * (row['step'] - previous['step'])
    steps += row['step'] - previous['step']
  return 1e3 * total / steps


def loop(config_name: str, steps: int, overrides: list[str]) -> dict:
  """Each LOOP_SETTINGS run of the trainer: host ms per step, stalls, wall ms per step against the step alone."""
  from layerskip_jax.train import trainer

  base = {'train.steps': steps, 'train.eval_every': 0, 'data.eval_split': '', 'checkpoint.every_steps': 10**9}
  config = config_lib.load(config_name, [*(f'{k}={v}' for k, v in base.items()), *overrides])
  tokens = config.train.batch_size * config.train.seq_len
  timer = _CompiledStepTimer(config)
  results = {}
  for name, setting in LOOP_SETTINGS.items():
    run_config = config_lib.load(config_name, [*(f'{k}={v}' for k, v in {**base, **setting}.items()), *overrides])
    alone = [timer.ms(steps // 2)]
    with tempfile.TemporaryDirectory() as workdir:
      stats = trainer.train(run_config, workdir)['loop']
      rows = [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
    alone.append(timer.ms(steps // 2))
    loop_ms, step_ms = _loop_ms([r for r in rows if 'split' not in r]), float(np.mean(alone))
    results[name] = {
      'overrides': setting,
      'loop_ms': loop_ms,
      'tokens_per_sec': tokens / loop_ms * 1e3,
      'host_ms': 1e3 * stats['host_seconds'] / stats['steps'],
      'idle_dispatches': stats['idle_dispatches'],
      'steps': stats['steps'],
      'compiled_step_ms': alone,
      'compiled_step_tokens_per_sec': tokens / step_ms * 1e3,
      'loop_minus_step_ms': loop_ms - step_ms,
    }
  return {
    'config': config_name,
    'steps': steps,
    'batch': config.train.batch_size,
    'seq_len': config.train.seq_len,
    'settings': results,
  }


def input_pipeline(config_name: str, steps: int, batches: int, overrides: list[str] = ()) -> dict:
  """The loader's tokens/s (every row, one process) and the compiled train step's, on the config's own data."""
  from layerskip_jax.data import loader
  from layerskip_jax.data.throughput import loader_rate
  from layerskip_jax.data.cache import ensure_prepared

  config = config_lib.load(config_name, overrides)
  b, t = config.train.batch_size, config.train.seq_len
  prepared = ensure_prepared(config)
  loader_tps = loader_rate(
    prepared.train, t, b, loader.Rows.all(b), batches, config.train.seed, config.data.num_workers
  )
  compiled, state = compiled_train_step(config, b, t, concrete=True)
  iterator = iter(loader.dataset(prepared.train, t, b, seed=config.train.seed))
  batch = {k: jnp.asarray(v) for k, v in next(iterator).items()}
  iterator.close()
  times = []
  for i in range(steps + 1):
    begin = time.perf_counter()
    state, metrics = compiled(state, batch, jnp.int32(i))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - begin)
  step_tps = b * t / float(np.median(times[1:]))
  return {
    'config': config_name,
    'batch': b,
    'seq_len': t,
    'loader_tokens_per_sec': loader_tps,
    'train_step_tokens_per_sec': step_tps,
    'loader_over_train': loader_tps / step_tps,
  }


def main(args: cli.Args) -> None:
  f = flags.FLAGS
  unknown = [w for w in f.what if w not in WHAT]
  if unknown or not f.what:
    raise UsageError(f'--what={",".join(f.what)}: expected any of {", ".join(WHAT)}')
  for name in ('steps', 'memory_seq_len', 'memory_batch', 'loop_steps', 'input_batches'):
    if f[name].value < 1:
      raise UsageError(f'--{name}={f[name].value}: must be at least 1')
  unknown = [s for s in f.speed_settings or () if s not in SPEED_SETTINGS]
  if unknown or f.speed_settings == []:
    raise UsageError(f'--speed_settings={",".join(f.speed_settings)}: expected any of {", ".join(SPEED_SETTINGS)}')
  json_path = outputs.check_file('--json', f.json)  # before the benchmark, not after it
  report = {'backend': jax.default_backend(), 'devices': jax.device_count()}
  if 'speed' in f.what or 'torch' in f.what:
    report['matmul_peak_gflops'] = matmul_peak_flops() / 1e9
    print(f'measured float32 matmul peak: {report["matmul_peak_gflops"]:.0f} GFLOP/s (the MFU denominator)')
  if 'speed' in f.what:
    report['speed'] = speed(
      f.config, f.steps, report['matmul_peak_gflops'] * 1e9, f.speed_settings, args.config_overrides
    )
    print(f'train step on {f.config} ({report["backend"]}), median of {f.steps} interleaved steps:')
    for name, r in report['speed']['settings'].items():
      print(
        f'  {name:36s} {r["median_ms"]:8.1f} ms  {r["vs_baseline"]:5.2f}x baseline  '
        f'{r["tokens_per_sec"]:8.0f} tok/s  MFU {r["mfu"]:.2f}'
      )
    if 'equal_time_baseline_steps' in report['speed']:
      print(f'  a baseline as long as the preset\'s run: {report["speed"]["equal_time_baseline_steps"]} steps')
  if 'torch' in f.what:
    report['torch'] = torch_reference(f.config, f.steps)
    if report['torch'] is None:
      print('torch: not installed (pip install -r requirements-dev.txt)')
    else:
      r = report['torch']
      print(
        f'  {"transformers (torch " + r["torch"] + ")":32s} {r["median_ms"]:8.1f} ms  {"":15s} '
        f'{r["tokens_per_sec"]:8.0f} tok/s'
      )
      if 'speed' in report:
        ours = report['speed']['settings']['baseline']['tokens_per_sec']
        report['baseline_over_torch'] = ours / r['tokens_per_sec']
        print(f'  our plain step / torch: {report["baseline_over_torch"]:.2f}x tokens/s')
  if 'memory' in f.what:
    report['memory'] = m = memory(f.memory_config, f.memory_seq_len, f.memory_batch)
    print(f'compiled train-step temporary memory, {f.memory_config}, seq {f.memory_seq_len}, batch {f.memory_batch}:')
    for name in ('last_exit_only', 'all_exits', 'all_exits_distilled'):
      print(f'  {name:20s} {m[name]["temp_bytes"] / 2**30:8.2f} GiB')
    print(
      f'  all exits / last exit only: {m["all_over_last_temp"]:.3f}x; with soft self-distillation / without: '
      f'{m["distilled_over_all_temp"]:.3f}x'
    )
  if 'flops' in f.what:
    report['flops'] = r = flops(f.memory_config, f.memory_seq_len, f.memory_batch, overrides=args.config_overrides)
    print(
      f'compiled train-step FLOPs, {f.memory_config}, seq {f.memory_seq_len}, batch {f.memory_batch} (XLA cost '
      'analysis, layers unrolled; early exits: computed per step x one exit):'
    )
    for name, s in r['settings'].items():
      print(
        f'  {name:20s} {s["step_flops"] / 1e12:8.2f} TFLOP  {s["vs_baseline"]:5.3f}x baseline  '
        f'({s["early_exits_computed"]} early exits of {s["one_exit_flops"] / 1e9:.1f} GFLOP)'
      )
  if 'loop' in f.what:
    report['loop'] = r = loop(f.config, f.loop_steps, args.config_overrides)
    print(
      f'training loop on {f.config} ({r["batch"]} x {r["seq_len"]} tokens, {f.loop_steps} steps per setting): '
      'host work per step outside waits for the device; steps dispatched after the previous one had finished '
      '(the device waited for the host); the loop against its compiled step alone (timed just before and after)'
    )
    for name, s in r['settings'].items():
      print(
        f'  {name:24s} host {s["host_ms"]:5.1f} ms/step, device waited before {s["idle_dispatches"]:3d} of '
        f'{s["steps"]} steps; loop {s["loop_ms"]:7.1f} ms/step {s["tokens_per_sec"]:6.0f} tok/s, step alone '
        f'{" / ".join(f"{v:.1f}" for v in s["compiled_step_ms"])} ms'
      )
  if 'input' in f.what:
    report['input'] = r = input_pipeline(f.config, f.steps, f.input_batches, args.config_overrides)
    print(
      f'input pipeline on {f.config} ({r["batch"]} x {r["seq_len"]} tokens): loader '
      f'{r["loader_tokens_per_sec"]:,.0f} tokens/s, train step {r["train_step_tokens_per_sec"]:,.0f} tokens/s: '
      f'the loader delivers {r["loader_over_train"]:,.1f}x what the step consumes'
    )
  if json_path:
    outputs.write_text(json_path, json.dumps(report, indent=2))
    print(f'wrote {f.json}')


if __name__ == '__main__':
  cli.run(main)

"""Generation benchmark: decode speed, acceptance and agreement per strategy, the (E, d) sweep, the floor.

    python -m layerskip_jax.benchmark --ckpt DIR (--prompts FILE | --source python_stdlib --num_prompts N)
        --strategies autoregressive,early_exit,self_speculative --exit_layers 2,4,6 --num_speculations 2,4,6
        --batch_sizes 1,4 --max_new_tokens 64 --json OUT.json [--plot OUT.png] [--hf]

Compilation is excluded (a warm-up run first); prefill and decode are timed separately; each setting runs
--repeats times and the median is reported. Speed-up is autoregressive decode time per token over the setting's, on
the same prompts and batch size; agreement is the share of rows whose tokens equal autoregressive's (greedy). The
floor (spec section 2.3) is the timed chain of the model's own weight matmuls for one token, in the same run.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from layerskip_jax import api, cli
from layerskip_jax.data.sources import open_source
from layerskip_jax.errors import UsageError
from layerskip_jax.inference.decode import STRATEGIES


def read_prompts(path: str, tokenizer) -> list:
  """interfaces.md prompt files: a line of whitespace-separated integers is token ids, other lines are text; or
  JSONL with a `prompt` field (a string or a list of ids)."""
  file = pathlib.Path(path).expanduser()
  if not file.is_file():
    raise UsageError(f'--prompts={path}: no such file')
  prompts = []
  for number, line in enumerate(file.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    if path.endswith('.jsonl'):
      try:
        prompt = json.loads(line)['prompt']
      except (json.JSONDecodeError, KeyError, TypeError):
        raise UsageError(f'{path}:{number}: expected a JSON object with a "prompt" field') from None
    elif all(part.isdigit() for part in line.split()):
      prompt = [int(part) for part in line.split()]
    else:
      prompt = line
    if isinstance(prompt, str) and tokenizer is None:
      raise UsageError(f'{path}:{number}: text prompt, but the checkpoint has no tokenizer; give token ids')
    prompts.append(tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt])
  if not prompts:
    raise UsageError(f'--prompts={path}: no prompts')
  return prompts


def source_prompts(lm: api.LoadedModel, source: str, split: str, count: int, length: int) -> list[list[int]]:
  if lm.tokenizer is None:
    raise UsageError(f'--source={source}: the checkpoint has no tokenizer; use --prompts with token ids')
  prompts = []
  for doc in open_source(source, split).documents():
    ids = lm.tokenizer.encode(doc.text or doc.prompt or '')
    if len(ids) >= length:
      prompts.append(ids[:length])
    if len(prompts) == count:
      return prompts
  raise UsageError(f'--source={source}: fewer than {count} documents of {length} tokens')


def weight_matmul_floor(lm: api.LoadedModel, repeats: int = 200) -> float:
  """Seconds for the chain of the model's weight matmuls for one token (each layer's projections and MLP, then the
  head; no attention, no cache), with every weight a separate argument so nothing is sliced or copied."""
  config = lm.model.config
  layers = nnx.to_pure_dict(nnx.state(lm.model.layers))
  names = [('self_attn', 'q_proj'), ('self_attn', 'k_proj'), ('self_attn', 'v_proj'), ('self_attn', 'o_proj'),
           ('mlp', 'gate_proj'), ('mlp', 'up_proj'), ('mlp', 'down_proj')]
  weights = [[jnp.asarray(np.asarray(layers[a][b])[l]) for a, b in names] for l in range(config.num_hidden_layers)]
  head = lm.model.embed_tokens[...].T if config.tie_word_embeddings else lm.model.lm_head[...]
  head = jnp.asarray(np.asarray(head))

  @jax.jit
  def chain(weights, head, x):
    for q, k, v, o, g, u, d in weights:
      dt = q.dtype
      x = x.astype(dt)
      kv = x @ k + x @ v  # attention itself is left out; its inputs and output projection are not
      h = x + (x @ q).at[:, :kv.shape[1]].add(kv) @ o
      x = h + (jax.nn.silu(h @ g) * (h @ u)) @ d
    return x @ head

  x = jnp.ones((1, config.hidden_size), config.weight_dtype)
  chain(weights, head, x).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    chain(weights, head, x).block_until_ready()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _timed(lm, batches, repeats, **kw) -> dict[str, Any]:
  for batch in batches:  # warm-up: compile
    lm.generate(batch, **kw)
  runs = []
  for _ in range(repeats):
    prefill = decode = 0.0
    new_tokens = drafted = accepted = 0
    tokens = []
    for batch in batches:
      r = lm.generate(batch, **kw)
      prefill += r.stats['prefill_seconds']
      decode += r.stats['decode_seconds']
      new_tokens += r.stats['new_tokens'] - len(batch)  # the first token of each row comes from the prefill
      drafted += r.stats['drafted']
      accepted += r.stats['accepted']
      tokens += r.tokens
    runs.append((decode / max(new_tokens, 1), prefill / len(batches), drafted, accepted, tokens))
  ms = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
  return {'ms_per_token': 1e3 * ms[0], 'tokens_per_sec': 1.0 / ms[0], 'prefill_ms': 1e3 * ms[1],
          'acceptance_rate': ms[3] / ms[2] if ms[2] else None, 'tokens': ms[4]}


def hf_reference(lm: api.LoadedModel, prompts: list[list[int]], max_new: int, exit_layers: list[int],
                 repeats: int) -> dict[str, Any] | None:
  """transformers' greedy generate and assistant_early_exit=E on the same weights (batch 1), or None."""
  try:
    import torch
    import transformers
  except ImportError:
    return None
  from layerskip_jax.convert import export_hf
  with tempfile.TemporaryDirectory() as tmp:
    export_hf(lm.checkpoint.step_dir, pathlib.Path(tmp) / 'hf')
    model = transformers.LlamaForCausalLM.from_pretrained(pathlib.Path(tmp) / 'hf').eval()

  def run(**kw):
    times, total = [], 0
    for _ in range(repeats + 1):
      start, total = time.perf_counter(), 0
      with torch.no_grad():
        for p in prompts:
          out = model.generate(torch.tensor([p]), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                               **kw)
          total += out.shape[1] - len(p)
      times.append((time.perf_counter() - start) / total)
    t = float(np.median(times[1:]))
    return {'ms_per_token': 1e3 * t, 'tokens_per_sec': 1 / t}

  result = {'greedy': run()}
  for e in exit_layers:
    result[f'assistant_early_exit_{e}'] = run(assistant_early_exit=e)
  return result


def best_setting(settings: list[dict], batch: int) -> dict | None:
  """The self-speculative setting of `batch` with the highest measured speed-up."""
  candidates = [s for s in settings if s['strategy'] == 'self_speculative' and s['batch_size'] == batch]
  return max(candidates, key=lambda s: s['speedup']) if candidates else None


def _plot(path: str, settings: list[dict], batch: int) -> None:
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    raise UsageError('--plot needs matplotlib (pip install -r requirements-dev.txt)') from None
  spec = [s for s in settings if s['strategy'] == 'self_speculative' and s['batch_size'] == batch]
  es, ds = sorted({s['exit_layer'] for s in spec}), sorted({s['num_speculations'] for s in spec})
  grid = np.full((len(es), len(ds)), np.nan)
  for s in spec:
    grid[es.index(s['exit_layer']), ds.index(s['num_speculations'])] = s['speedup']
  fig, ax = plt.subplots(figsize=(1.2 * len(ds) + 2, 1.0 * len(es) + 1.5))
  im = ax.imshow(grid, cmap='viridis', origin='lower')
  for i in range(len(es)):
    for j in range(len(ds)):
      ax.text(j, i, f'{grid[i, j]:.2f}x', ha='center', va='center', color='w')
  ax.set_xticks(range(len(ds)), ds)
  ax.set_yticks(range(len(es)), es)
  ax.set(xlabel='d (drafts per round)', ylabel='E (draft layers)',
         title=f'self-speculative speed-up over autoregressive, batch {batch}')
  fig.colorbar(im)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def run_benchmark(lm: api.LoadedModel, prompts: list[list[int]], *, strategies, exit_layers, num_speculations,
                  batch_sizes, max_new_tokens, repeats) -> dict[str, Any]:
  unknown = [s for s in strategies if s not in STRATEGIES]
  if unknown:
    raise UsageError(f'--strategies: {unknown[0]!r} is not one of {", ".join(STRATEGIES)}')
  d_max = max(num_speculations)
  settings = []
  for batch_size in batch_sizes:
    if batch_size > len(prompts):
      raise UsageError(f'--batch_sizes={batch_size}: more than the {len(prompts)} prompts')
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts) - batch_size + 1, batch_size)]
    common = dict(max_new_tokens=max_new_tokens, max_speculations=d_max)
    ar = _timed(lm, batches, repeats, strategy='autoregressive', **common)
    plan = [('autoregressive', None, None)] if 'autoregressive' in strategies else []
    plan += [('early_exit', e, None) for e in exit_layers if 'early_exit' in strategies]
    plan += [('self_speculative', e, d) for e in exit_layers for d in num_speculations
             if 'self_speculative' in strategies and e < lm.num_layers]
    for strategy, e, d in plan:
      r = ar if strategy == 'autoregressive' else _timed(lm, batches, repeats, strategy=strategy, exit_layer=e,
                                                         num_speculations=d or 1, **common)
      settings.append({'strategy': strategy, 'batch_size': batch_size, 'exit_layer': e, 'num_speculations': d,
                       'ms_per_token': r['ms_per_token'], 'tokens_per_sec': r['tokens_per_sec'],
                       'prefill_ms': r['prefill_ms'], 'acceptance_rate': r['acceptance_rate'],
                       'speedup': ar['ms_per_token'] / r['ms_per_token'],
                       'agreement': float(np.mean([a == b for a, b in zip(r['tokens'], ar['tokens'])]))})
  return {'settings': settings, 'best': {str(b): best_setting(settings, b) for b in batch_sizes}}


def main(args: cli.Args) -> None:
  f = flags.FLAGS
  if not f.ckpt:
    raise UsageError('--ckpt is required')
  if bool(f.prompts) == bool(f.source):
    raise UsageError('give exactly one of --prompts FILE and --source NAME')
  lm = api.load(f.ckpt)
  prompts = (read_prompts(f.prompts, lm.tokenizer) if f.prompts
             else source_prompts(lm, f.source, f.split, f.num_prompts, f.prompt_len))
  try:
    exit_layers, speculations, batch_sizes = ([int(v) for v in values] for values in (
        f.exit_layers, f.num_speculations, f.batch_sizes))
  except ValueError:
    raise UsageError('--exit_layers, --num_speculations and --batch_sizes take comma-separated integers') from None
  report = {'ckpt': str(lm.checkpoint.root), 'backend': jax.default_backend(), 'num_layers': lm.num_layers,
            'num_prompts': len(prompts), 'max_new_tokens': f.max_new_tokens, 'repeats': f.repeats,
            'date': time.strftime('%Y-%m-%d')}
  report.update(run_benchmark(lm, prompts, strategies=f.strategies, exit_layers=exit_layers,
                              num_speculations=speculations, batch_sizes=batch_sizes,
                              max_new_tokens=f.max_new_tokens, repeats=f.repeats))
  report['floor_ms_per_token'] = 1e3 * weight_matmul_floor(lm)
  print(f'{"strategy":>17} {"B":>2} {"E":>2} {"d":>2} {"ms/token":>9} {"tok/s":>8} {"prefill ms":>10} '
        f'{"accept":>7} {"speed-up":>8} {"agree":>6}')
  for s in report['settings']:
    accept = f'{s["acceptance_rate"]:.2f}' if s['acceptance_rate'] is not None else '-'
    print(f'{s["strategy"]:>17} {s["batch_size"]:>2} {s["exit_layer"] or "-":>2} {s["num_speculations"] or "-":>2} '
          f'{s["ms_per_token"]:>9.3f} {s["tokens_per_sec"]:>8.0f} {s["prefill_ms"]:>10.1f} {accept:>7} '
          f'{s["speedup"]:>7.2f}x {s["agreement"]:>6.2f}')
  ar1 = next((s for s in report['settings'] if s['strategy'] == 'autoregressive' and s['batch_size'] == 1), None)
  if ar1:
    report['autoregressive_over_floor'] = ar1['ms_per_token'] / report['floor_ms_per_token']
    print(f'floor (weight-matmul chain, one token): {report["floor_ms_per_token"]:.3f} ms; autoregressive at batch 1 '
          f'is {report["autoregressive_over_floor"]:.2f}x it')
  for b, best in report['best'].items():
    if best:
      print(f'best at batch {b}: E={best["exit_layer"]} d={best["num_speculations"]}: {best["speedup"]:.2f}x '
            f'autoregressive, agreement {best["agreement"]:.2f}')
  if f.hf:
    report['hf'] = hf_reference(lm, prompts, f.max_new_tokens, exit_layers, f.repeats)
    if report['hf'] is None:
      print('--hf: transformers/torch not installed')
    else:
      for name, r in report['hf'].items():
        print(f'transformers {name}: {r["ms_per_token"]:.3f} ms/token')
  if f.json:
    pathlib.Path(f.json).write_text(json.dumps(report, indent=2))
    print(f'wrote {f.json}')
  if f.plot:
    _plot(f.plot, report['settings'], batch_sizes[0])
    print(f'wrote {f.plot}')


def define_flags() -> None:
  """The command line's flags (defined only when it runs: the modules are imported by tests and notebooks)."""
  flags.DEFINE_string('ckpt', None, 'checkpoint directory')
  flags.DEFINE_string('prompts', None, 'prompt file: one prompt per line (a line of integers = token ids), or JSONL '
                      'with a "prompt" field (string or list of ids)')
  flags.DEFINE_string('source', None, 'take prompts from the documents of this source instead (e.g. python_stdlib)')
  flags.DEFINE_string('split', 'heldout', 'split of --source')
  flags.DEFINE_integer('num_prompts', 4, 'prompts taken from --source')
  flags.DEFINE_integer('prompt_len', 64, 'tokens per prompt taken from --source')
  flags.DEFINE_list('strategies', list(STRATEGIES), 'strategies to run')
  flags.DEFINE_list('exit_layers', ['2', '4', '6'], 'E values (early exit and self-speculative)')
  flags.DEFINE_list('num_speculations', ['2', '4', '6'], 'd values (self-speculative)')
  flags.DEFINE_list('batch_sizes', ['1'], 'batch sizes')
  flags.DEFINE_integer('max_new_tokens', 64, 'tokens generated per prompt')
  flags.DEFINE_integer('repeats', 3, 'timed runs per setting (median)')
  flags.DEFINE_bool('hf', False, 'also time transformers generate (plain and assistant_early_exit) on the same weights')
  flags.DEFINE_string('json', None, 'write the results here')
  flags.DEFINE_string('plot', None, 'draw the speed-up heatmap over (E, d) at the first batch size into this PNG')


if __name__ == '__main__':
  define_flags()
  cli.run(main)

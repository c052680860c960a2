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
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from layerskip_jax import api, cli, outputs
from layerskip_jax.data.sources import open_source
from layerskip_jax.errors import UsageError, describe_json
from layerskip_jax.inference.cache import check_length
from layerskip_jax.inference.decode import STRATEGIES

_JSONL_EXAMPLE = '{"prompt": "def f(x):"} or {"prompt": [1, 15, 27]}'


def _jsonl_prompt(where: str, line: str) -> str | list[int]:
  """The prompt of one JSONL record: a non-empty string or list of integer ids."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise UsageError(f'{where}: not JSON ({e.msg}, column {e.colno}); each line of a .jsonl prompt file is an object '
                     f'like {_JSONL_EXAMPLE}') from None
  if not isinstance(record, dict):
    raise UsageError(f'{where}: {describe_json(record)}, not an object; each line of a .jsonl prompt file is an object '
                     f'like {_JSONL_EXAMPLE}')
  if 'prompt' not in record:
    fields = ', '.join(sorted(record)) or 'none'
    raise UsageError(f'{where}: the record has no "prompt" field (its fields: {fields}); add one: text or a list of '
                     'token ids')
  prompt = record['prompt']
  if isinstance(prompt, str):
    if not prompt.strip():
      raise UsageError(f'{where}: "prompt" is empty; give text (or token ids), or remove the line')
    return prompt
  if not isinstance(prompt, list):
    raise UsageError(f'{where}: "prompt" is {describe_json(prompt)}; give text (a string) or a list of token ids')
  if not prompt:
    raise UsageError(f'{where}: "prompt" is an empty list; give at least one token id, or remove the line')
  for i, token in enumerate(prompt):
    if not isinstance(token, int) or isinstance(token, bool):
      raise UsageError(f'{where}: "prompt" item {i} is {json.dumps(token)}, not a token id; give a list of integers')
  return prompt


def read_prompts(path: str, tokenizer, vocab_size: int | None = None, *, flag: str = '--prompts') -> list:
  """interfaces.md prompt files: a line of whitespace-separated integers is token ids, other lines are text; or
  JSONL (a .jsonl file) with a `prompt` field (a string or a list of ids). Blank lines are skipped. Every line is
  checked (UTF-8, the record, the ids against `vocab_size` when given) and a bad one is an error naming the file and
  line."""
  file = pathlib.Path(path).expanduser()
  if file.is_dir():
    raise UsageError(f'{flag}={path}: is a directory; give a prompt file')
  if not file.is_file():
    raise UsageError(f'{flag}={path}: no such file')
  try:
    data = file.read_bytes()
  except OSError as e:
    raise UsageError(f'{flag}={path}: cannot be read ({outputs.describe_os_error(e)})') from None
  prompts = []
  for number, raw in enumerate(data.splitlines(), start=1):
    where = f'{path}:{number}'
    try:
      line = raw.decode('utf-8-sig' if number == 1 else 'utf-8')  # a byte-order mark (Windows editors) is not text
    except UnicodeDecodeError as e:
      raise UsageError(f'{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the '
                       'file as UTF-8') from None
    if not line.strip():
      continue
    prompt = _jsonl_prompt(where, line) if str(path).endswith('.jsonl') else api.token_ids(line) or line
    if isinstance(prompt, str):
      if tokenizer is None:
        raise UsageError(f'{where}: text prompt, but the checkpoint has no tokenizer; give token ids')
      prompt = tokenizer.encode(prompt)
    if vocab_size is not None:
      api.check_token_ids(where, prompt, vocab_size)
    prompts.append([int(t) for t in prompt])
  if not prompts:
    raise UsageError(f'{flag}={path}: no prompts (the file is empty or blank)')
  return prompts


def source_prompts(lm: api.LoadedModel | api.CheckpointInfo, source: str, split: str, count: int,
                   length: int) -> list[list[int]]:
  """`count` prompts of `length` tokens: the first tokens of the source's documents that have that many (needs only
  the tokenizer: an api.CheckpointInfo will do)."""
  if lm.tokenizer is None:
    raise UsageError(f'--source={source}: the checkpoint has no tokenizer; use --prompts with token ids')
  prompts = []
  for doc in open_source(source, split).documents():
    ids = lm.tokenizer.encode(doc.text or doc.prompt or '')
    if len(ids) >= length:
      prompts.append(ids[:length])
    if len(prompts) == count:
      return prompts
  raise UsageError(f'--source={source}: fewer than {count} documents of {length} tokens in its {split!r} split; '
                   'lower --num_prompts or --prompt_len')


def parse_integers(flag: str, values: Sequence[str]) -> list[int]:
  """A comma-separated list flag's integers; UsageError naming the flag and the value that is not one."""
  result = []
  for value in values:
    try:
      result.append(int(value.strip()))
    except ValueError:
      raise UsageError(f'{flag}={",".join(values)}: {value!r} is not an integer; give comma-separated integers, '
                       'e.g. 2,4,6') from None
  return result


def check_sweep(num_layers: int, *, strategies: Sequence[str], exit_layers: Sequence[int],
                num_speculations: Sequence[int], batch_sizes: Sequence[int], max_new_tokens: int, repeats: int,
                num_prompts: int | None = None, prefix: str = '') -> None:
  """Every value of a sweep, before any work: UsageError naming the one value that is wrong and what is allowed.
  `prefix` goes before the names ('--': the command's flags; '' for run_benchmark's arguments)."""
  def values(name: str, items: Sequence) -> str:
    return f'{prefix}{name}={",".join(map(str, items))}'

  if not strategies:
    raise UsageError(f'{prefix}strategies: empty; give one or more of {", ".join(STRATEGIES)}')
  for s in strategies:
    if s not in STRATEGIES:
      raise UsageError(f'{values("strategies", strategies)}: {s!r} is not a strategy; choose from '
                       f'{", ".join(STRATEGIES)}')
  uses_e = {'early_exit', 'self_speculative'} & set(strategies)
  for name, items, low, high, meaning in (
      ('exit_layers', exit_layers, 1, num_layers - 1,
       f'E counts the layers run; the model has {num_layers}, and E = {num_layers} would be the whole model'),
      ('num_speculations', num_speculations, 1, None, 'd is the drafts per self-speculative round'),
      ('batch_sizes', batch_sizes, 1, num_prompts,
       f'there are {num_prompts} prompts' if num_prompts is not None else 'rows per batch')):
    needed = {'exit_layers': uses_e, 'num_speculations': 'self_speculative' in strategies,
              'batch_sizes': True}[name]
    if not needed:  # e.g. the default --exit_layers with --strategies=autoregressive: not used, not checked
      continue
    if not items:
      raise UsageError(f'{prefix}{name}: empty; give one or more comma-separated integers')
    for item in items:
      if item < low or (high is not None and item > high):
        allowed = f'{low}..{high}' if high is not None else f'at least {low}'
        raise UsageError(f'{values(name, items)}: {item} is out of range: must be {allowed} ({meaning})')
      if list(items).count(item) > 1:
        raise UsageError(f'{values(name, items)}: {item} is given twice; give each value once')
  if max_new_tokens < 1:
    raise UsageError(f'{prefix}max_new_tokens={max_new_tokens}: must be at least 1')
  if repeats < 1:
    raise UsageError(f'{prefix}repeats={repeats}: must be at least 1 (timed runs per setting)')


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


def modelled_ms_per_token(ar: float, ee: float, d: int, acceptance_rate: float) -> float:
  """What a self-speculative round should cost per token (spec section 2.4): d + 1 tokens through layers [0, E)
  at the early exit's cost EE, and d + 1 rows verified through layers [E, L) at about one row's cost, AR - EE; the
  round yields 1 + a tokens, a = acceptance_rate x d accepted drafts."""
  return ((d + 1) * ee + (ar - ee)) / (1 + acceptance_rate * d)


def add_efficiency(settings: list[dict]) -> None:
  """Adds to each self-speculative setting its modelled ms/token (from the same run's autoregressive and
  early-exit rows at its batch size and E, and its measured acceptance) and efficiency = modelled / measured
  (1.0: the round costs what its layers cost; below: overhead). None where the early-exit row was not measured."""
  rows = {(s['strategy'], s['batch_size'], s['exit_layer']): s for s in settings}
  for s in settings:
    s['modelled_ms_per_token'] = s['efficiency'] = None
    ar = rows.get(('autoregressive', s['batch_size'], None))
    ee = rows.get(('early_exit', s['batch_size'], s['exit_layer']))
    if s['strategy'] == 'self_speculative' and ar and ee and s['acceptance_rate'] is not None:
      s['modelled_ms_per_token'] = modelled_ms_per_token(ar['ms_per_token'], ee['ms_per_token'],
                                                         s['num_speculations'], s['acceptance_rate'])
      s['efficiency'] = s['modelled_ms_per_token'] / s['ms_per_token']


def best_setting(settings: list[dict], batch: int) -> dict | None:
  """The self-speculative setting of `batch` with the highest measured speed-up."""
  candidates = [s for s in settings if s['strategy'] == 'self_speculative' and s['batch_size'] == batch]
  return max(candidates, key=lambda s: s['speedup']) if candidates else None


def _plot(path: str, settings: list[dict], batch: int) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
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
  outputs.save_figure(fig, path, dpi=120)


def run_benchmark(lm: api.LoadedModel, prompts: list[list[int]], *, strategies, exit_layers, num_speculations,
                  batch_sizes, max_new_tokens, repeats) -> dict[str, Any]:
  check_sweep(lm.num_layers, strategies=strategies, exit_layers=exit_layers, num_speculations=num_speculations,
              batch_sizes=batch_sizes, max_new_tokens=max_new_tokens, repeats=repeats, num_prompts=len(prompts))
  d_max = max(num_speculations, default=1)
  settings = []
  for batch_size in batch_sizes:
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts) - batch_size + 1, batch_size)]
    common = dict(max_new_tokens=max_new_tokens, max_speculations=d_max)
    ar = _timed(lm, batches, repeats, strategy='autoregressive', **common)
    plan = [('autoregressive', None, None)] if 'autoregressive' in strategies else []
    plan += [('early_exit', e, None) for e in exit_layers if 'early_exit' in strategies]
    plan += [('self_speculative', e, d) for e in exit_layers for d in num_speculations
             if 'self_speculative' in strategies]
    for strategy, e, d in plan:
      r = ar if strategy == 'autoregressive' else _timed(lm, batches, repeats, strategy=strategy, exit_layer=e,
                                                         num_speculations=d or 1, **common)
      settings.append({'strategy': strategy, 'batch_size': batch_size, 'exit_layer': e, 'num_speculations': d,
                       'ms_per_token': r['ms_per_token'], 'tokens_per_sec': r['tokens_per_sec'],
                       'prefill_ms': r['prefill_ms'], 'acceptance_rate': r['acceptance_rate'],
                       'speedup': ar['ms_per_token'] / r['ms_per_token'],
                       'agreement': float(np.mean([a == b for a, b in zip(r['tokens'], ar['tokens'])]))})
  add_efficiency(settings)
  return {'settings': settings, 'best': {str(b): best_setting(settings, b) for b in batch_sizes}}


def main(args: cli.Args, f: flags.FlagValues | None = None) -> None:
  f = flags.FLAGS if f is None else f
  if not f.ckpt:
    raise UsageError('--ckpt is required')
  if bool(f.prompts) == bool(f.source):
    raise UsageError('give exactly one of --prompts FILE and --source NAME')
  # Outputs, flags, the checkpoint's config and the prompts are checked before the weights are read or anything
  # is timed: a sweep takes minutes to hours, and its last step must not be the one that fails.
  # Beside the checkpoint's files is fine (launch/local.sh writes RUN/benchmark.json), over them is not.
  info = api.inspect(f.ckpt)
  inputs = {'--prompts': f.prompts, '--ckpt': info.checkpoint.parts}
  json_path = outputs.check_file('--json', f.json, inputs=inputs)
  plot_path = outputs.check_plot('--plot', f.plot, inputs=inputs, others={'--json': f.json})
  strategies = [s.strip() for s in f.strategies]
  exit_layers, speculations, batch_sizes = (parse_integers(flag, values) for flag, values in (
      ('--exit_layers', f.exit_layers), ('--num_speculations', f.num_speculations),
      ('--batch_sizes', f.batch_sizes)))
  if plot_path and 'self_speculative' not in strategies:
    raise UsageError(f'--plot={f.plot}: draws the self-speculative speed-up over (E, d); add self_speculative to '
                     '--strategies, or leave out --plot')
  for name, value in (('--num_prompts', f.num_prompts), ('--prompt_len', f.prompt_len)):
    if value < 1:
      raise UsageError(f'{name}={value}: must be at least 1')
  sweep = dict(strategies=strategies, exit_layers=exit_layers, num_speculations=speculations,
               batch_sizes=batch_sizes, max_new_tokens=f.max_new_tokens, repeats=f.repeats)
  check_sweep(info.num_layers, **sweep, prefix='--')
  prompts = (read_prompts(f.prompts, info.tokenizer, info.config.model.vocab_size) if f.prompts
             else source_prompts(info, f.source, f.split, f.num_prompts, f.prompt_len))
  check_sweep(info.num_layers, **sweep, num_prompts=len(prompts), prefix='--')
  d_max = max(speculations) if 'self_speculative' in strategies else 0
  check_length(info.model_config, max(map(len, prompts)), f.max_new_tokens, d_max, prefix='--')
  lm = info.load()
  report = {'ckpt': str(lm.checkpoint.root), 'backend': jax.default_backend(), 'num_layers': lm.num_layers,
            'num_prompts': len(prompts), 'max_new_tokens': f.max_new_tokens, 'repeats': f.repeats,
            'date': time.strftime('%Y-%m-%d')}
  report.update(run_benchmark(lm, prompts, **sweep))
  report['floor_ms_per_token'] = 1e3 * weight_matmul_floor(lm)
  print(f'{"strategy":>17} {"B":>2} {"E":>2} {"d":>2} {"ms/token":>9} {"tok/s":>8} {"prefill ms":>10} '
        f'{"accept":>7} {"speed-up":>8} {"agree":>6} {"modelled":>8} {"effic.":>6}')
  for s in report['settings']:
    accept = f'{s["acceptance_rate"]:.2f}' if s['acceptance_rate'] is not None else '-'
    modelled = f'{s["modelled_ms_per_token"]:.3f}' if s['modelled_ms_per_token'] is not None else '-'
    efficiency = f'{s["efficiency"]:.2f}' if s['efficiency'] is not None else '-'
    print(f'{s["strategy"]:>17} {s["batch_size"]:>2} {s["exit_layer"] or "-":>2} {s["num_speculations"] or "-":>2} '
          f'{s["ms_per_token"]:>9.3f} {s["tokens_per_sec"]:>8.0f} {s["prefill_ms"]:>10.1f} {accept:>7} '
          f'{s["speedup"]:>7.2f}x {s["agreement"]:>6.2f} {modelled:>8} {efficiency:>6}')
  print('modelled: ms/token a round of d drafts should cost, (d + 1) EE(E) + AR - EE(E) per 1 + accepted tokens '
        '(spec 2.4); effic.: modelled / measured (1.0 = no overhead)')
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
  if json_path:
    outputs.write_text(json_path, json.dumps(report, indent=2))
    print(f'wrote {f.json}')
  if plot_path:
    _plot(plot_path, report['settings'], batch_sizes[0])
    print(f'wrote {f.plot}')


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags (defined only when it runs: the modules are imported by tests and notebooks, and tests
  define them on their own FlagValues)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('ckpt', None, 'checkpoint directory', **fv)
  flags.DEFINE_string('prompts', None, 'prompt file: one prompt per line (a line of integers = token ids), or JSONL '
                      'with a "prompt" field (string or list of ids)', **fv)
  flags.DEFINE_string('source', None, 'take prompts from the documents of this source instead (e.g. python_stdlib)',
                      **fv)
  flags.DEFINE_string('split', 'heldout', 'split of --source', **fv)
  flags.DEFINE_integer('num_prompts', 4, 'prompts taken from --source', **fv)
  flags.DEFINE_integer('prompt_len', 64, 'tokens per prompt taken from --source', **fv)
  flags.DEFINE_list('strategies', list(STRATEGIES), 'strategies to run', **fv)
  flags.DEFINE_list('exit_layers', ['2', '4', '6'], 'E values (early exit and self-speculative)', **fv)
  flags.DEFINE_list('num_speculations', ['2', '4', '6'], 'd values (self-speculative)', **fv)
  flags.DEFINE_list('batch_sizes', ['1'], 'batch sizes', **fv)
  flags.DEFINE_integer('max_new_tokens', 64, 'tokens generated per prompt', **fv)
  flags.DEFINE_integer('repeats', 3, 'timed runs per setting (median)', **fv)
  flags.DEFINE_bool('hf', False, 'also time transformers generate (plain and assistant_early_exit) on the same '
                    'weights', **fv)
  flags.DEFINE_string('json', None, 'write the results here', **fv)
  flags.DEFINE_string('plot', None, 'draw the speed-up heatmap over (E, d) at the first batch size into this PNG '
                      '(or .pdf, .svg)', **fv)


if __name__ == '__main__':
  define_flags()
  cli.run(main)

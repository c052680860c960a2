"""Generation benchmark: decode speed, acceptance and agreement per strategy, the (E, d) sweep, the floor.

    python -m layerskip_jax.benchmark --ckpt DIR (--prompts FILE | --source python_stdlib [--num_prompts 16])
        --strategies autoregressive,early_exit,self_speculative --exit_layers 2,4,6 --num_speculations 2,4,6
        [--confidence_thresholds 0.4,0.6,adapt] [--d_bucket N] [--auto [--calibration_prompts 4]]
        --batch_sizes 1,4 --max_new_tokens 64 --repeats 3 --json OUT.json [--plot OUT.png] [--hf]

What is measured, and why it is measured this way:
- Prompts. --source takes 16 held-out prompts by default, alternately a document's first tokens and a window that
  starts at the middle of a document: a file's start (imports, a licence, a docstring) is not what most decoding
  sees, and four prompts said little about the spread.
- Timing. Compilation is excluded: every setting is run once first (a warm-up that compiles it). Then each of
  --repeats rounds runs every setting once in turn (round-robin, starting one setting later each round), and each
  setting reports its median round (the upper middle one for an even count). Running all repeats of one setting
  before the next let this machine's drift (20-30% over minutes) favour whichever settings ran in a fast spell;
  interleaved, the drift falls on every setting alike. Prefill and decode are timed separately.
- Speed-up is autoregressive decode time per token over the setting's, on the same prompts and batch size;
  agreement is the share of rows whose tokens equal autoregressive's (greedy). Its 95% interval is a bootstrap over
  the prompts (over batches when batch > 1): 1000 resamples with replacement (a fixed seed, the same resamples for
  every setting of a batch size), each giving the ratio of the two ms/token (decode seconds over new tokens, summed
  over the resampled batches) from each setting's median round. It shows how much the speed-up depends on which
  prompts were drawn, not the timing noise of the rounds. acceptance_quartiles are the quartiles of the per-prompt
  (per-row) acceptance rates.
- Adaptive drafting (spec section 2.5): --confidence_thresholds adds, for each value t, every self-speculative
  (E, d) with drafting stopped per row when the early exit's top probability is below t (`adapt`: the threshold
  adapted online from its default).
- --auto asks layerskip_jax.inference.calibrate to choose (E, d, threshold) on the first --calibration_prompts
  prompts (before the timed rounds; those prompts are also timed, so its choice has seen a little of the test) and
  times that choice with the rest: how close an automatic choice gets to the best of the sweep.
- programs_compiled counts the XLA programs (prefill and decode loop) compiled during the run. With --d_bucket 0
  each d is its own program (its verify block is d + 1 rows); --d_bucket N verifies N + 1 rows for every d in one
  shared program: fewer compiles, more work per round for small d (the --auto row too, when its d fits).
The floor (spec section 2.3) is the timed chain of the model's own weight matmuls for one token, in the same run.
"""

from __future__ import annotations

import dataclasses
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
from layerskip_jax.inference.generate import compiled_programs

_JSONL_EXAMPLE = '{"prompt": "def f(x):"} or {"prompt": [1, 15, 27]}'


def _jsonl_prompt(where: str, line: str) -> str | list[int]:
  """The prompt of one JSONL record: a non-empty string or list of integer ids."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise UsageError(
      f'{where}: not JSON ({e.msg}, column {e.colno}); each line of a .jsonl prompt file is an object '
      f'like {_JSONL_EXAMPLE}'
    ) from None
  if not isinstance(record, dict):
    raise UsageError(
      f'{where}: {describe_json(record)}, not an object; each line of a .jsonl prompt file is an object '
      f'like {_JSONL_EXAMPLE}'
    )
  if 'prompt' not in record:
    fields = ', '.join(sorted(record)) or 'none'
    raise UsageError(
      f'{where}: the record has no "prompt" field (its fields: {fields}); add one: text or a list of token ids'
    )
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
      raise UsageError(
        f'{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8'
      ) from None
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


def source_prompts(
  lm: api.LoadedModel | api.CheckpointInfo, source: str, split: str, count: int, length: int
) -> list[list[int]]:
  """`count` prompts of `length` tokens from the source's documents, one per document: alternately a document's
  first tokens and a window starting at the middle of a document (needs only the tokenizer: an api.CheckpointInfo
  will do). A document too short for a middle window (under about 2 x `length` tokens) gives its first tokens
  instead and the next long enough one gives the middle window: at most half come from the middle, and which do
  depends only on the source's order (the same prompts every run). A middle window has no BOS, as training
  windows cut from the packed token stream have none."""
  if lm.tokenizer is None:
    raise UsageError(f'--source={source}: the checkpoint has no tokenizer; use --prompts with token ids')
  prompts, middles = [], 0
  for doc in open_source(source, split).documents():
    ids = lm.tokenizer.encode(doc.text or doc.prompt or '')
    if len(ids) < length:
      continue
    middle = len(ids) // 2
    if middles < len(prompts) - middles and len(ids) - middle >= length:  # a middle window's turn, and room for it
      prompts.append(ids[middle : middle + length])
      middles += 1
    else:
      prompts.append(ids[:length])
    if len(prompts) == count:
      return prompts
  raise UsageError(
    f'--source={source}: fewer than {count} documents of {length} tokens in its {split!r} split; '
    'lower --num_prompts or --prompt_len'
  )


def parse_integers(flag: str, values: Sequence[str]) -> list[int]:
  """A comma-separated list flag's integers; UsageError naming the flag and the value that is not one."""
  result = []
  for value in values:
    try:
      result.append(int(value.strip()))
    except ValueError:
      raise UsageError(
        f'{flag}={",".join(values)}: {value!r} is not an integer; give comma-separated integers, e.g. 2,4,6'
      ) from None
  return result


ADAPT = 'adapt'  # a --confidence_thresholds value: the threshold adapted online (generate's adapt_threshold=True)
_THRESHOLDS_EXAMPLE = 'e.g. 0.4,0.6,adapt'


def parse_thresholds(flag: str, values: Sequence[str]) -> list[float | str]:
  """--confidence_thresholds: each value a number or `adapt` (ranges are check_sweep's); UsageError naming the flag
  and the value that is neither."""
  result = []
  for value in values:
    text = value.strip()
    if text.lower() == ADAPT:
      result.append(ADAPT)
      continue
    try:
      result.append(float(text))
    except ValueError:
      raise UsageError(
        f'{flag}={",".join(values)}: {value!r} is neither a number nor {ADAPT!r}; give comma-separated '
        f'probabilities in [0, 1] or {ADAPT}, {_THRESHOLDS_EXAMPLE}'
      ) from None
  return result


def _threshold_text(threshold: float | str | None) -> str:
  """A confidence_threshold for the table and messages: '-' (no drafting), 'off' (0), '0.4', 'adapt'."""
  if threshold is None:
    return '-'
  if threshold == ADAPT:
    return ADAPT
  return f'{threshold:g}' if threshold else 'off'


def check_sweep(
  num_layers: int,
  *,
  strategies: Sequence[str],
  exit_layers: Sequence[int],
  num_speculations: Sequence[int],
  batch_sizes: Sequence[int],
  max_new_tokens: int,
  repeats: int,
  num_prompts: int | None = None,
  d_bucket: int = 0,
  confidence_thresholds: Sequence = (),
  auto: bool = False,
  calibration_prompts: int = 4,
  prefix: str = '',
) -> None:
  """Every value of a sweep, before any work: UsageError naming the one value that is wrong and what is allowed.
  `prefix` goes before the names ('--': the command's flags; '' for run_benchmark's arguments). A value the sweep
  does not use (--d_bucket without self_speculative, --calibration_prompts without --auto) is not checked."""

  def values(name: str, items: Sequence) -> str:
    return f'{prefix}{name}={",".join(map(str, items))}'

  if not strategies:
    raise UsageError(f'{prefix}strategies: empty; give one or more of {", ".join(STRATEGIES)}')
  for s in strategies:
    if s not in STRATEGIES:
      raise UsageError(
        f'{values("strategies", strategies)}: {s!r} is not a strategy; choose from {", ".join(STRATEGIES)}'
      )
  uses_e = {'early_exit', 'self_speculative'} & set(strategies)
  speculative = 'self_speculative' in strategies
  for name, items, low, high, meaning in (
    (
      'exit_layers',
      exit_layers,
      1,
      num_layers - 1,
      f'E counts the layers run; the model has {num_layers}, and E = {num_layers} would be the whole model',
    ),
    ('num_speculations', num_speculations, 1, None, 'd is the drafts per self-speculative round'),
    (
      'batch_sizes',
      batch_sizes,
      1,
      num_prompts,
      f'there are {num_prompts} prompts' if num_prompts is not None else 'rows per batch',
    ),
  ):
    needed = {'exit_layers': uses_e, 'num_speculations': speculative, 'batch_sizes': True}[name]
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
  if max_new_tokens == 1:
    raise UsageError(
      f'{prefix}max_new_tokens=1: the first new token comes from the prefill, so nothing would be '
      'decoded and timed; give at least 2'
    )
  if repeats < 1:
    raise UsageError(f'{prefix}repeats={repeats}: must be at least 1 (timed runs per setting)')
  if speculative:
    d_max = max(num_speculations)
    if d_bucket < 0 or 0 < d_bucket < d_max:
      why = 'must not be negative' if d_bucket < 0 else f'smaller than the largest {prefix}num_speculations {d_max}'
      raise UsageError(f'{prefix}d_bucket={d_bucket}: {why}; give 0 (one program per d) or at least {d_max}')
    for t in confidence_thresholds:
      if t == ADAPT:
        continue
      if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise UsageError(
          f'{values("confidence_thresholds", confidence_thresholds)}: {t!r} is neither a number nor '
          f'{ADAPT!r}; give probabilities in [0, 1] or {ADAPT}, {_THRESHOLDS_EXAMPLE}'
        )
      if not 0 <= t <= 1:  # NaN too
        raise UsageError(
          f'{values("confidence_thresholds", confidence_thresholds)}: {t} is out of range: must be in '
          f'[0, 1] (a row stops drafting when the early exit\'s top probability is below it) or {ADAPT}'
        )
    for t in confidence_thresholds:
      if list(confidence_thresholds).count(t) > 1:
        raise UsageError(
          f'{values("confidence_thresholds", confidence_thresholds)}: {t} is given twice; give each value once'
        )
  if auto:
    if calibration_prompts < 1:
      raise UsageError(f'{prefix}calibration_prompts={calibration_prompts}: must be at least 1')
    if num_prompts is not None and calibration_prompts > num_prompts:
      raise UsageError(
        f'{prefix}calibration_prompts={calibration_prompts}: more than the {num_prompts} prompts; give 1..{num_prompts}'
      )


def weight_matmul_floor(lm: api.LoadedModel, repeats: int = 200) -> float:
  """Seconds for the chain of the model's weight matmuls for one token (each layer's projections and MLP, then the
  head; no attention, no cache), with every weight a separate argument so nothing is sliced or copied. In the
  dtype the decoder computes in (float32 on a CPU, where a bf16 model decodes in float32: cpu_decode_model)."""
  model = lm.decode_model
  config, dtype = model.config, model.config.weight_dtype
  layers = nnx.to_pure_dict(nnx.state(model.layers))
  names = [
    ('self_attn', 'q_proj'),
    ('self_attn', 'k_proj'),
    ('self_attn', 'v_proj'),
    ('self_attn', 'o_proj'),
    ('mlp', 'gate_proj'),
    ('mlp', 'up_proj'),
    ('mlp', 'down_proj'),
  ]
  weights = [
    [jnp.asarray(np.asarray(layers[a][b])[l], dtype) for a, b in names] for l in range(config.num_hidden_layers)
  ]
  head = model.embed_tokens[...].T if config.tie_word_embeddings else model.lm_head[...]
  head = jnp.asarray(np.asarray(head), dtype)

  @jax.jit
  def chain(weights, head, x):
    for q, k, v, o, g, u, d in weights:
      dt = q.dtype
      x = x.astype(dt)
      kv = x @ k + x @ v  # attention itself is left out; its inputs and output projection are not
      h = x + (x @ q).at[:, : kv.shape[1]].add(kv) @ o
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


@dataclasses.dataclass(frozen=True)
class Setting:
  """One row of the benchmark: a strategy at a batch size, with E, d and the drafting threshold where they apply."""

  strategy: str
  batch_size: int
  exit_layer: int | None = None
  num_speculations: int | None = None
  confidence_threshold: float | str | None = None  # None: no drafting; 0.0: off; a probability; ADAPT
  auto: bool = False  # chosen by layerskip_jax.inference.calibrate (--auto)

  def generate_kwargs(self, max_new_tokens: int, d_bucket: int = 0) -> dict[str, Any]:
    """lm.generate's keywords. max_speculations is d (one program per d) or, with a d_bucket of at least d, the
    bucket every d shares; the threshold keywords are passed only when drafting stops early."""
    kw: dict[str, Any] = {'strategy': self.strategy, 'max_new_tokens': max_new_tokens}
    if self.strategy != 'autoregressive':
      kw['exit_layer'] = self.exit_layer
    if self.strategy == 'self_speculative':
      d = self.num_speculations
      kw.update(num_speculations=d, max_speculations=max(d_bucket, d))
      if self.confidence_threshold == ADAPT:
        kw['adapt_threshold'] = True
      elif self.confidence_threshold:
        kw['confidence_threshold'] = float(self.confidence_threshold)
    return kw


def plan_settings(
  strategies: Sequence[str],
  exit_layers: Sequence[int],
  num_speculations: Sequence[int],
  batch_size: int,
  confidence_thresholds: Sequence = (),
) -> list[Setting]:
  """The settings of one batch size in report order: autoregressive (always: it is every speed-up's reference),
  early exit per E, self-speculative per (E, d), then per (threshold, E, d). A threshold of 0 is the plain rows."""
  plan = [Setting('autoregressive', batch_size)]
  if 'early_exit' in strategies:
    plan += [Setting('early_exit', batch_size, e) for e in exit_layers]
  if 'self_speculative' in strategies:
    for t in [0.0, *confidence_thresholds]:
      plan += [Setting('self_speculative', batch_size, e, d, t) for e in exit_layers for d in num_speculations]
  return list(dict.fromkeys(plan))


def _run_once(lm, batches: list, kw: dict) -> dict[str, Any]:
  """One pass of a setting over every batch: per batch decode seconds and new tokens (the first token of each row
  comes from the prefill, so it is not a decoded one), mean prefill seconds, drafts, per-row acceptance, tokens."""
  run: dict[str, Any] = {
    'decode_seconds': [],
    'new_tokens': [],
    'prefill_seconds': 0.0,
    'drafted': 0,
    'accepted': 0,
    'rounds': 0,
    'row_acceptance': [],
    'tokens': [],
  }
  for batch in batches:
    r = lm.generate(batch, **kw)
    run['decode_seconds'].append(r.stats['decode_seconds'])
    run['new_tokens'].append(r.stats['new_tokens'] - len(batch))
    run['prefill_seconds'] += r.stats['prefill_seconds'] / len(batches)
    run['drafted'] += r.stats['drafted']
    run['accepted'] += r.stats['accepted']
    run['rounds'] += r.stats.get('rounds', 0)
    run['row_acceptance'] += [row['acceptance_rate'] for row in r.stats['rows']]
    run['tokens'] += r.tokens
  run['ms_per_token'] = 1e3 * sum(run['decode_seconds']) / max(sum(run['new_tokens']), 1)
  return run


def time_settings(lm, plan: Sequence[tuple[Setting, list, dict]], repeats: int) -> dict[Setting, list[dict]]:
  """Each setting's `repeats` runs (see _run_once), for a plan of (setting, batches, generate keywords): first
  every setting once, untimed (its compile), then `repeats` rounds that each run every setting once, round r
  starting at setting r (mod the count). Interleaved, the machine's drift over minutes (20-30% here) falls on every
  setting alike instead of on whichever ran its repeats in a slow spell; the rotation spreads what running after
  another setting does (caches, clocks) over all of them."""
  for _, batches, kw in plan:
    for batch in batches:
      lm.generate(batch, **kw)
  runs: dict[Setting, list[dict]] = {setting: [] for setting, _, _ in plan}
  for r in range(repeats):
    start = r % len(plan)
    for setting, batches, kw in [*plan[start:], *plan[:start]]:
      runs[setting].append(_run_once(lm, batches, kw))
  return runs


def median_run(runs: list[dict]) -> dict:
  """The run of median decode ms/token (the upper middle one for an even count): its per-batch numbers stay
  together, so its speed-up, acceptance and interval describe one pass over the prompts."""
  return sorted(runs, key=lambda r: r['ms_per_token'])[len(runs) // 2]


BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def speedup_interval(
  reference: dict, run: dict, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> list[float]:
  """95% bootstrap interval of `run`'s speed-up over `reference` (two runs over the same batches): batches are
  resampled with replacement, the same resamples for both (and, by the fixed seed, for every setting), and a
  resample's speed-up is reference ms/token over the run's, each its decode seconds over its new tokens summed over
  the resampled batches. The percentile interval is widened to the full sample's speed-up if rounding leaves it
  just outside (one batch: every resample is the full sample)."""
  ref_s, ref_n = np.asarray(reference['decode_seconds'], float), np.asarray(reference['new_tokens'], float)
  run_s, run_n = np.asarray(run['decode_seconds'], float), np.asarray(run['new_tokens'], float)
  index = np.random.default_rng(seed).integers(0, len(run_s), (resamples, len(run_s)))
  ratios = (ref_s[index].sum(1) / np.maximum(ref_n[index].sum(1), 1)) / (
    run_s[index].sum(1) / np.maximum(run_n[index].sum(1), 1)
  )
  point = (ref_s.sum() / max(ref_n.sum(), 1)) / (run_s.sum() / max(run_n.sum(), 1))
  low, high = np.percentile(ratios, [2.5, 97.5])
  return [float(min(low, point)), float(max(high, point))]


def acceptance_quartiles(run: dict) -> list[float] | None:
  """[q1, median, q3] of the per-row (per-prompt at batch 1) acceptance rates of rows that drafted; None if none."""
  rates = [r for r in run['row_acceptance'] if r is not None]
  return [float(q) for q in np.percentile(rates, [25, 50, 75])] if rates else None


def programs_compiled() -> int | None:
  """inference.generate.compiled_programs() (prefill and decode loop), or None if this jax does not say."""
  try:
    return compiled_programs()
  except AttributeError:
    return None


def hf_reference(
  lm: api.LoadedModel, prompts: list[list[int]], max_new: int, exit_layers: list[int], repeats: int
) -> dict[str, Any] | None:
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
          out = model.generate(torch.tensor([p]), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, **kw)
          total += out.shape[1] - len(p)
      times.append((time.perf_counter() - start) / total)
    t = float(np.median(times[1:]))
    return {'ms_per_token': 1e3 * t, 'tokens_per_sec': 1 / t}

  result = {'greedy': run()}
  for e in exit_layers:
    result[f'assistant_early_exit_{e}'] = run(assistant_early_exit=e)
  return result


def modelled_ms_per_token(ar: float, ee: float, *, rounds: float, drafted: float, accepted: float) -> float:
  """What self-speculative rounds should cost per token (spec section 2.4): a round of k drafts runs k + 1 tokens
  through layers [0, E) at the early exit's cost EE and verifies them through layers [E, L) at about one row's
  cost, AR - EE, and yields 1 + its accepted drafts; summed over a run's rounds (a round drafts fewer than d near
  max_new_tokens, or when a confidence threshold stops it)."""
  return ((drafted + rounds) * ee + rounds * (ar - ee)) / (rounds + accepted)


def add_efficiency(settings: list[dict]) -> None:
  """Adds to each self-speculative setting its modelled ms/token (from the same run's autoregressive and
  early-exit rows at its batch size and E, and its rounds, drafts and accepted drafts; a row without round counts
  is taken as d drafts a round at its acceptance rate) and efficiency = modelled / measured (1.0: the rounds cost
  what their layers cost; below: overhead). None where the early-exit row was not measured."""
  rows = {(s['strategy'], s['batch_size'], s['exit_layer']): s for s in settings if not s.get('auto')}
  for s in settings:
    s['modelled_ms_per_token'] = s['efficiency'] = None
    ar = rows.get(('autoregressive', s['batch_size'], None))
    ee = rows.get(('early_exit', s['batch_size'], s['exit_layer']))
    if s['strategy'] == 'self_speculative' and ar and ee and s['acceptance_rate'] is not None:
      counts = (
        {k: s[k] for k in ('rounds', 'drafted', 'accepted')}
        if s.get('rounds')
        else dict(rounds=1, drafted=s['num_speculations'], accepted=s['acceptance_rate'] * s['num_speculations'])
      )
      s['modelled_ms_per_token'] = modelled_ms_per_token(ar['ms_per_token'], ee['ms_per_token'], **counts)
      s['efficiency'] = s['modelled_ms_per_token'] / s['ms_per_token']


def best_setting(settings: list[dict], batch: int) -> dict | None:
  """The self-speculative setting of `batch` with the highest measured speed-up (of the sweep: not --auto's)."""
  candidates = [
    s for s in settings if s['strategy'] == 'self_speculative' and s['batch_size'] == batch and not s.get('auto')
  ]
  return max(candidates, key=lambda s: s['speedup']) if candidates else None


def _plot(path: str, settings: list[dict], batch: int) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  spec = [
    s
    for s in settings
    if s['strategy'] == 'self_speculative'
    and s['batch_size'] == batch
    and not s.get('auto')
    and not s.get('confidence_threshold')
  ]  # the (E, d) grid: one row per cell
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
  ax.set(
    xlabel='d (drafts per round)',
    ylabel='E (draft layers)',
    title=f'self-speculative speed-up over autoregressive, batch {batch}',
  )
  fig.colorbar(im)
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=120)


def _choice_fields(choice) -> dict[str, Any]:
  """calibrate.Choice's fields for the JSON: all of a dataclass's, else the ones its contract names."""
  if dataclasses.is_dataclass(choice):
    return dataclasses.asdict(choice)
  return {
    name: getattr(choice, name, None)
    for name in ('exit_layer', 'num_speculations', 'confidence_threshold', 'predicted_ms_per_token', 'reason', 'table')
  }


def run_benchmark(
  lm: api.LoadedModel,
  prompts: list[list[int]],
  *,
  strategies,
  exit_layers,
  num_speculations,
  batch_sizes,
  max_new_tokens,
  repeats,
  d_bucket: int = 0,
  confidence_thresholds: Sequence = (),
  auto: bool = False,
  calibration_prompts: int = 4,
) -> dict[str, Any]:
  """The sweep (see the module docstring): {'settings': rows, 'best': per batch size, 'programs_compiled', ...,
  'auto': per batch size (with `auto`)}. Batches are consecutive prompts; a last partial batch is left out."""
  check_sweep(
    lm.num_layers,
    strategies=strategies,
    exit_layers=exit_layers,
    num_speculations=num_speculations,
    batch_sizes=batch_sizes,
    max_new_tokens=max_new_tokens,
    repeats=repeats,
    num_prompts=len(prompts),
    d_bucket=d_bucket,
    confidence_thresholds=confidence_thresholds,
    auto=auto,
    calibration_prompts=calibration_prompts,
  )
  thresholds = list(confidence_thresholds) if 'self_speculative' in strategies else []
  before = programs_compiled()
  batches = {b: [prompts[i : i + b] for i in range(0, len(prompts) - b + 1, b)] for b in batch_sizes}
  plan = [s for b in batch_sizes for s in plan_settings(strategies, exit_layers, num_speculations, b, thresholds)]
  choices, calibration_programs = {}, None
  if auto:
    # Imported only with --auto: the benchmark runs without that module.
    from layerskip_jax.inference import calibrate

    for b in batch_sizes:
      # at least one batch of b prompts (the calibration runs the batch size it chooses for)
      choice = choices[b] = calibrate.choose(
        lm, prompts=prompts[: max(calibration_prompts, b)], max_new_tokens=max_new_tokens, batch_size=b
      )
      threshold = 'adapt' if getattr(choice, 'adapt_threshold', False) else float(choice.confidence_threshold or 0.0)
      plan.append(
        Setting('self_speculative', b, int(choice.exit_layer), int(choice.num_speculations), threshold, auto=True)
      )
    after = programs_compiled()
    calibration_programs = after - before if after is not None and before is not None else None
  runs = time_settings(
    lm, [(s, batches[s.batch_size], s.generate_kwargs(max_new_tokens, d_bucket)) for s in plan], repeats
  )
  after = programs_compiled()

  settings = []
  for setting in plan:
    if setting.strategy == 'autoregressive' and 'autoregressive' not in strategies:
      continue  # timed as the reference of the speed-ups, not reported
    run, ar = median_run(runs[setting]), median_run(runs[Setting('autoregressive', setting.batch_size)])
    speculative = setting.strategy == 'self_speculative'
    settings.append(
      {
        'strategy': setting.strategy,
        'batch_size': setting.batch_size,
        'exit_layer': setting.exit_layer,
        'num_speculations': setting.num_speculations,
        'confidence_threshold': setting.confidence_threshold,
        'auto': setting.auto,
        'ms_per_token': run['ms_per_token'],
        'tokens_per_sec': 1e3 / run['ms_per_token'] if run['ms_per_token'] else None,
        'prefill_ms': 1e3 * run['prefill_seconds'],
        'acceptance_rate': run['accepted'] / run['drafted'] if run['drafted'] else None,
        'rounds': run['rounds'],
        'drafted': run['drafted'],
        'accepted': run['accepted'],
        'acceptance_quartiles': acceptance_quartiles(run) if speculative else None,
        'speedup': ar['ms_per_token'] / run['ms_per_token'],
        'speedup_interval': speedup_interval(ar, run),
        'agreement': float(np.mean([a == b for a, b in zip(run['tokens'], ar['tokens'])])),
        'ms_per_token_repeats': [r['ms_per_token'] for r in runs[setting]],
      }
    )
  add_efficiency(settings)
  report: dict[str, Any] = {
    'settings': settings,
    'best': {str(b): best_setting(settings, b) for b in batch_sizes},
    'programs_compiled': after - before if after is not None and before is not None else None,
    'd_bucket': d_bucket,
    'confidence_thresholds': thresholds,
  }
  if auto:
    report['auto'] = {}
    for b, choice in choices.items():
      row = next(s for s in settings if s['auto'] and s['batch_size'] == b)
      best = report['best'][str(b)]
      report['auto'][str(b)] = {
        **_choice_fields(choice),
        'speedup': row['speedup'],
        'speedup_interval': row['speedup_interval'],
        'best_speedup': best['speedup'] if best else None,
        'best_exit_layer': best['exit_layer'] if best else None,
        'best_num_speculations': best['num_speculations'] if best else None,
        'best_confidence_threshold': best['confidence_threshold'] if best else None,
        'ratio_to_best': row['speedup'] / best['speedup'] if best else None,
        'programs_compiled_by_calibration': calibration_programs,
      }
  return report


def _interval_text(interval: list[float] | None) -> str:
  return f'[{interval[0]:.2f}, {interval[1]:.2f}]' if interval else '-'


def print_table(report: dict[str, Any]) -> None:
  """The settings as a table, one line each (thresh: the drafting threshold; accept q1/q2/q3: quartiles over the
  prompts; the bootstrap interval of the speed-up), then what the columns mean."""
  print(
    f'{"strategy":>17} {"B":>2} {"E":>2} {"d":>2} {"thresh":>6} {"ms/token":>8} {"prefill ms":>10} {"accept":>6} '
    f'{"accept q1/q2/q3":>15} {"speed-up":>8} {"95% interval":>12} {"agree":>5} {"modelled":>8} {"effic.":>6}'
  )
  for s in report['settings']:
    accept = f'{s["acceptance_rate"]:.2f}' if s['acceptance_rate'] is not None else '-'
    quartiles = '/'.join(f'{q:.2f}' for q in s['acceptance_quartiles']) if s['acceptance_quartiles'] else '-'
    modelled = f'{s["modelled_ms_per_token"]:.3f}' if s['modelled_ms_per_token'] is not None else '-'
    efficiency = f'{s["efficiency"]:.2f}' if s['efficiency'] is not None else '-'
    strategy = 'self_spec. (auto)' if s.get('auto') else s['strategy']
    print(
      f'{strategy:>17} {s["batch_size"]:>2} {s["exit_layer"] or "-":>2} {s["num_speculations"] or "-":>2} '
      f'{_threshold_text(s.get("confidence_threshold")):>6} {s["ms_per_token"]:>8.3f} {s["prefill_ms"]:>10.1f} '
      f'{accept:>6} {quartiles:>15} {s["speedup"]:>7.2f}x {_interval_text(s["speedup_interval"]):>12} '
      f'{s["agreement"]:>5.2f} {modelled:>8} {efficiency:>6}'
    )
  print(
    'speed-up: median of interleaved rounds; 95% interval: bootstrap over the prompts (1000 resamples); accept '
    'q1/q2/q3:\nquartiles of the per-prompt acceptance; modelled: ms/token a round of d drafts should cost, '
    '(d + 1) EE(E) + AR - EE(E)\nper 1 + accepted tokens (spec 2.4); effic.: modelled / measured (1.0 = no '
    'overhead)'
  )


def _json_value(value: Any) -> Any:
  """json.dumps's fallback: numpy scalars and arrays (a calibration table's numbers) as Python values, else text."""
  if isinstance(value, (np.generic, np.ndarray)):
    return value.tolist()
  return str(value)


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
  exit_layers, speculations, batch_sizes = (
    parse_integers(flag, values)
    for flag, values in (
      ('--exit_layers', f.exit_layers),
      ('--num_speculations', f.num_speculations),
      ('--batch_sizes', f.batch_sizes),
    )
  )
  thresholds = parse_thresholds('--confidence_thresholds', f.confidence_thresholds)
  if plot_path and 'self_speculative' not in strategies:
    raise UsageError(
      f'--plot={f.plot}: draws the self-speculative speed-up over (E, d); add self_speculative to '
      '--strategies, or leave out --plot'
    )
  for name, value in (('--num_prompts', f.num_prompts), ('--prompt_len', f.prompt_len)):
    if value < 1:
      raise UsageError(f'{name}={value}: must be at least 1')
  sweep = dict(
    strategies=strategies,
    exit_layers=exit_layers,
    num_speculations=speculations,
    batch_sizes=batch_sizes,
    max_new_tokens=f.max_new_tokens,
    repeats=f.repeats,
    d_bucket=f.d_bucket,
    confidence_thresholds=thresholds,
    auto=f.auto,
    calibration_prompts=f.calibration_prompts,
  )
  check_sweep(info.num_layers, **sweep, prefix='--')
  prompts = (
    read_prompts(f.prompts, info.tokenizer, info.config.model.vocab_size)
    if f.prompts
    else source_prompts(info, f.source, f.split, f.num_prompts, f.prompt_len)
  )
  check_sweep(info.num_layers, **sweep, num_prompts=len(prompts), prefix='--')
  d_max = max(f.d_bucket, *speculations) if 'self_speculative' in strategies else 0
  check_length(info.model_config, max(map(len, prompts)), f.max_new_tokens, d_max, prefix='--')
  lm = info.load()
  report = {
    'ckpt': str(lm.checkpoint.root),
    'backend': jax.default_backend(),
    'num_layers': lm.num_layers,
    'num_prompts': len(prompts),
    'max_new_tokens': f.max_new_tokens,
    'repeats': f.repeats,
    'date': time.strftime('%Y-%m-%d'),
  }
  report.update(run_benchmark(lm, prompts, **sweep))
  report['floor_ms_per_token'] = 1e3 * weight_matmul_floor(lm)
  print_table(report)
  compiled = report['programs_compiled']
  bucket = f'--d_bucket={f.d_bucket}: one for every d' if f.d_bucket else '--d_bucket=0: one per d'
  print(
    f'programs compiled (prefill and decode loop): {compiled if compiled is not None else "unknown"} ({bucket}, '
    'strategy, batch size and prompt width)'
  )
  ar1 = next((s for s in report['settings'] if s['strategy'] == 'autoregressive' and s['batch_size'] == 1), None)
  if ar1:
    report['autoregressive_over_floor'] = ar1['ms_per_token'] / report['floor_ms_per_token']
    print(
      f'floor (weight-matmul chain, one token): {report["floor_ms_per_token"]:.3f} ms; autoregressive at batch 1 '
      f'is {report["autoregressive_over_floor"]:.2f}x it'
    )
  for b, best in report['best'].items():
    if best:
      print(
        f'best at batch {b}: E={best["exit_layer"]} d={best["num_speculations"]}: {best["speedup"]:.2f}x '
        f'autoregressive {_interval_text(best["speedup_interval"])}, agreement {best["agreement"]:.2f}'
        + (f', threshold {_threshold_text(best["confidence_threshold"])}' if best['confidence_threshold'] else '')
      )
  for b, auto in report.get('auto', {}).items():
    threshold = _threshold_text(ADAPT if auto.get('adapt_threshold') else auto['confidence_threshold'] or 0.0)
    best_threshold = auto['best_confidence_threshold']
    best = (
      f'best of the sweep {auto["best_speedup"]:.2f}x (E={auto["best_exit_layer"]} '
      f'd={auto["best_num_speculations"]}'
      + (f' threshold {_threshold_text(best_threshold)}' if best_threshold else '')
      + f'): {auto["ratio_to_best"]:.2f} of it'
      if auto['best_speedup']
      else 'no self-speculative sweep to compare with'
    )
    print(
      f'auto at batch {b}: E={auto["exit_layer"]} d={auto["num_speculations"]} (threshold {threshold}): '
      f'{auto["speedup"]:.2f}x, {best}; why: {auto["reason"]}'
    )
  if f.hf:
    report['hf'] = hf_reference(lm, prompts, f.max_new_tokens, exit_layers, f.repeats)
    if report['hf'] is None:
      print('--hf: transformers/torch not installed')
    else:
      for name, r in report['hf'].items():
        print(f'transformers {name}: {r["ms_per_token"]:.3f} ms/token')
  if json_path:
    outputs.write_text(json_path, json.dumps(report, indent=2, default=_json_value))
    print(f'wrote {f.json}')
  if plot_path:
    _plot(plot_path, report['settings'], batch_sizes[0])
    print(f'wrote {f.plot}')


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags (defined only when it runs: the modules are imported by tests and notebooks, and tests
  define them on their own FlagValues)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('ckpt', None, 'checkpoint directory', **fv)
  flags.DEFINE_string(
    'prompts',
    None,
    'prompt file: one prompt per line (a line of integers = token ids), or JSONL '
    'with a "prompt" field (string or list of ids)',
    **fv,
  )
  flags.DEFINE_string(
    'source', None, 'take prompts from the documents of this source instead (e.g. python_stdlib)', **fv
  )
  flags.DEFINE_string('split', 'heldout', 'split of --source', **fv)
  flags.DEFINE_integer(
    'num_prompts',
    16,
    'prompts taken from --source (alternately a document start and a window from the middle of a document)',
    **fv,
  )
  flags.DEFINE_integer('prompt_len', 64, 'tokens per prompt taken from --source', **fv)
  flags.DEFINE_list('strategies', list(STRATEGIES), 'strategies to run', **fv)
  flags.DEFINE_list('exit_layers', ['2', '4', '6'], 'E values (early exit and self-speculative)', **fv)
  flags.DEFINE_list('num_speculations', ['2', '4', '6'], 'd values (self-speculative)', **fv)
  flags.DEFINE_list(
    'confidence_thresholds',
    [],
    'also run every self-speculative (E, d) with drafting stopped per '
    'row below each of these early-exit top probabilities (0..1), or adapt (adapted online)',
    **fv,
  )
  flags.DEFINE_integer(
    'd_bucket',
    0,
    '0: each d its own compiled program (d + 1 verify rows); N: every d verifies '
    'N + 1 rows in one shared program (N >= the largest --num_speculations)',
    **fv,
  )
  flags.DEFINE_bool(
    'auto',
    False,
    'also time the (E, d, threshold) that layerskip_jax.inference.calibrate chooses, against the best of the sweep',
    **fv,
  )
  flags.DEFINE_integer('calibration_prompts', 4, 'with --auto: calibrate on the first N prompts', **fv)
  flags.DEFINE_list('batch_sizes', ['1'], 'batch sizes', **fv)
  flags.DEFINE_integer('max_new_tokens', 64, 'tokens generated per prompt', **fv)
  flags.DEFINE_integer('repeats', 3, 'timed rounds; each runs every setting once (the median is reported)', **fv)
  flags.DEFINE_bool(
    'hf', False, 'also time transformers generate (plain and assistant_early_exit) on the same weights', **fv
  )
  flags.DEFINE_string('json', None, 'write the results here', **fv)
  flags.DEFINE_string(
    'plot', None, 'draw the speed-up heatmap over (E, d) at the first batch size into this PNG (or .pdf, .svg)', **fv
  )


if __name__ == '__main__':
  define_flags()
  cli.run(main)

"""Per-exit evaluation and the layer-wise prediction analysis.

    python -m layerskip_jax.evaluate --ckpt DIR --source python_stdlib [--split heldout] --json OUT.json
        [--plot OUT.png] [--compare OTHER_CKPT] [--layerwise_prompt "def f(x):"]

Held-out cross-entropy, perplexity, next-token accuracy and greedy agreement with the last exit at every exit
(lists of length L, index i = exit i + 1). --layerwise_prompt: for each prompt token, the top-1 prediction at every
exit and the number of layers until the prediction settles on the final one (the paper's 23.45-of-32 statistic).

Before any weight is read, the outputs, the flags, both checkpoints' configs and tokenizers, the layer-wise prompt
and the data (tokenized and cached, with at least one batch) are checked: loading a large model takes minutes, and
a --seq_len past the model's positions or an unwritable --json should not cost them.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np
from absl import flags
from flax import nnx

from layerskip_jax import api, cli, outputs
from layerskip_jax.data import loader
from layerskip_jax.data.cache import PreparedData, ensure_prepared
from layerskip_jax.errors import UsageError
from layerskip_jax.objective.loss import exit_statistics, summarize_exits


def prepare_source(
  lm: api.LoadedModel | api.CheckpointInfo, source: str, split: str, *, named: str | None = None
) -> PreparedData:
  """The source split tokenized with the checkpoint's tokenizer (prepared once, then cached); needs no weights.
  `named` ('--ckpt=DIR') is how messages name the checkpoint."""
  named = named or f'--ckpt={lm.checkpoint.root}'
  if lm.tokenizer is None:
    raise UsageError(f'{named}: has no tokenizer to tokenize --source={source}')
  config = lm.config.copy_and_resolve_references()
  with config.unlocked():
    config.data.source, config.data.train_split, config.data.eval_split = source, split, ''
  return ensure_prepared(config, tokenizer=str(lm.tokenizer.path))


def _batches(prepared: PreparedData, batch_size: int, seq_len: int):
  return loader.dataset(prepared.train, seq_len, batch_size, shuffle=False, repeat=False)


def evaluate_exits(
  lm: api.LoadedModel,
  source: str,
  split: str,
  *,
  batches: int,
  batch_size: int,
  seq_len: int,
  prepared: PreparedData | None = None,
) -> dict[str, Any]:
  """Per-exit statistics of a checkpoint on a source split, tokenized with the checkpoint's tokenizer (cached;
  `prepared` if already done)."""
  prepared = prepared or prepare_source(lm, source, split)
  graphdef, params = nnx.split(lm.model)
  step = jax.jit(lambda params, batch: exit_statistics(nnx.merge(graphdef, params), batch))
  totals = None
  for i, batch in enumerate(_batches(prepared, batch_size, seq_len)):
    if i >= batches:
      break
    out = jax.device_get(step(params, batch))
    totals = out if totals is None else jax.tree.map(np.add, totals, out)
  if totals is None:
    raise UsageError(f'--source={source} --split={split}: not one batch of {batch_size} x {seq_len} tokens')
  return {
    'ckpt': str(lm.checkpoint.root),
    'step': lm.checkpoint.step,
    'source': source,
    'split': split,
    **{k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in summarize_exits(totals).items()},
  }


def layerwise(lm: api.LoadedModel, prompt_ids: list[int]) -> dict[str, Any]:
  """Top-1 prediction at every exit for each prompt position, and the layers needed until it settles: the
  smallest E with the same top-1 as the last exit at E and at every exit after it."""
  tokens = np.asarray([prompt_ids], np.int32)
  model = lm.model
  hidden = model.hidden_states(tokens)  # [L, 1, T, D]
  top1 = np.asarray(jax.numpy.argmax(model.head(hidden[:, 0]), axis=-1))  # [L, T]
  num_layers = top1.shape[0]
  settled = top1 == top1[-1]
  # settles at E = 1 + the last exit index that disagrees (0 disagreeing -> 1)
  disagree = ~settled
  last_bad = np.where(disagree.any(axis=0), num_layers - 1 - np.argmax(disagree[::-1], axis=0), -1)
  settle = (last_bad + 2).tolist()
  return {
    'prompt_ids': list(map(int, prompt_ids)),
    'top1': top1.T.tolist(),
    'settle_exit': settle,
    'mean_settle_exit': float(np.mean(settle)),
    'num_layers': num_layers,
  }


def _plot(path: str, results: list[dict], grid: dict | None, tokenizer) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  panels = 2 if grid else 1
  fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4))
  axes = np.atleast_1d(axes)
  for r in results:
    exits = np.arange(1, len(r['exit_ppl']) + 1)
    axes[0].plot(exits, r['exit_ppl'], marker='o', label=pathlib.Path(r['ckpt']).name)
  axes[0].set(xlabel='exit E (layers run)', ylabel='held-out perplexity', yscale='log', title='perplexity per exit')
  axes[0].legend()
  if grid:
    top1 = np.asarray(grid['top1'])  # [T, L]
    axes[1].imshow((top1 == top1[:, -1:]).T, aspect='auto', origin='lower', cmap='Greens')
    labels = [tokenizer.decode([t]) if tokenizer else str(t) for t in grid['prompt_ids']]
    axes[1].set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    axes[1].set(
      ylabel='exit index (E - 1)',
      title=f'top-1 equals the final exit (mean settle exit {grid["mean_settle_exit"]:.2f} of {grid["num_layers"]})',
    )
  fig.tight_layout()
  outputs.save_figure(fig, path, dpi=120)


def main(args: cli.Args, f: flags.FlagValues | None = None) -> None:
  f = flags.FLAGS if f is None else f
  if not f.ckpt:
    raise UsageError('--ckpt is required')
  # Beside the checkpoints' files is fine (launch/local.sh writes RUN/eval.json), over them is not.
  infos = [api.inspect(f.ckpt)] + ([api.inspect(f.compare, '--compare')] if f.compare else [])
  inputs = {info.flag: info.checkpoint.parts for info in infos}
  json_path = outputs.check_file('--json', f.json, inputs=inputs)
  plot_path = outputs.check_plot('--plot', f.plot, inputs=inputs, others={'--json': f.json})
  for name, value, low in (('--batches', f.batches, 1), ('--batch_size', f.batch_size, 1), ('--seq_len', f.seq_len, 2)):
    if value < low:
      raise UsageError(f'{name}={value}: must be at least {low}')
  for info in infos:
    positions = info.config.model.max_position_embeddings
    if f.seq_len > positions:
      raise UsageError(
        f'--seq_len={f.seq_len}: must be at most model.max_position_embeddings={positions} of {info.named}'
      )
  ids = infos[0].prompt_ids(f.layerwise_prompt, '--layerwise_prompt') if f.layerwise_prompt is not None else None
  prepared = [prepare_source(info, f.source, f.split, named=info.named) for info in infos]
  for data in prepared:
    if next(iter(_batches(data, f.batch_size, f.seq_len)), None) is None:
      raise UsageError(
        f'--source={f.source} --split={f.split}: not one batch of {f.batch_size} x {f.seq_len} '
        'tokens; lower --batch_size or --seq_len'
      )
  options = dict(batches=f.batches, batch_size=f.batch_size, seq_len=f.seq_len)
  lm = infos[0].load()
  results = [evaluate_exits(lm, f.source, f.split, **options, prepared=prepared[0])]
  if f.compare:
    results.append(evaluate_exits(infos[1].load(), f.source, f.split, **options, prepared=prepared[1]))
  report: dict[str, Any] = {**results[0], 'compare': results[1] if f.compare else None}
  print(f'{"exit":>4} ' + ' '.join(f'{"ppl " + pathlib.Path(r["ckpt"]).name:>22} {"agree":>6}' for r in results))
  for i in range(len(results[0]['exit_ppl'])):
    print(f'{i + 1:>4} ' + ' '.join(f'{r["exit_ppl"][i]:>22.2f} {r["exit_agreement"][i]:>6.2f}' for r in results))
  grid = None
  if ids is not None:
    grid = report['layerwise'] = layerwise(lm, ids)
    print('layer-wise: top-1 per exit for each token; settle exit = layers until the final prediction holds')
    for t, (tok, preds, settle) in enumerate(zip(ids, grid['top1'], grid['settle_exit'])):
      shown = lm.tokenizer.decode([tok]) if lm.tokenizer else str(tok)
      print(f'{t:>4} {shown!r:>14}  settle {settle:>2}  ' + ' '.join(map(str, preds)))
    print(f'mean settle exit: {grid["mean_settle_exit"]:.2f} of {grid["num_layers"]}')
  if json_path:
    outputs.write_text(json_path, json.dumps(report, indent=2))
    print(f'wrote {f.json}')
  if plot_path:
    _plot(plot_path, results, grid, lm.tokenizer)
    print(f'wrote {f.plot}')


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags (defined only when it runs: the modules are imported by tests and notebooks, and tests
  define them on their own FlagValues)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('ckpt', None, 'checkpoint directory', **fv)
  flags.DEFINE_string('source', 'python_stdlib', 'data source (as data.source)', **fv)
  flags.DEFINE_string('split', 'heldout', 'split of the source', **fv)
  flags.DEFINE_integer('batches', 16, 'batches to evaluate', **fv)
  flags.DEFINE_integer('batch_size', 8, 'sequences per batch', **fv)
  flags.DEFINE_integer('seq_len', 256, 'tokens per sequence', **fv)
  flags.DEFINE_string('compare', None, 'a second checkpoint (say, the baseline) evaluated on the same data', **fv)
  flags.DEFINE_string('layerwise_prompt', None, 'text (or space-separated ids) for the layer-wise analysis', **fv)
  flags.DEFINE_string('json', None, 'write the results here', **fv)
  flags.DEFINE_string('plot', None, 'draw the per-exit perplexity (and the layer-wise grid) into this PNG', **fv)


if __name__ == '__main__':
  define_flags()
  cli.run(main)

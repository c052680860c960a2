"""Per-exit evaluation and the layer-wise prediction analysis.

    python -m layerskip_jax.evaluate --ckpt DIR --source python_stdlib [--split heldout] --json OUT.json
        [--plot OUT.png] [--compare OTHER_CKPT] [--layerwise_prompt "def f(x):"]

Held-out cross-entropy, perplexity, next-token accuracy and greedy agreement with the last exit at every exit
(lists of length L, index i = exit i + 1). --layerwise_prompt: for each prompt token, the top-1 prediction at every
exit and the number of layers until the prediction settles on the final one (the paper's 23.45-of-32 statistic).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np
from absl import flags
from flax import nnx

from layerskip_jax import api, cli
from layerskip_jax.data import loader
from layerskip_jax.data.cache import ensure_prepared
from layerskip_jax.errors import UsageError
from layerskip_jax.objective.loss import exit_statistics
from layerskip_jax.train.trainer import summarize_exits


def evaluate_exits(lm: api.LoadedModel, source: str, split: str, *, batches: int, batch_size: int,
                   seq_len: int) -> dict[str, Any]:
  """Per-exit statistics of a checkpoint on a source split, tokenized with the checkpoint's tokenizer (cached)."""
  if lm.tokenizer is None:
    raise UsageError(f'--ckpt={lm.checkpoint.root}: has no tokenizer to tokenize --source={source}')
  config = lm.config.copy_and_resolve_references()
  with config.unlocked():
    config.data.source, config.data.train_split, config.data.eval_split = source, split, ''
  prepared = ensure_prepared(config, tokenizer=str(lm.tokenizer.path))
  graphdef, params = nnx.split(lm.model)
  step = jax.jit(lambda params, batch: exit_statistics(nnx.merge(graphdef, params), batch))
  totals = None
  for i, batch in enumerate(loader.dataset(prepared.train, seq_len, batch_size, shuffle=False, repeat=False)):
    if i >= batches:
      break
    out = jax.device_get(step(params, batch))
    totals = out if totals is None else jax.tree.map(np.add, totals, out)
  if totals is None:
    raise UsageError(f'--source={source} --split={split}: not one batch of {batch_size} x {seq_len} tokens')
  return {'ckpt': str(lm.checkpoint.root), 'step': lm.checkpoint.step, 'source': source, 'split': split,
          **{k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in summarize_exits(totals).items()}}


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
  return {'prompt_ids': list(map(int, prompt_ids)), 'top1': top1.T.tolist(), 'settle_exit': settle,
          'mean_settle_exit': float(np.mean(settle)), 'num_layers': num_layers}


def _plot(path: str, results: list[dict], grid: dict | None, tokenizer) -> None:
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    raise UsageError('--plot needs matplotlib (pip install -r requirements-dev.txt)') from None
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
    axes[1].set(ylabel='exit index (E - 1)', title=f'top-1 equals the final exit (mean settle exit '
                                                    f'{grid["mean_settle_exit"]:.2f} of {grid["num_layers"]})')
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(args: cli.Args) -> None:
  f = flags.FLAGS
  if not f.ckpt:
    raise UsageError('--ckpt is required')
  lm = api.load(f.ckpt)
  options = dict(batches=f.batches, batch_size=f.batch_size, seq_len=f.seq_len)
  results = [evaluate_exits(lm, f.source, f.split, **options)]
  if f.compare:
    results.append(evaluate_exits(api.load(f.compare), f.source, f.split, **options))
  report: dict[str, Any] = {**results[0], 'compare': results[1] if f.compare else None}
  print(f'{"exit":>4} ' + ' '.join(f'{"ppl " + pathlib.Path(r["ckpt"]).name:>22} {"agree":>6}' for r in results))
  for i in range(len(results[0]['exit_ppl'])):
    print(f'{i + 1:>4} ' + ' '.join(f'{r["exit_ppl"][i]:>22.2f} {r["exit_agreement"][i]:>6.2f}' for r in results))
  grid = None
  if f.layerwise_prompt:
    if lm.tokenizer is None or f.layerwise_prompt.replace(' ', '').isdigit():
      ids = [int(t) for t in f.layerwise_prompt.split()]
    else:
      ids = lm.tokenizer.encode(f.layerwise_prompt)
    grid = report['layerwise'] = layerwise(lm, ids)
    print('layer-wise: top-1 per exit for each token; settle exit = layers until the final prediction holds')
    for t, (tok, preds, settle) in enumerate(zip(ids, grid['top1'], grid['settle_exit'])):
      shown = lm.tokenizer.decode([tok]) if lm.tokenizer else str(tok)
      print(f'{t:>4} {shown!r:>14}  settle {settle:>2}  ' + ' '.join(map(str, preds)))
    print(f'mean settle exit: {grid["mean_settle_exit"]:.2f} of {grid["num_layers"]}')
  if f.json:
    pathlib.Path(f.json).write_text(json.dumps(report, indent=2))
    print(f'wrote {f.json}')
  if f.plot:
    _plot(f.plot, results, grid, lm.tokenizer)
    print(f'wrote {f.plot}')


def define_flags() -> None:
  """The command line's flags (defined only when it runs: the modules are imported by tests and notebooks)."""
  flags.DEFINE_string('ckpt', None, 'checkpoint directory')
  flags.DEFINE_string('source', 'python_stdlib', 'data source (as data.source)')
  flags.DEFINE_string('split', 'heldout', 'split of the source')
  flags.DEFINE_integer('batches', 16, 'batches to evaluate')
  flags.DEFINE_integer('batch_size', 8, 'sequences per batch')
  flags.DEFINE_integer('seq_len', 256, 'tokens per sequence')
  flags.DEFINE_string('compare', None, 'a second checkpoint (say, the baseline) evaluated on the same data')
  flags.DEFINE_string('layerwise_prompt', None, 'text (or space-separated ids) for the layer-wise analysis')
  flags.DEFINE_string('json', None, 'write the results here')
  flags.DEFINE_string('plot', None, 'draw the per-exit perplexity (and the layer-wise grid) into this PNG')


if __name__ == '__main__':
  define_flags()
  cli.run(main)

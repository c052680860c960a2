"""The notebooks in notebooks/ run top to bottom (nbclient, kernel python3) on tiny checkpoints, print and plot what
they promise, and are committed without outputs.

One LayerSkip checkpoint is trained once for the module (4 steps of 4 x 64 tokens; the data cache is the shared
default). Notebook 01 finds it in its runs directory and trains the baseline itself (its own fallback, through
`like()`); notebook 02 is pointed at the checkpoint by LAYERSKIP_CKPT. Small settings come in through the
environment variables the notebooks read.
"""

import json
import re
import subprocess
import sys

import nbformat
import pytest
from conftest import ROOT, host_devices_env
from nbclient import NotebookClient

NOTEBOOKS = ROOT / 'notebooks'
LAYERWISE = NOTEBOOKS / '01_layerwise_predictions.ipynb'
SPECULATIVE = NOTEBOOKS / '02_self_speculative_decoding.ipynb'
STEPS = 4
TRAIN_ARGS = [
  '--config.train.batch_size=4',
  '--config.train.seq_len=64',
  '--config.train.eval_every=0',
  '--config.logging.tensorboard=false',
]
LAYERS = 8  # the tiny preset


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A runs directory holding tiny/ (LayerSkip) as the README's command makes it, only shorter."""
  runs = tmp_path_factory.mktemp('runs')
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'layerskip_jax.train',
      '--config',
      'tiny',
      '--workdir',
      str(runs / 'tiny'),
      f'--config.train.steps={STEPS}',
      '--config.logging.progress_bar=false',
      *TRAIN_ARGS,
    ],
    env=host_devices_env(1),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return runs


def execute(path, cwd, **settings):
  """Runs the notebook in `cwd` with `settings` as environment variables; returns its text output and images."""
  nb = nbformat.read(path, as_version=4)
  env = {k: v for k, v in host_devices_env(1).items() if not k.startswith('LAYERSKIP_')}  # none of the caller's
  env.update(
    MPLBACKEND='module://matplotlib_inline.backend_inline',
    LAYERSKIP_NOTEBOOK_STEPS=str(STEPS),
    LAYERSKIP_NOTEBOOK_TRAIN_ARGS=' '.join(TRAIN_ARGS),
    **settings,
  )
  NotebookClient(nb, kernel_name='python3', timeout=600, resources={'metadata': {'path': str(cwd)}}).execute(env=env)
  text, images = [], 0
  for cell in nb.cells:
    for output in cell.get('outputs', []):
      if output.output_type == 'stream':
        text.append(output.text)
      elif output.output_type in ('display_data', 'execute_result'):
        images += 'image/png' in output.data
        text.append(output.data.get('text/plain', ''))
  return '\n'.join(text), images


@pytest.mark.slow
def test_layerwise_predictions_notebook(runs, tmp_path):
  text, images = execute(
    LAYERWISE,
    tmp_path,
    LAYERSKIP_RUNS_DIR=str(runs),
    LAYERSKIP_LAYERWISE_PROMPTS='2',
    LAYERSKIP_LAYERWISE_LEN='32',
    LAYERSKIP_EVAL_BATCHES='2',
    LAYERSKIP_EVAL_BATCH_SIZE='4',
    LAYERSKIP_EVAL_SEQ_LEN='64',
  )
  assert f'LAYERSKIP_CKPT: {runs / "tiny"} (step {STEPS}, found)' in text
  assert f'LAYERSKIP_BASELINE_CKPT: {runs / "tiny_baseline"} (step {STEPS}, trained here)' in text
  baseline = json.loads((runs / 'tiny_baseline' / 'layerskip_config.json').read_text())
  assert baseline['layerskip']['p_max'] == 0 and baseline['layerskip']['e_scale'] == 0
  assert (baseline['train']['steps'], baseline['train']['batch_size'], baseline['train']['seq_len']) == (STEPS, 4, 64)
  # the layer-wise table: one row per prompt token with L predictions, for both checkpoints
  assert text.count(' E=1 ') == 2 and f'E={LAYERS} | settle ok' in text
  for name in ('LayerSkip', 'baseline'):
    match = re.search(
      rf'^{name}: mean settle exit (\d+\.\d\d) of {LAYERS} on the prompt .*; (\d+\.\d\d) of '
      rf'{LAYERS} \(\d+%\) over 2 held-out prompts x 32 tokens$',
      text,
      re.MULTILINE,
    )
    assert match, f'no settle statistic for {name}'
    assert all(1 <= float(v) <= LAYERS for v in match.groups())
  # the per-exit table: L rows of perplexity, agreement and accuracy for both
  assert 'held-out: 2 batches x 4 x 64 tokens' in text
  rows = re.findall(r'^ +(\d+)(?: +\d+\.\d\d){6}$', text, re.MULTILINE)
  assert rows == [str(e) for e in range(1, LAYERS + 1)]
  assert images == 3  # the grid, the settle histogram, perplexity and agreement per exit


@pytest.mark.slow
def test_self_speculative_decoding_notebook(runs, tmp_path):
  ckpt = str(runs / 'tiny')
  # The baseline is any second checkpoint here (the same one): this runs the notebook's baseline-acceptance code.
  text, images = execute(
    SPECULATIVE,
    tmp_path,
    LAYERSKIP_CKPT=ckpt,
    LAYERSKIP_BASELINE_CKPT=ckpt,
    LAYERSKIP_RUNS_DIR=str(tmp_path / 'none'),
    LAYERSKIP_BENCH_NUM_PROMPTS='2',
    LAYERSKIP_BENCH_PROMPT_LEN='32',
    LAYERSKIP_BENCH_MAX_NEW_TOKENS='16',
    LAYERSKIP_BENCH_EXIT_LAYERS='2,4,6',
    LAYERSKIP_BENCH_NUM_SPECULATIONS='2,4',
    LAYERSKIP_BENCH_REPEATS='1',
  )
  assert f'LAYERSKIP_CKPT: {ckpt} (step {STEPS}, from $LAYERSKIP_CKPT)' in text
  assert 'greedy self-speculative output equals autoregressive output: True (6 (E, d) settings x 2 prompts' in text
  spec = re.findall(r'^ +self_speculative +(\d) +(\d) .* (\d\.\d\d)$', text, re.MULTILINE)
  assert sorted((int(e), int(d)) for e, d, _ in spec) == [(e, d) for e in (2, 4, 6) for d in (2, 4)]
  assert all(agreement == '1.00' for _, _, agreement in spec)
  assert len(re.findall(r'^ +early_exit ', text, re.MULTILINE)) == 3
  assert 'floor (weight-matmul chain, one token)' in text
  best = re.search(r'^best \(E, d\) at batch 1: E=(\d) d=(\d): (\d+\.\d\d)x autoregressive', text, re.MULTILINE)
  assert best and int(best[1]) in (2, 4, 6) and int(best[2]) in (2, 4) and float(best[3]) > 0
  assert re.search(r'^baseline acceptance at d=4: E=2: \d\.\d\d, E=4: \d\.\d\d, E=6: \d\.\d\d$', text, re.MULTILINE)
  assert images == 1  # the speed-up heatmap and acceptance against E, side by side


@pytest.mark.parametrize('path', [LAYERWISE, SPECULATIVE], ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == 'python3'
  code = [cell for cell in nb.cells if cell.cell_type == 'code']
  assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
  assert all('execution' not in cell.metadata for cell in nb.cells)  # nbclient's timings

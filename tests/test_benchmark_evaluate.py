"""The generation benchmark and the per-exit evaluation: JSON schemas, the sweep's best, the layer-wise statistic."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from flax import nnx

from layerskip_jax import api, checkpoint_dir, config as config_lib
from layerskip_jax.benchmark import add_efficiency, best_setting, modelled_ms_per_token, read_prompts
from layerskip_jax.evaluate import layerwise
from layerskip_jax.errors import UsageError
from layerskip_jax.model import ModelConfig, create

OVERRIDES = {'model.num_hidden_layers': 4, 'model.hidden_size': 64, 'model.num_attention_heads': 4,
             'model.intermediate_size': 96, 'model.vocab_size': 128, 'model.initializer_range': 0.3}


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  config = config_lib.load('tiny', OVERRIDES)
  params = nnx.to_pure_dict(nnx.state(create(ModelConfig.from_config(config.model)), nnx.Param))
  return checkpoint_dir.write_params_dir(tmp_path_factory.mktemp('bench') / 'ckpt', config, params)


def test_benchmark_runs_end_to_end_with_its_schema(ckpt, tmp_path):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('1 5 9 20 3\n7 8 2\n\n4 4 4 4\n11 12\n')
  out = tmp_path / 'bench.json'
  result = subprocess.run([sys.executable, '-m', 'layerskip_jax.benchmark', '--ckpt', str(ckpt), '--prompts',
                           str(prompts), '--exit_layers', '1,2', '--num_speculations', '2,3', '--batch_sizes', '1,2',
                           '--max_new_tokens', '8', '--repeats', '1', '--json', str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(out.read_text())
  assert {'settings', 'best', 'floor_ms_per_token', 'autoregressive_over_floor', 'num_layers'} <= set(report)
  keys = {'strategy', 'batch_size', 'exit_layer', 'num_speculations', 'ms_per_token', 'tokens_per_sec', 'prefill_ms',
          'acceptance_rate', 'speedup', 'agreement', 'modelled_ms_per_token', 'efficiency'}
  assert all(set(s) == keys for s in report['settings'])
  for s in report['settings']:  # every self-speculative row has its early-exit row here: it is modelled
    assert (s['efficiency'] is not None) == (s['strategy'] == 'self_speculative')
  assert len(report['settings']) == 2 * (1 + 2 + 4)  # per batch size: AR, 2 early exits, 2 x 2 self-speculative
  for s in report['settings']:
    if s['strategy'] == 'self_speculative':
      assert s['agreement'] == 1.0  # greedy self-speculation reproduces autoregressive output
  for b in ('1', '2'):
    spec = [s for s in report['settings'] if s['strategy'] == 'self_speculative' and s['batch_size'] == int(b)]
    assert report['best'][b]['speedup'] == max(s['speedup'] for s in spec)
  assert 'best at batch 1' in result.stdout and 'floor' in result.stdout


def test_the_round_cost_model_of_spec_section_2_4():
  """The 300-step tiny model's numbers (spec 2.4): AR 0.639, EE(5) 0.301 ms, d = 2, 62% of drafts accepted model
  0.554 ms/token (measured 0.714: efficiency 0.78); all drafts accepted, d + 1 tokens for (d + 1) EE + AR - EE."""
  assert modelled_ms_per_token(0.639, 0.301, 2, 0.62) == pytest.approx(0.554, abs=1e-3)
  assert modelled_ms_per_token(0.639, 0.301, 2, 1.0) == pytest.approx((3 * 0.301 + 0.639 - 0.301) / 3)
  settings = [{'strategy': 'autoregressive', 'batch_size': 1, 'exit_layer': None, 'ms_per_token': 0.639},
              {'strategy': 'early_exit', 'batch_size': 1, 'exit_layer': 5, 'ms_per_token': 0.301},
              {'strategy': 'self_speculative', 'batch_size': 1, 'exit_layer': 5, 'num_speculations': 2,
               'acceptance_rate': 0.62, 'ms_per_token': 0.714},
              {'strategy': 'self_speculative', 'batch_size': 1, 'exit_layer': 4, 'num_speculations': 2,
               'acceptance_rate': 0.5, 'ms_per_token': 1.0}]
  add_efficiency(settings)
  assert settings[2]['efficiency'] == pytest.approx(0.554 / 0.714, abs=2e-3)
  assert settings[3]['efficiency'] is None and settings[0]['efficiency'] is None  # no EE(4) row; not a round


def test_best_setting_is_the_highest_speedup():
  settings = [{'strategy': 'self_speculative', 'batch_size': 1, 'speedup': x, 'exit_layer': e}
              for e, x in ((1, 1.2), (2, 1.9), (3, 1.4))] + [{'strategy': 'early_exit', 'batch_size': 1,
                                                              'speedup': 5.0}]
  assert best_setting(settings, 1)['exit_layer'] == 2 and best_setting(settings, 4) is None


def test_prompt_files(tmp_path):
  path = tmp_path / 'p.jsonl'
  path.write_text('{"prompt": [1, 2, 3]}\n{"prompt": "text"}\n')
  with pytest.raises(UsageError, match='text prompt, but the checkpoint has no tokenizer'):
    read_prompts(str(path), None)
  path.write_text('{"prompt": [1, 2, 3]}\n')
  assert read_prompts(str(path), None) == [[1, 2, 3]]
  with pytest.raises(UsageError, match='no such file'):
    read_prompts(str(tmp_path / 'missing.txt'), None)


def test_layerwise_statistic_on_a_model_whose_last_layers_change_nothing(ckpt):
  lm = api.load(ckpt)
  layers = lm.model.layers
  for proj in (layers.self_attn.o_proj, layers.mlp.down_proj):  # layers 2 and 3 become the identity
    proj[...] = proj[...].at[2:].set(0.0)
  prompt = list(np.random.RandomState(0).randint(0, 128, 20))
  grid = layerwise(lm, prompt)
  top1 = np.asarray(grid['top1'])  # [T, L]
  assert np.all(top1[:, 1] == top1[:, 2]) and np.all(top1[:, 2] == top1[:, 3])  # exits 2..4 are identical
  # brute force: settle exit = 1 if exit 1 already agrees with the final one, else 2 (exit 2 == final here)
  expected = [1 if top1[t, 0] == top1[t, 3] else 2 for t in range(20)]
  assert grid['settle_exit'] == expected and 1 < grid['mean_settle_exit'] <= 2
  assert grid['mean_settle_exit'] == pytest.approx(np.mean(expected))


def test_evaluate_command_line(tmp_path):
  """evaluate on a trained-for-2-steps workdir (its tokenizer) over the stdlib heldout split, with --compare."""
  env_cache = tmp_path / 'cache'
  base = [sys.executable, '-m', 'layerskip_jax.train', '--config', 'tiny', f'--config.data.cache_dir={env_cache}',
          '--config.train.steps=2', '--config.model.num_hidden_layers=2', '--config.logging.progress_bar=false',
          '--config.train.eval_batches=1', '--config.train.seq_len=64']
  for name in ('a', 'b'):
    done = subprocess.run(base + ['--workdir', str(tmp_path / name)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
  out = tmp_path / 'eval.json'
  result = subprocess.run([sys.executable, '-m', 'layerskip_jax.evaluate', '--ckpt', str(tmp_path / 'a'),
                           '--compare', str(tmp_path / 'b'), '--batches', '2', '--seq_len', '64', '--json', str(out),
                           '--layerwise_prompt', 'def f(x):'], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**__import__('os').environ, 'HOME': str(tmp_path)})
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(out.read_text())
  for r in (report, report['compare']):
    assert {'exit_ce', 'exit_ppl', 'exit_accuracy', 'exit_agreement', 'tokens', 'ckpt', 'split'} <= set(r)
    assert len(r['exit_ppl']) == 2 and r['exit_agreement'][-1] == 1.0
    np.testing.assert_allclose(r['exit_ppl'], np.exp(r['exit_ce']), rtol=1e-5)
  assert report['layerwise']['num_layers'] == 2 and 'mean settle exit' in result.stdout
  bad = subprocess.run([sys.executable, '-m', 'layerskip_jax.evaluate'], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 2 and '--ckpt is required' in bad.stderr

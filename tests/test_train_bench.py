"""train.bench's speed report: interleaved timing of the chosen settings and the equal-time step count that
launch/local.sh --with-baseline=time trains the baseline for; its bad input is one line."""

import subprocess
import sys

from conftest import ROOT

from layerskip_jax.train import bench

SMALL = [
  'model.num_hidden_layers=2',
  'model.hidden_size=32',
  'model.num_attention_heads=2',
  'model.num_key_value_heads=1',
  'model.intermediate_size=48',
  'model.vocab_size=64',
  'train.batch_size=2',
  'train.seq_len=16',
  'train.steps=40',
  'model.attention_block=16',
]


def test_speed_times_the_preset_against_the_baseline():
  report = bench.speed('tiny', 2, 1e9, ['preset'], SMALL)
  settings = report['settings']
  assert set(settings) == {'baseline', 'preset'}  # the baseline is always timed: it is the denominator
  assert settings['baseline']['vs_baseline'] == 1.0
  ratio = settings['preset']['median_ms'] / settings['baseline']['median_ms']
  assert settings['preset']['vs_baseline'] == ratio
  assert report['equal_time_baseline_steps'] == round(40 * ratio)  # the preset's train.steps, from the overrides
  assert settings['preset']['overrides'] == SMALL
  assert settings['baseline']['overrides'] == [*SMALL, 'layerskip.p_max=0.0', 'layerskip.e_scale=0.0']


def test_bad_speed_settings_are_one_line():
  result = subprocess.run(
    [sys.executable, '-m', 'layerskip_jax.train.bench', '--what', 'speed', '--speed_settings', 'preset,fastest'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and '--speed_settings=preset,fastest: expected any of preset, ' in lines[0], result.stderr


def test_flops_counts_each_exit_the_step_computes():
  """The compiled count scales the exits' loop (whose body XLA counts once) by the exits computed: a setting's extra
  FLOPs are n x one exit's head, loss and gradient, about 8 x hidden x vocab per scored token (forward, the logits
  recomputed in the backward pass, and two backward matmuls), three quarters of which exit_token_fraction 0.25
  saves."""
  report = bench.flops('tiny', 64, 1, ('preset', 'preset_tokens0.25'), ['layerskip.exit_token_fraction=1'])
  settings = report['settings']
  base, preset, quarter = settings['baseline'], settings['preset'], settings['preset_tokens0.25']
  assert base['early_exits_computed'] == 0 and base['vs_baseline'] == 1.0
  assert preset['early_exits_computed'] == quarter['early_exits_computed'] == 3  # rotational R=2 over 8 layers
  head = 8 * 256 * 1024 * 64  # tiny: hidden 256, vocab 1024; 64 tokens
  assert 0.95 < preset['one_exit_flops'] / head < 1.15, preset['one_exit_flops'] / head
  saved = preset['one_exit_flops'] - quarter['one_exit_flops']  # the head's work on the unscored 3/4 of positions
  assert 0.95 < saved / (0.75 * head) < 1.05, saved / (0.75 * head)
  assert preset['step_flops'] == base['counted_flops'] + 3 * preset['one_exit_flops']
  # the layers are unrolled: the plain count is the model's, not one layer's (6 x matmul parameters per token)
  assert base['counted_flops'] > 6 * 6.0e6 * 64


def test_input_compares_the_loader_with_the_step_on_the_same_data(tmp_path):
  """--what input: the loader and the compiled step of one config, on its own data, in one run (data sits below
  train, so the comparison is made here, not in data.bench)."""
  model = [o for o in SMALL if not o.startswith(('model.vocab_size', 'train.'))]
  report = bench.input_pipeline(
    'tiny', 2, 3, [*model, 'train.batch_size=4', 'train.seq_len=32', f'data.cache_dir={tmp_path / "cache"}']
  )
  assert report['batch'] == 4 and report['seq_len'] == 32
  assert report['loader_tokens_per_sec'] > 0 and report['train_step_tokens_per_sec'] > 0
  assert report['loader_over_train'] == report['loader_tokens_per_sec'] / report['train_step_tokens_per_sec']

"""train.bench's speed report: interleaved timing of the chosen settings and the equal-time step count that
launch/local.sh --with-baseline=time trains the baseline for; its bad input is one line."""

import subprocess
import sys

from conftest import ROOT

from layerskip_jax.train import bench

SMALL = ['model.num_hidden_layers=2', 'model.hidden_size=32', 'model.num_attention_heads=2',
         'model.num_key_value_heads=1', 'model.intermediate_size=48', 'model.vocab_size=64', 'train.batch_size=2',
         'train.seq_len=16', 'train.steps=40', 'model.attention_block=16']


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
  result = subprocess.run([sys.executable, '-m', 'layerskip_jax.train.bench', '--what', 'speed',
                           '--speed_settings', 'preset,fastest'], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and '--speed_settings=preset,fastest: expected any of preset, ' in lines[0], result.stderr

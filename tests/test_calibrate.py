"""Automatic E and d (inference/calibrate.py): the teacher-forced agreements, the replayed rounds against the decoder,
the choice, `auto` in api.generate and the generate command, and bad input."""

import dataclasses

import numpy as np
import pytest
from absl import flags
from flax import nnx

from layerskip_jax import api, checkpoint_dir, cli, config as config_lib, generate as generate_command
from layerskip_jax.errors import UsageError
from layerskip_jax.inference import calibrate
from layerskip_jax.model import ModelConfig, create

CONFIG = ModelConfig(
  vocab_size=128,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=4,
  num_attention_heads=4,
  num_key_value_heads=2,
  initializer_range=0.3,
  max_position_embeddings=256,
)
OVERRIDES = {
  'model.num_hidden_layers': 4,
  'model.hidden_size': 64,
  'model.num_attention_heads': 4,
  'model.intermediate_size': 96,
  'model.vocab_size': 128,
  'model.max_position_embeddings': 256,
}


def _loaded(config: ModelConfig = CONFIG, seed: int = 0) -> api.LoadedModel:
  return api.LoadedModel(config=None, model=create(config, seed=seed), tokenizer=None, checkpoint=None)


@pytest.fixture(scope='module')
def lm():
  return _loaded()  # large weights: clear logit margins (greedy self-speculative == autoregressive exactly)


def _prompts(count, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(0, 128, rng.randint(3, 12)).tolist() for _ in range(count)]


def test_teacher_forced_agreement_equals_each_exit_on_its_own(lm):
  rows = _prompts(3, seed=1) + [list(range(40))]  # ragged
  argmax = calibrate.exit_argmax(lm.model, rows)
  for row, got in zip(rows, argmax):
    assert got.shape == (CONFIG.num_hidden_layers, len(row))
    for e in range(1, CONFIG.num_hidden_layers + 1):
      np.testing.assert_array_equal(got[e - 1], lm.logits([row], exit_layer=e)[0].argmax(-1), err_msg=f'E={e}')
  prompts, continuations = rows[:2], [list(range(5, 15)), list(range(30, 37))]
  agree = calibrate.agreement(lm.model, prompts, continuations)
  for prompt, continuation, a in zip(prompts, continuations, agree):
    full = calibrate.exit_argmax(lm.model, [prompt + continuation])[0][:, len(prompt) :]
    np.testing.assert_array_equal(a, full == full[-1])
    assert a.shape == (CONFIG.num_hidden_layers, len(continuation)) and a[-1].all()


def test_run_lengths_and_expected_accepted():
  agree = np.array([[1, 1, 0, 1, 1, 1, 0, 0]], bool)
  np.testing.assert_array_equal(calibrate.run_lengths(agree), [[2, 1, 0, 3, 2, 1, 0, 0]])
  assert calibrate.mean_run([agree[0]]) == 2.5
  runs = calibrate.run_lengths(np.random.RandomState(0).rand(4, 200) < 0.7)
  expected = [calibrate.expected_accepted(runs, d) for d in range(1, 10)]
  assert all(0 <= e <= d for d, e in zip(range(1, 10), expected))
  assert all(a <= b for a, b in zip(expected, expected[1:])) and expected[0] < expected[-1]
  assert calibrate.expected_accepted(np.zeros((0,), int), 3) == 0.0


def test_replayed_rounds_are_the_decoders(lm):
  """Greedy drafts are accepted along the output's own prefix: the teacher-forced agreements replay every round."""
  prompts, max_new = _prompts(3, seed=2), 20
  reference = lm.generate(prompts, strategy='autoregressive', max_new_tokens=max_new)
  agree = calibrate.agreement(lm.model, prompts, reference.tokens)
  runs = [calibrate.run_lengths(a) for a in agree]
  lengths = [len(t) for t in reference.tokens]
  checked_acceptance = False
  for e in range(1, CONFIG.num_hidden_layers):
    for d in (1, 3, 6):
      result = lm.generate(
        prompts, strategy='self_speculative', exit_layer=e, num_speculations=d, max_new_tokens=max_new
      )
      assert result.tokens == reference.tokens, (e, d)
      replayed = calibrate.replay([r[e - 1] for r in runs], lengths, d, max_new)
      rows = result.stats['rows']
      assert replayed.drafted == [r['drafted'] for r in rows], (e, d)
      assert replayed.accepted == [r['accepted'] for r in rows], (e, d)
      if 'rounds' in rows[0]:
        assert replayed.rounds == [r['rounds'] for r in rows], (e, d)
      assert len(replayed.draft_steps) == max(replayed.rounds) and max(replayed.draft_steps) <= d
      assert 0 <= replayed.accepted_per_round <= d
      checked_acceptance |= 0 < sum(replayed.accepted) < sum(replayed.drafted)
  assert checked_acceptance  # some setting both accepted and rejected drafts


def test_choose(lm):
  lines = []
  choice = calibrate.choose(lm, _prompts(2, seed=3), max_new_tokens=12, num_speculations=[1, 2, 4], log=lines.append)
  assert 1 <= choice.exit_layer < CONFIG.num_hidden_layers and choice.num_speculations in (1, 2, 4)
  assert choice.confidence_threshold == 0.0 and choice.predicted_ms_per_token > 0
  label = f'E={choice.exit_layer} d={choice.num_speculations}' + (
    ' with an adaptive threshold' if choice.adapt_threshold else ''
  )
  assert choice.reason.startswith(f'{label}: exit {choice.exit_layer} agrees with the last exit on ')
  assert 'ms/token modelled' in choice.reason and 'measured' in choice.reason and '\n' not in choice.reason
  assert len(lines) == 2 and lines[0].startswith('auto: calibrating') and lines[1] == f'auto: {choice.reason}'
  table = [r for r in choice.table if not r['adapt_threshold']]
  adaptive = [r for r in choice.table if r['adapt_threshold']]  # the fastest (E, d) again, adaptive: measured
  assert len(adaptive) == 1 and adaptive[0]['measured_ms_per_token'] is not None
  assert len(table) == 3 * 3 and {(r['exit_layer'], r['num_speculations']) for r in table} == {
    (e, d) for e in (1, 2, 3) for d in (1, 2, 4)
  }
  modelled = [r['modelled_ms_per_token'] for r in table]
  assert modelled == sorted(modelled) and all(m > 0 for m in modelled)
  measured = [r for r in table if r['measured_ms_per_token'] is not None]
  # on a CPU E is a runtime value: the first program (the best modelled d) runs every E here (3 per program)
  assert 3 <= len(measured) <= calibrate.MAX_MEASURED and table[0] in measured
  assert len({r['num_speculations'] for r in measured}) <= calibrate.REFINED_RUNTIME_EXIT
  assert choice.predicted_ms_per_token == min(r['measured_ms_per_token'] for r in measured + adaptive)
  assert choice.autoregressive_ms_per_token > 0 and choice.seconds > 0
  for r in table:
    assert 0 <= r['expected_accepted'] <= r['num_speculations'] and 0 <= r['agreement'] <= 1
    assert r['refitted_ms_per_token'] > 0
  # one value given: that one is fixed; refine=0: the model alone (no self-speculative run)
  fixed = calibrate.choose(
    lm, _prompts(2, seed=3), max_new_tokens=12, exit_layers=[2], num_speculations=[3], refine=0, log=None
  )
  assert (fixed.exit_layer, fixed.num_speculations) == (2, 3) and fixed.table[0]['measured_ms_per_token'] is None
  assert 'measured' not in fixed.reason


def test_choose_where_the_exit_is_static(lm, monkeypatch):
  """On stacked weights (GPU/TPU) each (E, d) is a program: at most REFINED of them run, and a few exits are timed
  (the others interpolated)."""
  monkeypatch.setattr(calibrate, 'uses_unstacked_layers', lambda: False)
  eight = _loaded(dataclasses.replace(CONFIG, num_hidden_layers=8), seed=1)
  choice = calibrate.choose(eight, _prompts(2, seed=5), max_new_tokens=10, num_speculations=[2, 3], log=None)
  # the adaptive twin of the fastest runs on its program: no extra compile
  measured = [r for r in choice.table if r['measured_ms_per_token'] is not None and not r['adapt_threshold']]
  assert 1 <= len(measured) <= calibrate.REFINED and len(choice.table) == 7 * 2 + 1
  assert (choice.exit_layer, choice.num_speculations) in {(r['exit_layer'], r['num_speculations']) for r in measured}
  steps = {r['exit_layer']: r['draft_step_ms'] for r in choice.table}
  assert all(steps[e] <= steps[e + 1] for e in range(1, 7))


def test_nondecreasing_and_lines():
  assert calibrate.nondecreasing([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
  assert calibrate.nondecreasing([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0]
  assert calibrate.fit_line([1, 2, 3], [2.0, 3.0, 4.0]) == pytest.approx((1.0, 1.0))
  assert calibrate.fit_line([1, 2], [3.0, 2.0]) == (2.5, 0.0)  # more rows never cost less: no falling line
  assert calibrate.fit_line([4], [1.5]) == (1.5, 0.0)


def test_api_auto_generates_what_autoregressive_does(lm):
  prompts = _prompts(2, seed=4)
  reference = lm.generate(prompts, strategy='autoregressive', max_new_tokens=16)
  lines = []
  result = lm.generate(
    prompts,
    strategy='self_speculative',
    exit_layer='auto',
    num_speculations='auto',
    max_new_tokens=16,
    calibration_log=lines.append,
  )
  assert result.tokens == reference.tokens
  auto = result.stats['auto']
  assert set(auto) == {
    'exit_layer',
    'num_speculations',
    'confidence_threshold',
    'adapt_threshold',
    'reason',
    'predicted_ms_per_token',
  }
  assert 1 <= auto['exit_layer'] <= 3 and 1 <= auto['num_speculations'] <= 8
  label = f'E={auto["exit_layer"]} d={auto["num_speculations"]}'
  assert auto['reason'].startswith(label + (' with an adaptive threshold: ' if auto['adapt_threshold'] else ': '))
  assert lines[-1] == f'auto: {auto["reason"]}'
  assert result.stats['drafted'] > 0  # it ran self-speculatively with the choice
  common = dict(strategy='self_speculative', max_new_tokens=16)  # the same programs: compiled once
  fixed_e = lm.generate(prompts, exit_layer=2, num_speculations='auto', **common)
  assert fixed_e.stats['auto']['exit_layer'] == 2 and fixed_e.tokens == reference.tokens
  d = auto['num_speculations']
  fixed_d = lm.generate(prompts, exit_layer='auto', num_speculations=d, **common)
  assert fixed_d.stats['auto']['num_speculations'] == d and fixed_d.tokens == reference.tokens


@pytest.mark.parametrize(
  'kwargs,message',
  [
    (
      dict(strategy='early_exit', exit_layer='auto'),
      r"^exit_layer=auto: chooses E and d for "
      r"strategy='self_speculative', not 'early_exit'",
    ),
    (dict(strategy='self_speculative', exit_layer='abc'), r"^exit_layer='abc': must be an integer or 'auto'$"),
    (
      dict(strategy='self_speculative', exit_layer='auto', num_speculations=0),
      r'^num_speculations=0: must be at least 1$',
    ),
    (dict(strategy='self_speculative', exit_layer='auto', top_p=2.0), r'^top_p=2.0: must be in \(0, 1\]'),
    (
      dict(strategy='self_speculative', exit_layer='auto', max_new_tokens=1),
      r'^max_new_tokens=1: exit_layer=auto calibrates on at least 2 new tokens',
    ),
  ],
)
def test_api_bad_input(lm, kwargs, message):
  with pytest.raises(UsageError, match=message):
    lm.generate([[1, 2, 3]], **kwargs)


def test_one_layer_model():
  one = _loaded(dataclasses.replace(CONFIG, num_hidden_layers=1))
  rule = 'the model has 1 layer; self-speculative decoding needs at least 2 (E in 1..L-1)'
  with pytest.raises(UsageError) as error:
    one.generate([[1, 2]], strategy='self_speculative', exit_layer='auto', num_speculations='auto')
  assert str(error.value) == f'exit_layer=auto: {rule}'
  with pytest.raises(UsageError) as error:
    calibrate.choose(one, [[1, 2]], log=None)
  assert str(error.value) == f'exit_layer=auto: {rule}'


@pytest.mark.parametrize(
  'kwargs,message',
  [
    (dict(exit_layers=[4]), r'^exit_layers: 4 is out of range: must be 1\.\.3'),
    (dict(exit_layers=[]), r'^exit_layers: empty'),
    (dict(num_speculations=[0]), r'^num_speculations: 0 is out of range: must be at least 1$'),
    (dict(num_speculations=[2.5]), r'^num_speculations: 2.5 is not an integer$'),
    (dict(batch_size=3), r'^batch_size=3: must be in 1\.\.2 \(there are 2 prompts\)$'),
    (dict(max_new_tokens=1), r'^max_new_tokens=1: calibration needs at least 2 new tokens$'),
    (dict(prompts=[[1, 500]]), r'^prompts\[0\]: token ids must lie in \[0, 128\)$'),
    (dict(prompts=['text']), r'text needs a tokenizer'),
    (dict(max_new_tokens=250), r"^max_new_tokens=250: .* exceeds the model's max_position_embeddings=256"),
  ],
)
def test_choose_bad_input(lm, kwargs, message):
  prompts = kwargs.pop('prompts', [[1, 2, 3], [4, 5]])
  with pytest.raises(UsageError, match=message):
    calibrate.choose(lm, prompts, log=None, **kwargs)


# --- the generate command --------------------------------------------------------------------------------------


def _checkpoint(path, **overrides):
  config = config_lib.load('tiny', {**OVERRIDES, **overrides})
  params = nnx.to_pure_dict(nnx.state(create(ModelConfig.from_config(config.model)), nnx.Param))
  return checkpoint_dir.write_params_dir(path, config, params)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  return _checkpoint(tmp_path_factory.mktemp('calibrate') / 'ckpt')


def _main(*argv):
  fv = flags.FlagValues()
  generate_command.define_flags(fv)
  fv(['prog', *map(str, argv)])
  generate_command.main(cli.Args(positional=['prog'], config_overrides=[]), fv)


def test_command_line_auto(ckpt, capsys):
  _main(
    '--ckpt',
    ckpt,
    '--prompt',
    '1 5 9 20',
    '--strategy',
    'self_speculative',
    '--exit_layer',
    'auto',
    '--num_speculations',
    'auto',
    '--max_new_tokens',
    '10',
  )
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 4, lines
  assert lines[0].startswith('[auto: calibrating E and d on 1 prompt x 10 tokens (batch 1): 3 E x 8 d]')
  assert lines[1].startswith('[auto: E=') and lines[1].endswith(']') and 'ms/token' in lines[1]
  assert len(lines[2].split()) == 10 and lines[3].startswith('[10 tokens, ') and 'acceptance' in lines[3]
  _main(
    '--ckpt',
    ckpt,
    '--prompt',
    '1 5 9 20',
    '--strategy',
    'self_speculative',
    '--exit_layer',
    '2',
    '--num_speculations',
    '3',
    '--max_new_tokens',
    '10',
  )
  plain = capsys.readouterr().out.splitlines()
  assert len(plain) == 2 and plain[0] == lines[2]  # without auto: the text and the summary, as before


@pytest.mark.parametrize(
  'extra,match',
  [
    (['--exit_layer', 'abc'], r'^--exit_layer=abc: must be an integer or auto$'),
    (['--num_speculations', '2.5'], r'^--num_speculations=2.5: must be an integer or auto$'),
    (
      ['--strategy', 'early_exit', '--exit_layer', 'auto'],
      r'^--exit_layer=auto: chooses E and d for --strategy=self_speculative, not early_exit',
    ),
    (
      ['--strategy', 'autoregressive', '--num_speculations', 'auto'],
      r'^--num_speculations=auto: chooses E and d for --strategy=self_speculative, not autoregressive',
    ),
    (['--exit_layer', 'auto', '--num_speculations', '0'], r'^--num_speculations=0: must be at least 1$'),
    (['--exit_layer', 'auto', '--top_p', '1.5'], r'^--top_p=1.5: must be in \(0, 1\]'),
    (['--exit_layer', '4'], r'^--exit_layer=4: must be in 1\.\.3 for --strategy=self_speculative'),
    (
      ['--exit_layer', 'auto', '--max_new_tokens', '1'],
      r'^--max_new_tokens=1: --exit_layer=auto calibrates on at least 2 new tokens',
    ),
  ],
)
def test_command_line_bad_input_before_the_weights(ckpt, monkeypatch, extra, match):
  def weights(*args, **kwargs):
    raise AssertionError('the command read the weights before refusing its input')

  monkeypatch.setattr(api.CheckpointInfo, 'load', weights)
  with pytest.raises(UsageError, match=match):
    _main('--ckpt', ckpt, '--prompt', '1 2 3', '--strategy', 'self_speculative', *extra)

"""The generation benchmark and the per-exit evaluation: JSON schemas, the sweep's best, the layer-wise statistic."""

import json
import subprocess
import sys
import types

import numpy as np
import pytest
from absl import flags
from conftest import ROOT
from flax import nnx

from layerskip_jax import api, benchmark, checkpoint_dir, cli, config as config_lib
from layerskip_jax.benchmark import add_efficiency, best_setting, modelled_ms_per_token, read_prompts
from layerskip_jax.data.sources import Document
from layerskip_jax.evaluate import layerwise
from layerskip_jax.errors import UsageError
from layerskip_jax.model import ModelConfig, create

OVERRIDES = {
  'model.num_hidden_layers': 4,
  'model.hidden_size': 64,
  'model.num_attention_heads': 4,
  'model.intermediate_size': 96,
  'model.vocab_size': 128,
  'model.initializer_range': 0.3,
}


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  config = config_lib.load('tiny', OVERRIDES)
  params = nnx.to_pure_dict(nnx.state(create(ModelConfig.from_config(config.model)), nnx.Param))
  return checkpoint_dir.write_params_dir(tmp_path_factory.mktemp('bench') / 'ckpt', config, params)


def test_benchmark_runs_end_to_end_with_its_schema(ckpt, tmp_path):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('1 5 9 20 3\n7 8 2\n\n4 4 4 4\n11 12\n')
  out = tmp_path / 'bench.json'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'layerskip_jax.benchmark',
      '--ckpt',
      str(ckpt),
      '--prompts',
      str(prompts),
      '--exit_layers',
      '1,2',
      '--num_speculations',
      '2,3',
      '--batch_sizes',
      '1,2',
      '--max_new_tokens',
      '8',
      '--repeats',
      '1',
      '--json',
      str(out),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(out.read_text())
  assert {'settings', 'best', 'floor_ms_per_token', 'autoregressive_over_floor', 'num_layers'} <= set(report)
  keys = {
    'strategy',
    'batch_size',
    'exit_layer',
    'num_speculations',
    'ms_per_token',
    'tokens_per_sec',
    'prefill_ms',
    'acceptance_rate',
    'speedup',
    'agreement',
    'modelled_ms_per_token',
    'efficiency',
    'confidence_threshold',
    'auto',
    'acceptance_quartiles',
    'speedup_interval',
    'ms_per_token_repeats',
    'rounds',
    'drafted',
    'accepted',
  }
  assert all(set(s) == keys for s in report['settings'])
  assert isinstance(report['programs_compiled'], int) and report['programs_compiled'] >= 1
  assert 'programs compiled (prefill and decode loop): ' in result.stdout
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
  assert modelled_ms_per_token(0.639, 0.301, rounds=1, drafted=2, accepted=1.24) == pytest.approx(0.554, abs=1e-3)
  assert modelled_ms_per_token(0.639, 0.301, rounds=1, drafted=2, accepted=2) == pytest.approx(
    (3 * 0.301 + 0.639 - 0.301) / 3
  )
  # rounds of different lengths (near max_new_tokens, or stopped by a threshold): each costs its own drafts
  assert modelled_ms_per_token(0.6, 0.2, rounds=2, drafted=3, accepted=2) == pytest.approx(
    ((3 * 0.2 + 0.4) + (2 * 0.2 + 0.4)) / 4
  )
  settings = [
    {'strategy': 'autoregressive', 'batch_size': 1, 'exit_layer': None, 'ms_per_token': 0.639},
    {'strategy': 'early_exit', 'batch_size': 1, 'exit_layer': 5, 'ms_per_token': 0.301},
    {
      'strategy': 'self_speculative',
      'batch_size': 1,
      'exit_layer': 5,
      'num_speculations': 2,
      'acceptance_rate': 0.62,
      'ms_per_token': 0.714,
    },
    {
      'strategy': 'self_speculative',
      'batch_size': 1,
      'exit_layer': 4,
      'num_speculations': 2,
      'acceptance_rate': 0.5,
      'ms_per_token': 1.0,
    },
  ]
  add_efficiency(settings)
  assert settings[2]['efficiency'] == pytest.approx(0.554 / 0.714, abs=2e-3)
  assert settings[3]['efficiency'] is None and settings[0]['efficiency'] is None  # no EE(4) row; not a round


def test_best_setting_is_the_highest_speedup():
  settings = [
    {'strategy': 'self_speculative', 'batch_size': 1, 'speedup': x, 'exit_layer': e}
    for e, x in ((1, 1.2), (2, 1.9), (3, 1.4))
  ] + [{'strategy': 'early_exit', 'batch_size': 1, 'speedup': 5.0}]
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
  base = [
    sys.executable,
    '-m',
    'layerskip_jax.train',
    '--config',
    'tiny',
    f'--config.data.cache_dir={env_cache}',
    '--config.train.steps=2',
    '--config.model.num_hidden_layers=2',
    '--config.logging.progress_bar=false',
    '--config.train.eval_batches=1',
    '--config.train.seq_len=64',
  ]
  for name in ('a', 'b'):
    done = subprocess.run(
      base + ['--workdir', str(tmp_path / name)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
  out = tmp_path / 'eval.json'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'layerskip_jax.evaluate',
      '--ckpt',
      str(tmp_path / 'a'),
      '--compare',
      str(tmp_path / 'b'),
      '--batches',
      '2',
      '--seq_len',
      '64',
      '--json',
      str(out),
      '--layerwise_prompt',
      'def f(x):',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env={**__import__('os').environ, 'HOME': str(tmp_path)},
  )
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(out.read_text())
  for r in (report, report['compare']):
    assert {'exit_ce', 'exit_ppl', 'exit_accuracy', 'exit_agreement', 'tokens', 'ckpt', 'split'} <= set(r)
    assert len(r['exit_ppl']) == 2 and r['exit_agreement'][-1] == 1.0
    np.testing.assert_allclose(r['exit_ppl'], np.exp(r['exit_ce']), rtol=1e-5)
  assert report['layerwise']['num_layers'] == 2 and 'mean settle exit' in result.stdout
  bad = subprocess.run([sys.executable, '-m', 'layerskip_jax.evaluate'], cwd=ROOT, capture_output=True, text=True)
  assert bad.returncode == 2 and '--ckpt is required' in bad.stderr


# --- the benchmark's design (a recording stand-in for lm.generate: no compiles) -------------------------------------


class FakeLM:
  """lm.generate stand-in: records each call's keywords and batch; a setting's decode time per prompt depends on the
  prompt (so the speed-up varies over prompts) and drifts upward call by call (as this machine does)."""

  num_layers = 4

  def __init__(self):
    self.calls = []

  def generate(self, batch, **kw):
    self.calls.append((kw, [list(p) for p in batch]))
    drift = 1 + 1e-3 * len(self.calls)
    factor = {'autoregressive': 1.0, 'early_exit': 0.5}.get(kw['strategy'], 0.8)
    speculative = kw['strategy'] == 'self_speculative'
    rows = (
      [{'drafted': 10, 'accepted': p[0] % 5 * 2, 'acceptance_rate': p[0] % 5 / 5, 'new_tokens': 9} for p in batch]
      if speculative
      else [{'drafted': 0, 'accepted': 0, 'acceptance_rate': None, 'new_tokens': 9} for _ in batch]
    )
    seconds = drift * sum(factor ** (1 + p[0] % 3) for p in batch)
    stats = {
      'rows': rows,
      'decode_seconds': seconds,
      'prefill_seconds': 1e-3,
      'new_tokens': 9 * len(batch),
      'drafted': sum(r['drafted'] for r in rows),
      'accepted': sum(r['accepted'] for r in rows),
    }
    return types.SimpleNamespace(tokens=[[1, 2, 3] for _ in batch], stats=stats)


def _key(kw, batch):
  return (
    len(batch),
    kw['strategy'],
    kw.get('exit_layer'),
    kw.get('num_speculations'),
    'adapt' if kw.get('adapt_threshold') else kw.get('confidence_threshold', 0.0),
  )


FAKE_PROMPTS = [[i, 3, 4] for i in range(8)]
FAKE_SWEEP = {
  'strategies': ['autoregressive', 'early_exit', 'self_speculative'],
  'exit_layers': [1, 2],
  'num_speculations': [2, 3],
  'batch_sizes': [1, 2],
  'max_new_tokens': 10,
  'repeats': 3,
}


def test_settings_are_warmed_up_then_timed_round_robin():
  """Every setting once (its compile), then each round every setting once, round r starting at setting r."""
  lm = FakeLM()
  report = benchmark.run_benchmark(lm, FAKE_PROMPTS, **FAKE_SWEEP, confidence_thresholds=[0.5, 'adapt'])
  plan = [
    s for b in (1, 2) for s in benchmark.plan_settings(FAKE_SWEEP['strategies'], [1, 2], [2, 3], b, [0.5, 'adapt'])
  ]
  assert len(plan) == 2 * (1 + 2 + 3 * 4) and len(report['settings']) == len(plan)

  def passes(order):
    return [
      (
        s.batch_size,
        s.strategy,
        s.exit_layer,
        s.num_speculations,
        s.confidence_threshold if s.strategy == 'self_speculative' else 0.0,
        tuple(map(tuple, batch)),
      )
      for s in order
      for batch in (FAKE_PROMPTS[i : i + s.batch_size] for i in range(0, len(FAKE_PROMPTS), s.batch_size))
    ]

  expected = passes(plan) + [call for r in range(3) for call in passes(plan[r:] + plan[:r])]
  assert [(*_key(kw, batch), tuple(map(tuple, batch))) for kw, batch in lm.calls] == expected
  # each setting reports its median round (the drift makes every round slower than the one before)
  for s in report['settings']:
    assert len(s['ms_per_token_repeats']) == 3 and s['ms_per_token'] == sorted(s['ms_per_token_repeats'])[1]


@pytest.mark.parametrize('d_bucket', [0, 5])
def test_generate_keywords_per_setting(d_bucket):
  """max_speculations: d (one program per d) or the shared bucket; threshold keywords only on threshold rows."""
  lm = FakeLM()
  benchmark.run_benchmark(
    lm, FAKE_PROMPTS, **{**FAKE_SWEEP, 'repeats': 1}, d_bucket=d_bucket, confidence_thresholds=[0.5, 'adapt']
  )
  seen = set()
  for kw, _ in lm.calls:
    assert kw['max_new_tokens'] == 10
    if kw['strategy'] != 'self_speculative':
      assert not {'max_speculations', 'confidence_threshold', 'adapt_threshold'} & set(kw)
      continue
    assert kw['max_speculations'] == (d_bucket or kw['num_speculations'])
    assert not ('confidence_threshold' in kw and 'adapt_threshold' in kw)
    assert kw.get('confidence_threshold', 0.5) == 0.5 and kw.get('adapt_threshold', True) is True
    seen.add(_key(kw, [[0]])[-1])
  assert seen == {0.0, 0.5, 'adapt'}


def test_speedup_interval_and_acceptance_quartiles():
  lm = FakeLM()
  report = benchmark.run_benchmark(lm, FAKE_PROMPTS, **FAKE_SWEEP)
  rates = [p[0] % 5 / 5 for p in FAKE_PROMPTS]
  for s in report['settings']:
    low, high = s['speedup_interval']
    assert low <= s['speedup'] <= high
    if s['strategy'] == 'autoregressive':
      assert low == high == s['speedup'] == 1.0 and s['acceptance_quartiles'] is None
      continue
    assert low < high  # the speed-up differs from prompt to prompt here
    if s['strategy'] == 'self_speculative':
      q1, q2, q3 = s['acceptance_quartiles']
      assert q1 <= q2 <= q3 and [q1, q2, q3] == pytest.approx(np.percentile(rates, [25, 50, 75]))
    else:
      assert s['acceptance_quartiles'] is None
  assert report['programs_compiled'] == 0  # nothing compiles here: generate is a stand-in
  # the interval by hand: a constant ratio has no spread; paired resamples of the same batches
  same = {'decode_seconds': [1.0, 2.0, 3.0], 'new_tokens': [10, 10, 10]}
  half = {'decode_seconds': [0.5, 1.0, 1.5], 'new_tokens': [10, 10, 10]}
  assert benchmark.speedup_interval(same, half) == pytest.approx([2.0, 2.0])
  varied = {'decode_seconds': [0.5, 2.0, 1.0], 'new_tokens': [10, 10, 10]}
  low, high = benchmark.speedup_interval(same, varied)
  assert low < 6 / 3.5 < high and benchmark.speedup_interval(same, varied) == [low, high]  # a fixed seed


def _fake_calibrate(monkeypatch, choice):
  """layerskip_jax.inference.calibrate replaced by a module whose choose() records its arguments and returns
  `choice`."""
  from layerskip_jax import inference

  seen = {}

  def choose(lm, prompts, *, max_new_tokens=32, exit_layers=None, num_speculations=None, batch_size=1, log=print):
    seen.setdefault('calls', []).append(
      {'prompts': prompts, 'max_new_tokens': max_new_tokens, 'batch_size': batch_size}
    )
    return choice

  module = types.ModuleType('layerskip_jax.inference.calibrate')
  module.choose = choose
  monkeypatch.setitem(sys.modules, 'layerskip_jax.inference.calibrate', module)
  monkeypatch.setattr(inference, 'calibrate', module, raising=False)
  return seen


def _choice(e, d, threshold):
  return types.SimpleNamespace(
    exit_layer=e,
    num_speculations=d,
    confidence_threshold=threshold,
    predicted_ms_per_token=0.5,
    reason='the best modelled setting',
    table=[{'E': e}],
  )


def test_auto_row_is_timed_with_the_sweep_and_compared_with_its_best(monkeypatch):
  seen = _fake_calibrate(monkeypatch, _choice(2, 4, 0.4))
  lm = FakeLM()
  report = benchmark.run_benchmark(lm, FAKE_PROMPTS, **FAKE_SWEEP, auto=True, calibration_prompts=3)
  assert [c['batch_size'] for c in seen['calls']] == [1, 2]
  assert all(c['prompts'] == FAKE_PROMPTS[:3] and c['max_new_tokens'] == 10 for c in seen['calls'])
  auto_calls = [kw for kw, _ in lm.calls if kw.get('num_speculations') == 4]
  assert auto_calls and all(
    kw['exit_layer'] == 2 and kw['confidence_threshold'] == 0.4 and kw['max_speculations'] == 4 for kw in auto_calls
  )
  assert len(auto_calls) == 4 * (8 + 4)  # warm-up and 3 rounds, batch 1 and 2, interleaved with the rest
  for b in ('1', '2'):
    row = next(s for s in report['settings'] if s['auto'] and s['batch_size'] == int(b))
    assert (row['strategy'], row['exit_layer'], row['num_speculations'], row['confidence_threshold']) == (
      'self_speculative',
      2,
      4,
      0.4,
    )
    auto, best = report['auto'][b], report['best'][b]
    assert not best['auto'] and auto['best_speedup'] == best['speedup']
    assert auto['speedup'] == row['speedup'] and auto['ratio_to_best'] == pytest.approx(
      row['speedup'] / best['speedup']
    )
    assert (auto['exit_layer'], auto['num_speculations'], auto['reason']) == (2, 4, 'the best modelled setting')


def test_source_prompts_alternate_document_starts_and_middles(monkeypatch):
  texts = ['abcdefghijklmnopqrst', 'xy', 'ABCDEFGHIJKLMNOPQRST', 'uvwxyz1', '0123456789', 'one more']
  monkeypatch.setattr(
    benchmark,
    'open_source',
    lambda source, split: types.SimpleNamespace(documents=lambda: iter(Document(text=t) for t in texts)),
  )
  lm = types.SimpleNamespace(tokenizer=types.SimpleNamespace(encode=lambda text: [ord(c) for c in text]))
  prompts = [''.join(map(chr, p)) for p in benchmark.source_prompts(lm, 'src', 'heldout', 4, 5)]
  # a start; the middle of the next document; a start (uvwxyz1: too short for a middle window of 5, so its start);
  # then the middle of 0123456789 (not a document's start)
  assert prompts == ['abcde', 'KLMNO', 'uvwxy', '56789']
  assert sum(not any(t.startswith(p) for t in texts) for p in prompts) == 2
  with pytest.raises(
    UsageError,
    match=r"^--source=src: fewer than 6 documents of 5 tokens in its 'heldout' split; "
    r'lower --num_prompts or --prompt_len$',
  ):
    benchmark.source_prompts(lm, 'src', 'heldout', 6, 5)


@pytest.fixture
def bench_flags(ckpt, tmp_path, monkeypatch):
  """benchmark.main on argv: the tiny checkpoint, 4 prompts of 5 tokens (reading the weights fails the test unless
  `load=True`)."""
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('1 5 9 20 3\n7 8 2 6 6\n4 4 4 4 4\n11 12 13 14 15\n')

  def run(*argv, load=False):
    if not load:
      monkeypatch.setattr(api.CheckpointInfo, 'load', lambda self: pytest.fail('read the weights before refusing'))
    fv = flags.FlagValues()
    benchmark.define_flags(fv)
    fv(
      [
        'prog',
        '--ckpt',
        str(ckpt),
        '--prompts',
        str(prompts),
        '--exit_layers',
        '1,2',
        '--num_speculations',
        '2,3',
        '--max_new_tokens',
        '6',
        '--repeats',
        '1',
        *map(str, argv),
      ]
    )
    benchmark.main(cli.Args(positional=['prog'], config_overrides=[]), fv)

  return run


@pytest.mark.parametrize(
  'extra,match',
  [
    (
      ['--confidence_thresholds', '0.4,x'],
      r"^--confidence_thresholds=0.4,x: 'x' is neither a number nor 'adapt'; "
      r'give comma-separated probabilities in \[0, 1\] or adapt',
    ),
    (
      ['--confidence_thresholds', '0.4,1.5'],
      r'^--confidence_thresholds=0.4,1.5: 1.5 is out of range: must be in '
      r"\[0, 1\] \(a row stops drafting when the early exit's top probability",
    ),
    (['--confidence_thresholds', '-0.1'], r'^--confidence_thresholds=-0.1: -0.1 is out of range'),
    (['--confidence_thresholds', 'nan'], r'^--confidence_thresholds=nan: nan is out of range'),
    (
      ['--confidence_thresholds', 'adapt,0.3,adapt'],
      r'^--confidence_thresholds=adapt,0.3,adapt: adapt is given '
      r'twice',
    ),
    (
      ['--d_bucket', '2'],
      r'^--d_bucket=2: smaller than the largest --num_speculations 3; give 0 \(one program per '
      r'd\) or at least 3$',
    ),
    (['--d_bucket', '-1'], r'^--d_bucket=-1: must not be negative; give 0 \(one program per d\) or at least 3$'),
    (['--auto', '--calibration_prompts', '5'], r'^--calibration_prompts=5: more than the 4 prompts; give 1\.\.4$'),
    (['--auto', '--calibration_prompts', '0'], r'^--calibration_prompts=0: must be at least 1$'),
    (
      ['--max_new_tokens', '1'],
      r'^--max_new_tokens=1: the first new token comes from the prefill, so nothing would '
      r'be decoded and timed; give at least 2$',
    ),
  ],
)
def test_new_flags_are_checked_before_the_weights(bench_flags, extra, match):
  with pytest.raises(UsageError, match=match) as info:
    bench_flags(*extra)
  assert '\n' not in str(info.value)


def test_unused_new_flags_are_not_checked_and_run_benchmark_names_its_arguments(bench_flags):
  with pytest.raises(pytest.fail.Exception, match='read the weights'):  # no self_speculative, no --auto
    bench_flags(
      '--strategies', 'autoregressive', '--d_bucket', '1', '--confidence_thresholds', '2', '--calibration_prompts', '0'
    )
  with pytest.raises(UsageError, match=r'^d_bucket=2: smaller than the largest num_speculations 3; give 0'):
    benchmark.run_benchmark(FakeLM(), FAKE_PROMPTS, **FAKE_SWEEP, d_bucket=2)
  with pytest.raises(UsageError, match=r"^confidence_thresholds=0.5,high: 'high' is neither a number nor 'adapt'"):
    benchmark.run_benchmark(FakeLM(), FAKE_PROMPTS, **FAKE_SWEEP, confidence_thresholds=[0.5, 'high'])


# --- the benchmark on the decoder (compiles: one small sweep each) --------------------------------------------------


def test_benchmark_in_process_with_auto(bench_flags, monkeypatch, tmp_path, capsys):
  """main on the real decoder with a stand-in calibration (E=2, d=2, no threshold): the table, the compiled
  programs, the auto line, and a JSON whose speed-ups lie in their intervals."""
  _fake_calibrate(monkeypatch, _choice(2, 2, 0.0))
  out = tmp_path / 'bench.json'
  bench_flags('--num_speculations', '2', '--auto', '--repeats', '2', '--json', out, load=True)
  stdout = capsys.readouterr().out
  report = json.loads(out.read_text())
  assert isinstance(report['programs_compiled'], int) and report['programs_compiled'] >= 1
  compiled = report['programs_compiled']
  assert f'programs compiled (prefill and decode loop): {compiled} (--d_bucket=0: one per d, strategy' in stdout
  assert len(report['settings']) == 1 + 2 + 2 + 1
  for s in report['settings']:
    assert s['speedup_interval'][0] <= s['speedup'] <= s['speedup_interval'][1]
    if s['strategy'] == 'self_speculative':
      assert s['agreement'] == 1.0 and s['acceptance_quartiles'] == sorted(s['acceptance_quartiles'])
  auto = report['auto']['1']
  assert auto['ratio_to_best'] == pytest.approx(auto['speedup'] / report['best']['1']['speedup'])
  assert (
    f'auto at batch 1: E=2 d=2 (threshold off): {auto["speedup"]:.2f}x, best of the sweep '
    f'{auto["best_speedup"]:.2f}x (E={auto["best_exit_layer"]} d=2): {auto["ratio_to_best"]:.2f} of it; '
    'why: the best modelled setting'
  ) in stdout


def test_confidence_threshold_rows_on_the_decoder(ckpt):
  """Threshold rows through generate's confidence_threshold / adapt_threshold: greedy output is unchanged."""
  lm = api.load(ckpt)
  prompts = [[1, 5, 9, 20, 3], [7, 8, 2, 6, 6], [4, 4, 4, 4, 4], [11, 12, 13, 14, 15]]
  report = benchmark.run_benchmark(
    lm,
    prompts,
    strategies=['self_speculative'],
    exit_layers=[2],
    num_speculations=[2],
    batch_sizes=[1],
    max_new_tokens=6,
    repeats=1,
    confidence_thresholds=[0.5, 'adapt'],
  )
  assert [s['confidence_threshold'] for s in report['settings']] == [0.0, 0.5, 'adapt']
  assert all(s['agreement'] == 1.0 for s in report['settings'])
  assert report['settings'][1]['efficiency'] is None and report['confidence_thresholds'] == [0.5, 'adapt']

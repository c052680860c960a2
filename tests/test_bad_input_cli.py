"""Issue 14 for the inference and report commands: every bad input is refused before any work, as ONE line naming the
flag (or file and line) and value, what is wrong and what to do; no output file is written, an existing one is left
as it was.

Most cases run a command's main() in-process on its own FlagValues, with the weights and the data preparation
replaced by a failure: a case that reached them would fail the test, so every refusal here comes before the work.
A few subprocess runs check the command-line contract itself (exit status 2, one `error:` line on stderr).
"""

import json
import math
import shutil
import subprocess
import sys

import pytest
from absl import flags
from conftest import ROOT, host_devices_env
from flax import nnx

from layerskip_jax import api, benchmark, checkpoint_dir, cli, config as config_lib, evaluate, generate, report
from layerskip_jax.errors import UsageError
from layerskip_jax.inference import sampling
from layerskip_jax.inference.generate import generate as generate_tokens
from layerskip_jax.model import ModelConfig, create

OVERRIDES = {
  'model.num_hidden_layers': 4,
  'model.hidden_size': 64,
  'model.num_attention_heads': 4,
  'model.intermediate_size': 96,
  'model.vocab_size': 128,
  'model.max_position_embeddings': 256,
}
PREVIOUS = 'previous output\n'


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  """A 4-layer converted checkpoint: vocab 128, 256 positions, no tokenizer."""
  config = config_lib.load('tiny', OVERRIDES)
  params = nnx.to_pure_dict(nnx.state(create(ModelConfig.from_config(config.model)), nnx.Param))
  return checkpoint_dir.write_params_dir(tmp_path_factory.mktemp('bad_input') / 'ckpt', config, params)


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
  """Reading the weights or preparing data fails the test: every refusal must come before them."""

  def weights(*args, **kwargs):
    raise AssertionError('the command read the weights before refusing its input')

  def data(*args, **kwargs):
    raise AssertionError('the command prepared data before refusing its input')

  monkeypatch.setattr(api.CheckpointInfo, 'load', weights)
  monkeypatch.setattr(checkpoint_dir, 'restore_model', weights)
  monkeypatch.setattr(evaluate, 'ensure_prepared', data)


def refused(module, *argv, match: str) -> str:
  """Runs module.main in-process on `argv`; it must raise one UsageError line matching `match`."""
  fv = flags.FlagValues()
  module.define_flags(fv)
  fv(['prog', *map(str, argv)])
  with pytest.raises(UsageError, match=match) as info:
    module.main(cli.Args(positional=['prog'], config_overrides=[]), fv)
  message = str(info.value)
  assert '\n' not in message, message
  return message


@pytest.fixture
def prompts(tmp_path):
  path = tmp_path / 'prompts.txt'
  path.write_text('1 5 9 20 3\n7 8 2\n4 4 4 4\n11 12\n')
  return path


@pytest.fixture
def existing(tmp_path):
  """An output file from before: a failed command must leave it as it was (and no temporary sibling)."""
  path = tmp_path / 'out' / 'result.json'
  path.parent.mkdir()
  path.write_text(PREVIOUS)
  yield path
  assert path.read_text() == PREVIOUS
  assert sorted(p.name for p in path.parent.iterdir()) == ['result.json']


# --- benchmark ------------------------------------------------------------------------------------------------


def bench(ckpt, prompts, *extra, match):
  base = [
    '--ckpt',
    ckpt,
    '--prompts',
    prompts,
    '--exit_layers',
    '1,2',
    '--num_speculations',
    '2',
    '--max_new_tokens',
    '4',
    '--repeats',
    '1',
  ]
  return refused(benchmark, *base, *extra, match=match)


@pytest.mark.parametrize(
  'extra,match',
  [
    (['--exit_layers', '2,x'], r"^--exit_layers=2,x: 'x' is not an integer; give comma-separated integers"),
    (
      ['--exit_layers', '1,4'],
      r'^--exit_layers=1,4: 4 is out of range: must be 1\.\.3 \(E counts the layers run; '
      r'the model has 4',
    ),
    (['--exit_layers', '0'], r'^--exit_layers=0: 0 is out of range: must be 1\.\.3'),
    (['--exit_layers', '2,2'], r'^--exit_layers=2,2: 2 is given twice'),
    (['--exit_layers', ''], r'^--exit_layers: empty'),
    (['--num_speculations', '0,2'], r'^--num_speculations=0,2: 0 is out of range: must be at least 1'),
    (['--num_speculations', '2.5'], r"^--num_speculations=2.5: '2.5' is not an integer"),
    (['--batch_sizes', '0'], r'^--batch_sizes=0: 0 is out of range: must be'),
    (['--batch_sizes', '1,9'], r'^--batch_sizes=1,9: 9 is out of range: must be 1\.\.4 \(there are 4 prompts\)'),
    (
      ['--strategies', 'autoregressive,beam'],
      r"^--strategies=autoregressive,beam: 'beam' is not a strategy; "
      r'choose from autoregressive, early_exit, self_speculative',
    ),
    (['--strategies', ''], r'^--strategies: empty'),
    (['--max_new_tokens', '0'], r'^--max_new_tokens=0: must be at least 1'),
    (
      ['--max_new_tokens', '300'],
      r"^--max_new_tokens=300: prompt \(5\) \+ max_new_tokens \+ num_speculations bound "
      r"\(2\) \+ 1 = 308 exceeds the model's max_position_embeddings=256; give "
      r'--max_new_tokens <= 248',
    ),
    (['--repeats', '0'], r'^--repeats=0: must be at least 1'),
    (['--num_prompts', '0'], r'^--num_prompts=0: must be at least 1'),
    (['--prompt_len', '-1'], r'^--prompt_len=-1: must be at least 1'),
  ],
)
def test_benchmark_sweep_values(ckpt, prompts, existing, extra, match):
  bench(ckpt, prompts, '--json', existing, *extra, match=match)


def test_benchmark_unused_values_are_not_checked(ckpt, prompts, existing):
  """The default --exit_layers (2,4,6) is out of range for 4 layers, but autoregressive alone does not use it: the
  command gets as far as the weights."""
  with pytest.raises(AssertionError, match='read the weights'):
    fv = flags.FlagValues()
    benchmark.define_flags(fv)
    fv(['prog', '--ckpt', str(ckpt), '--prompts', str(prompts), '--strategies', 'autoregressive', '--repeats', '1'])
    benchmark.main(cli.Args(['prog'], []), fv)


def test_benchmark_json_is_checked_before_the_benchmark(ckpt, prompts, tmp_path):
  (tmp_path / 'dir').mkdir()
  bench(ckpt, prompts, '--json', tmp_path / 'dir', match=r'^--json=.*dir: is a directory; give a file path$')
  (tmp_path / 'file').write_text('')
  bench(
    ckpt,
    prompts,
    '--json',
    tmp_path / 'file' / 'out.json',
    match=r'^--json=.*/file/out.json: .*/file is a file, not a directory$',
  )


def test_benchmark_output_is_not_an_input(ckpt, prompts):
  bench(ckpt, prompts, '--json', prompts, match=r'^--json=.*prompts.txt: is the same path as the input --prompts=')
  assert prompts.read_text().startswith('1 5 9')


@pytest.mark.parametrize(
  'plot,extra,match',
  [
    ('speedup.xyz', [], r'^--plot=.*speedup.xyz: matplotlib cannot write .xyz files; give a path ending in .png'),
    ('result.json', [], r'^--plot=.*result.json: is the same file as --json=.*; give them different paths'),
    (
      'speedup.png',
      ['--strategies', 'autoregressive,early_exit'],
      r'^--plot=.*speedup.png: draws the self-speculative speed-up over \(E, d\); add self_speculative to '
      r'--strategies',
    ),
  ],
)
def test_benchmark_plot(ckpt, prompts, existing, plot, extra, match):
  bench(ckpt, prompts, '--json', existing, '--plot', existing.parent / plot, *extra, match=match)
  assert not (existing.parent / plot).exists() or plot == existing.name


def test_benchmark_checkpoint_and_prompt_source(ckpt, prompts, tmp_path):
  refused(
    benchmark,
    '--ckpt',
    prompts,
    '--prompts',
    prompts,
    match=r'^--ckpt=.*prompts.txt: is a file; give a '
    r'checkpoint directory',
  )
  refused(benchmark, '--ckpt', tmp_path / 'none', '--prompts', prompts, match=r'^--ckpt=.*none: no such directory')
  refused(benchmark, '--ckpt', ckpt, match='^give exactly one of --prompts FILE and --source NAME')
  refused(
    benchmark,
    '--ckpt',
    ckpt,
    '--source',
    'python_stdlib',
    '--exit_layers',
    '1',
    '--num_speculations',
    '2',
    match=r'^--source=python_stdlib: the checkpoint has no tokenizer; use --prompts with token ids',
  )


def test_benchmark_damaged_config(ckpt, prompts, tmp_path):
  damaged = tmp_path / 'damaged'
  shutil.copytree(ckpt, damaged)
  (damaged / 'layerskip_config.json').write_text('{"model": {"num_hidden_l')
  bench(
    damaged,
    prompts,
    match=r'^--ckpt=.*damaged: layerskip_config.json: not a readable layerskip config .*; '
    r'restore it from a copy$',
  )


def test_benchmark_bad_prompt_file_fails_before_the_weights(ckpt, tmp_path, existing):
  path = tmp_path / 'p.txt'
  path.write_text('1 2 3\n4 500 6\n')
  bench(
    ckpt,
    path,
    '--json',
    existing,
    match=r'^.*p.txt:2: token id 500 is outside the model\'s vocabulary '
    r'\(0\.\.127\); give ids in that range$',
  )


# --- prompt files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'name,content,match',
  [
    ('p.txt', b'1 2 3\n4 \xff 6\n', r'p.txt:2: not valid UTF-8 \(byte 0xff at column 3\); save the file as UTF-8$'),
    ('p.txt', b'1 2\n3 128\n', r"p.txt:2: token id 128 is outside the model's vocabulary \(0\.\.127\)"),
    ('p.txt', b'1 2\n-1 5\n', r"p.txt:2: token id -1 is outside the model's vocabulary"),
    ('p.txt', b'def f(x):\n', r'p.txt:1: text prompt, but the checkpoint has no tokenizer; give token ids$'),
    ('p.txt', b'\n  \n', r'^--prompts=.*p.txt: no prompts \(the file is empty or blank\)$'),
    (
      'p.jsonl',
      b'{"prompt": [1]}\n{"prompt": [1, 2\n',
      r'p.jsonl:2: not JSON \(.*\); each line of a .jsonl prompt '
      r'file is an object like \{"prompt": "def f\(x\):"\}',
    ),
    ('p.jsonl', b'[1, 2, 3]\n', r'p.jsonl:1: a list, not an object; each line of a .jsonl prompt file is an object'),
    (
      'p.jsonl',
      b'{"text": "x", "id": 3}\n',
      r'p.jsonl:1: the record has no "prompt" field \(its fields: id, text\); '
      r'add one: text or a list of token ids$',
    ),
    ('p.jsonl', b'{"prompt": 7}\n', r'p.jsonl:1: "prompt" is a number; give text \(a string\) or a list of token ids$'),
    ('p.jsonl', b'{"prompt": null}\n', r'p.jsonl:1: "prompt" is null; give text'),
    (
      'p.jsonl',
      b'{"prompt": [1, "a"]}\n',
      r'p.jsonl:1: "prompt" item 1 is "a", not a token id; give a list of '
      r'integers$',
    ),
    ('p.jsonl', b'{"prompt": [1, 2.0]}\n', r'p.jsonl:1: "prompt" item 1 is 2.0, not a token id'),
    ('p.jsonl', b'{"prompt": [1, true]}\n', r'p.jsonl:1: "prompt" item 1 is true, not a token id'),
    ('p.jsonl', b'{"prompt": ""}\n', r'p.jsonl:1: "prompt" is empty; give text \(or token ids\), or remove the line$'),
    ('p.jsonl', b'{"prompt": []}\n', r'p.jsonl:1: "prompt" is an empty list; give at least one token id'),
    ('p.jsonl', b'{"prompt": [3, 200]}\n', r"p.jsonl:1: token id 200 is outside the model's vocabulary"),
    ('p.jsonl', b'{"prompt": [1]}\n{"prompt": "caf\xc3"}\n', r'p.jsonl:2: not valid UTF-8 \(byte 0xc3 at column 16\)'),
  ],
)
def test_prompt_file_errors_name_file_and_line(tmp_path, name, content, match):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(UsageError, match=match) as info:
    benchmark.read_prompts(str(path), None, 128)
  assert '\n' not in str(info.value) and str(path) in str(info.value)


def test_prompt_files_that_are_fine(tmp_path):
  path = tmp_path / 'p.txt'
  path.write_bytes(b'\xef\xbb\xbf1 2 3\r\n\r\n 4 5 \n')  # a byte-order mark, CRLF, a blank line, spaces
  assert benchmark.read_prompts(str(path), None, 128) == [[1, 2, 3], [4, 5]]
  with pytest.raises(UsageError, match=r'^--prompts=.*: is a directory; give a prompt file$'):
    benchmark.read_prompts(str(tmp_path), None)


# --- evaluate -------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def short_ckpt(ckpt, tmp_path_factory):
  """The same checkpoint with 64 positions (only its config is read here)."""
  path = tmp_path_factory.mktemp('short') / 'short'
  shutil.copytree(ckpt, path)
  config = json.loads((path / 'layerskip_config.json').read_text())
  config['model']['max_position_embeddings'] = config['train']['seq_len'] = 64
  (path / 'layerskip_config.json').write_text(json.dumps(config))
  return path


@pytest.mark.parametrize(
  'extra,match',
  [
    (['--seq_len', '512'], r'^--seq_len=512: must be at most model.max_position_embeddings=256 of --ckpt='),
    (['--seq_len', '1'], r'^--seq_len=1: must be at least 2$'),
    (['--batches', '0'], r'^--batches=0: must be at least 1$'),
    (['--batch_size', '-2'], r'^--batch_size=-2: must be at least 1$'),
    (['--layerwise_prompt', ''], r"^--layerwise_prompt='': empty; give text \(or space-separated token ids\)$"),
    (['--layerwise_prompt', '   '], r"^--layerwise_prompt='   ': empty"),
    (
      ['--layerwise_prompt', 'def f(x):'],
      r"^--layerwise_prompt='def f\(x\):': --ckpt=.* has no tokenizer, so the "
      r'prompt must be space-separated token ids$',
    ),
    (
      ['--layerwise_prompt', '1 2 128'],
      r"^--layerwise_prompt='1 2 128': token id 128 is outside the model's "
      r'vocabulary \(0\.\.127\)',
    ),
    ([], r'^--ckpt=.*ckpt: has no tokenizer to tokenize --source=python_stdlib$'),
  ],
)
def test_evaluate_flags(ckpt, existing, extra, match):
  refused(evaluate, '--ckpt', ckpt, '--json', existing, *extra, match=match)


def test_evaluate_compare_is_named(ckpt, short_ckpt, existing, tmp_path):
  refused(
    evaluate,
    '--ckpt',
    ckpt,
    '--compare',
    short_ckpt,
    '--seq_len',
    '128',
    '--json',
    existing,
    match=r'^--seq_len=128: must be at most model.max_position_embeddings=64 of --compare=.*short$',
  )
  refused(
    evaluate,
    '--ckpt',
    ckpt,
    '--compare',
    existing,
    '--json',
    tmp_path / 'x.json',
    match=r'^--compare=.*result.json: is a file; give a checkpoint directory',
  )
  refused(evaluate, '--ckpt', ckpt, '--compare', tmp_path / 'none', match=r'^--compare=.*none: no such directory$')
  assert not (tmp_path / 'x.json').exists()


def test_evaluate_outputs(ckpt, existing, tmp_path):
  refused(evaluate, '--ckpt', ckpt, '--json', tmp_path, match=r'^--json=.*: is a directory; give a file path$')
  refused(
    evaluate,
    '--ckpt',
    ckpt,
    '--json',
    existing,
    '--plot',
    existing,
    match=r'^--plot=.*: is the same file as '
    r'--json=',
  )
  refused(evaluate, '--ckpt', existing, '--json', tmp_path / 'x.json', match=r'^--ckpt=.*result.json: is a file')


# --- generate -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'extra,match',
  [
    (['--prompt', ''], r"^--prompt='': empty; give text \(or space-separated token ids\)$"),
    (['--prompt', ' \t'], r"^--prompt=' \\t': empty"),
    (
      ['--prompt', 'hello'],
      r"^--prompt='hello': --ckpt=.* has no tokenizer, so the prompt must be space-separated "
      r'token ids$',
    ),
    (['--prompt', '1 999'], r"^--prompt='1 999': token id 999 is outside the model's vocabulary \(0\.\.127\)"),
    (['--top_p', '1.5'], r'^--top_p=1.5: must be in \(0, 1\] \(1 = all tokens\)$'),
    (['--top_p', '0'], r'^--top_p=0.0: must be in \(0, 1\]'),
    (['--top_p', 'nan'], r'^--top_p=nan: must be in \(0, 1\]'),
    (['--temperature', '-0.5'], r'^--temperature=-0.5: must be >= 0 \(0 = greedy\)$'),
    (['--temperature', 'inf'], r'^--temperature=inf: must be a finite number \(0 = greedy\)$'),
    (['--temperature', 'nan'], r'^--temperature=nan: must be a finite number'),
    (['--top_k', '-1'], r'^--top_k=-1: must be >= 0 \(0 = all tokens\)$'),
    (
      ['--strategy', 'self_speculative', '--exit_layer', '4'],
      r'^--exit_layer=4: must be in 1\.\.3 for --strategy=self_speculative \(E counts layers run; the model has 4\)$',
    ),
    (['--strategy', 'early_exit', '--exit_layer', '0'], r'^--exit_layer=0: must be in 1\.\.4'),
    (['--num_speculations', '0'], r'^--num_speculations=0: must be at least 1$'),
    (['--confidence_threshold', '1.5'], r'^--confidence_threshold=1.5: must be a number in \[0, 1\]'),
    (['--confidence_threshold', '-0.1'], r'^--confidence_threshold=-0.1: must be a number in \[0, 1\]'),
    (
      ['--num_speculations', '4', '--max_speculations', '2'],
      r'^--max_speculations=2: the d bucket must hold d \(--num_speculations=4\): give at least 4',
    ),
    (['--exit_layer', 'auto', '--max_speculations', '8'], r'^--max_speculations=8: a d bucket is for a given d'),
    (['--max_new_tokens', '0'], r'^--max_new_tokens=0: must be at least 1$'),
    (
      ['--max_new_tokens', '250'],
      r"^--max_new_tokens=250: prompt \(3\) .* = 258 exceeds the model's "
      r'max_position_embeddings=256; give --max_new_tokens <= 248$',
    ),
  ],
)
def test_generate_flags(ckpt, extra, match):
  refused(generate, '--ckpt', ckpt, '--prompt', '1 2 3', *extra, match=match)


def test_generate_checkpoint(tmp_path, prompts):
  refused(
    generate,
    '--ckpt',
    prompts,
    '--prompt',
    '1',
    match=r'^--ckpt=.*prompts.txt: is a file; give a '
    r'checkpoint directory \(DIR or DIR/checkpoints/<step>\)$',
  )


@pytest.mark.parametrize(
  'kwargs,rule',
  [
    (dict(top_p=1.5), 'top_p=1.5: must be in (0, 1] (1 = all tokens)'),
    (dict(top_p=0.0), 'top_p=0.0: must be in (0, 1] (1 = all tokens)'),
    (dict(temperature=-1.0), 'temperature=-1.0: must be >= 0 (0 = greedy)'),
    (dict(temperature=math.nan), 'temperature=nan: must be a finite number (0 = greedy)'),
    (dict(top_k=-3), 'top_k=-3: must be >= 0 (0 = all tokens)'),
    (dict(top_k=2.5), 'top_k=2.5: must be an integer (0 = all tokens)'),
  ],
)
def test_sampling_rules_are_one_message_for_the_api_and_the_command_line(small_model, kwargs, rule):
  with pytest.raises(UsageError) as api_error:
    generate_tokens(
      small_model,
      [[1, 2, 3]],
      temperature=kwargs.get('temperature', 0.0),
      top_k=kwargs.get('top_k', 0),
      top_p=kwargs.get('top_p', 1.0),
    )
  assert str(api_error.value) == rule
  values = {'temperature': 0.0, 'top_k': 0, 'top_p': 1.0, **kwargs}
  with pytest.raises(UsageError) as flag_error:
    sampling.check_parameters(**values, prefix='--')
  assert str(flag_error.value) == '--' + rule


# --- report ---------------------------------------------------------------------------------------------------

EVAL = {
  'ckpt': 'runs/tiny',
  'step': 300,
  'source': 'python_stdlib',
  'split': 'heldout',
  'exit_ce': [3.0, 2.0],
  'exit_ppl': [20.0, 7.4],
  'exit_accuracy': [0.3, 0.5],
  'exit_agreement': [0.6, 1.0],
  'compare': None,
}
BENCH = {
  'settings': [],
  'best': {'1': {'speedup': 1.5, 'exit_layer': 2, 'num_speculations': 4, 'acceptance_rate': 0.7, 'agreement': 1.0}},
  'floor_ms_per_token': 0.5,
  'autoregressive_over_floor': 3.0,
}


def _json(tmp_path, name, data):
  path = tmp_path / name
  path.write_text(data if isinstance(data, str) else json.dumps(data))
  return path


@pytest.mark.parametrize(
  'flag,data,match',
  [
    (
      '--eval',
      'not json {',
      r'^--eval=.*bad.json: not JSON \(Expecting value at line 1 column 1\); give the JSON '
      r'file that layerskip_jax.evaluate --json wrote$',
    ),
    (
      '--eval',
      [1, 2],
      r'^--eval=.*bad.json: holds a list, not an object; give the JSON file that '
      r'layerskip_jax.evaluate --json wrote$',
    ),
    (
      '--eval',
      BENCH,
      r'^--eval=.*bad.json: is a benchmark result \(layerskip_jax.benchmark --json\), not an '
      r'evaluation; pass it as --benchmark$',
    ),
    (
      '--eval',
      {k: v for k, v in EVAL.items() if k != 'exit_ppl'},
      r'^--eval=.*bad.json: has no "exit_ppl" field; this is not an eval.json of layerskip_jax.evaluate --json: '
      r'give that file \(or rerun the evaluation\)$',
    ),
    ('--eval', {**EVAL, 'exit_ppl': 'high'}, r'^--eval=.*: "exit_ppl" is a string, not a list of numbers; '),
    ('--eval', {**EVAL, 'exit_agreement': [1.0]}, r'^--eval=.*: "exit_agreement" has 1 values, "exit_ppl" 2; '),
    (
      '--eval',
      {**EVAL, 'compare': {**EVAL, 'exit_accuracy': None}},
      r'^--eval=.*: "compare.exit_accuracy" is null, not a list of numbers',
    ),
    ('--eval', {**EVAL, 'layerwise': {'num_layers': 2}}, r'^--eval=.*: has no "layerwise.mean_settle_exit" field'),
    (
      '--benchmark',
      EVAL,
      r'^--benchmark=.*bad.json: is an evaluation \(layerskip_jax.evaluate --json\), not a '
      r'benchmark result; pass it as --eval$',
    ),
    (
      '--benchmark',
      {'best': {'1': {**BENCH['best']['1'], 'speedup': None}}},
      r'^--benchmark=.*: "best.1.speedup" is null, not a number; this is not a benchmark.json of '
      r'layerskip_jax.benchmark --json',
    ),
    ('--benchmark', {'best': []}, r'^--benchmark=.*: "best" is a list, not an object'),
    ('--benchmark', {**BENCH, 'floor_ms_per_token': 'x'}, r'^--benchmark=.*: "floor_ms_per_token" is a string'),
  ],
)
def test_report_inputs_of_the_wrong_shape(tmp_path, capsys, flag, data, match):
  refused(report, flag, _json(tmp_path, 'bad.json', data), match=match)
  assert capsys.readouterr().out == ''  # nothing printed before the refusal


def test_report_files(tmp_path, capsys):
  refused(report, '--eval', tmp_path / 'none.json', match=r'^--eval=.*none.json: no such file$')
  refused(report, '--eval', tmp_path, match=r'^--eval=.*: is a directory; give the JSON file that')
  (tmp_path / 'latin1.json').write_bytes(b'{"ckpt": "caf\xe9"}')
  refused(report, '--benchmark', tmp_path / 'latin1.json', match=r'^--benchmark=.*latin1.json: not UTF-8 text')
  eval_json = _json(tmp_path, 'eval.json', EVAL)
  refused(
    report,
    '--eval',
    eval_json,
    '--benchmark',
    _json(tmp_path, 'b.json', {}),
    match=r'^--benchmark=.*b.json: has no "best" field',
  )
  assert capsys.readouterr().out == ''
  fv = flags.FlagValues()
  report.define_flags(fv)
  fv(
    [
      'prog',
      '--eval',
      str(eval_json),
      '--benchmark',
      str(_json(tmp_path, 'bench.json', {'best': {'1': {**BENCH['best']['1'], 'acceptance_rate': None}, '4': None}})),
    ]
  )
  report.main(cli.Args(['prog'], []), fv)
  out = capsys.readouterr().out
  assert 'self-speculative at batch 1: 1.50x autoregressive (E=2, d=4, acceptance -' in out and '7.40' in out


def _run(tmp_path, name, rows: list[str]):
  run = tmp_path / name
  run.mkdir()
  (run / 'metrics.jsonl').write_text(''.join(rows))
  return run


TRAIN_ROW = '{"step": %d, "ce_last": 3.5, "step_time": 0.1}\n'


def test_report_metrics_lines(tmp_path, capsys):
  bad = _run(tmp_path, 'bad', [TRAIN_ROW % 1, '{"step": 2, "ce_la\n', TRAIN_ROW % 3])
  refused(report, '--curves', bad, match=r'^--curves=.*bad/metrics.jsonl:2: not a JSON row')
  listed = _run(tmp_path, 'listed', [TRAIN_ROW % 1, '[1, 2]\n'])
  refused(report, '--curves', listed, match=r'^--curves=.*listed/metrics.jsonl:2: .*not a JSON object')
  held = _run(tmp_path, 'held', [TRAIN_ROW % 1, '\n', '{"split": "heldout", "step": 1}\n', TRAIN_ROW % 2])
  refused(
    report,
    '--curves',
    held,
    match=r'^--curves=.*held/metrics.jsonl:3: has no "exit_ce" field; not a row that '
    r'layerskip_jax.train writes: remove or fix the line$',
  )
  steps = _run(tmp_path, 'steps', ['{"step": "one"}\n'])
  refused(report, '--curves', steps, match=r'^--curves=.*steps/metrics.jsonl:1: "step" is a string, not an integer')
  empty = _run(tmp_path, 'empty', ['{"split": "heldout", "step": 1, "exit_ce": [3.0, 2.0]}\n'])
  refused(
    report,
    '--curves',
    empty,
    '--plot',
    tmp_path / 'c.png',
    match=r'^--curves=.*empty: metrics.jsonl has no '
    r'training rows yet, so no curve to draw',
  )
  refused(
    report,
    '--curves',
    bad / 'metrics.jsonl',
    match=r'^--curves=.*metrics.jsonl: is a file; give training '
    r'workdirs',
  )
  refused(report, '--curves', tmp_path / 'none', match=r'^--curves=.*none: no such directory$')
  refused(report, '--curves', tmp_path, match=r'^--curves=.*: has no metrics.jsonl; give training workdirs$')
  assert not (tmp_path / 'c.png').exists() and capsys.readouterr().out == ''


def test_report_skips_a_torn_last_line_with_a_warning(tmp_path, capsys):
  torn = _run(tmp_path, 'torn', [TRAIN_ROW % 1, TRAIN_ROW % 2, '{"split": "heldout", "step": 2, "exit_ce": [3.1, 2.'])
  fv = flags.FlagValues()
  report.define_flags(fv)
  fv(['prog', '--curves', str(torn)])
  report.main(cli.Args(['prog'], []), fv)
  captured = capsys.readouterr()
  assert 'torn: 2 steps in 0 s of step time\n' in captured.out and 'held-out' not in captured.out
  assert captured.err.startswith('warning: ') and 'metrics.jsonl:3' in captured.err


def test_report_plot_is_checked_first(tmp_path):
  eval_json = _json(tmp_path, 'eval.json', EVAL)
  run = _run(tmp_path, 'run', [TRAIN_ROW % 1])
  refused(
    report,
    '--curves',
    run,
    '--plot',
    eval_json,
    '--eval',
    eval_json,
    match=r'^--plot=.*eval.json: is the same path as the input --eval=',
  )
  refused(
    report,
    '--curves',
    run,
    '--plot',
    run / 'metrics.jsonl',
    match=r'^--plot=.*metrics.jsonl: is the same path as the input --curves=',
  )
  refused(report, '--curves', run, '--plot', tmp_path / 'curves.gif2', match=r'^--plot=.*: matplotlib cannot write')
  refused(
    report,
    '--eval',
    eval_json,
    '--plot',
    tmp_path / 'c.png',
    match=r'^--plot=.*c.png: draws the training '
    r'curves of --curves',
  )
  assert json.loads(eval_json.read_text()) == EVAL


# --- the command-line contract (subprocesses) -----------------------------------------------------------------


def command(module: str, *argv) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-m', f'layerskip_jax.{module}', *map(str, argv)],
    cwd=ROOT,
    env=host_devices_env(1),
    capture_output=True,
    text=True,
    timeout=120,
  )


def assert_one_error_line(result: subprocess.CompletedProcess, start: str) -> None:
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: {start}'), result.stderr[-2000:]


def test_command_line_benchmark_json_before_the_benchmark(ckpt, prompts, tmp_path, existing):
  blocker = tmp_path / 'blocker'
  blocker.write_text('')
  result = command('benchmark', '--ckpt', ckpt, '--prompts', prompts, '--json', blocker / 'bench.json')
  assert_one_error_line(result, f'--json={blocker}/bench.json: {blocker} is a file, not a directory')
  result = command('benchmark', '--ckpt', ckpt, '--prompts', prompts, '--json', existing, '--exit_layers', '1,9')
  assert_one_error_line(result, '--exit_layers=1,9: 9 is out of range: must be 1..3')


def test_command_line_generate_sampling(ckpt):
  result = command('generate', '--ckpt', ckpt, '--prompt', '1 2 3', '--top_p', '1.5')
  assert_one_error_line(result, '--top_p=1.5: must be in (0, 1] (1 = all tokens)')


def test_command_line_evaluate_seq_len(ckpt, tmp_path):
  result = command('evaluate', '--ckpt', ckpt, '--seq_len', '4096', '--json', tmp_path / 'eval.json')
  assert_one_error_line(result, '--seq_len=4096: must be at most model.max_position_embeddings=256 of --ckpt=')
  assert not (tmp_path / 'eval.json').exists()


def test_command_line_report(tmp_path):
  result = command('report', '--eval', _json(tmp_path, 'eval.json', [EVAL]))
  assert_one_error_line(result, f'--eval={tmp_path}/eval.json: holds a list, not an object')


def test_report_plot_is_written_whole(tmp_path, capsys):
  """The figure goes through a sibling renamed over the target, in the format of its suffix (none: PNG)."""
  held = '{"split": "heldout", "step": 2, "exit_ce": [3.0, null]}\n'
  run = _run(tmp_path, 'run', [TRAIN_ROW % 1, TRAIN_ROW % 2, held])
  out = tmp_path / 'figures'
  out.mkdir()
  for name, magic in (('curves.png', b'\x89PNG'), ('curves', b'\x89PNG'), ('curves.svg', b'<?xml')):
    (out / name).write_text(PREVIOUS)
    fv = flags.FlagValues()
    report.define_flags(fv)
    fv(['prog', '--curves', str(run), '--plot', str(out / name)])
    report.main(cli.Args(['prog'], []), fv)
    assert (out / name).read_bytes().startswith(magic)
  assert sorted(p.name for p in out.iterdir()) == ['curves', 'curves.png', 'curves.svg']
  assert 'held-out CE per exit at step 2: 3.000 -' in capsys.readouterr().out

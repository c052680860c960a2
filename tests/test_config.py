"""Config files, overrides, validation errors (one line naming key and value), presets' parameter counts."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from layerskip_jax import config as config_lib
from layerskip_jax.config import ConfigError
from layerskip_jax.model import ModelConfig, count_params
from layerskip_jax.model.model_config import REMAT_POLICIES
from layerskip_jax.objective import ObjectiveConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent

PUBLISHED_PARAMS = {
  'llama2_7b': 6_738_415_616,
  'llama2_13b': 13_015_864_320,
  'llama3_8b': 8_030_261_248,
  'llama3_2_1b': 1_235_814_400,
  'codellama_7b': 6_738_546_688,
}


@pytest.mark.parametrize('preset', sorted(PUBLISHED_PARAMS))
def test_published_presets_have_published_parameter_counts(preset):
  config = config_lib.load(preset)
  assert count_params(ModelConfig.from_config(config.model)) == PUBLISHED_PARAMS[preset]


def test_other_presets():
  assert 1.4e9 < count_params(ModelConfig.from_config(config_lib.load('llama_1_5b').model)) < 1.6e9
  assert config_lib.load('llama_1_5b').model.num_hidden_layers == 24
  tiny = config_lib.load('configs/tiny.py')
  assert count_params(ModelConfig.from_config(tiny.model)) < 10e6
  ls = tiny.layerskip
  assert (ls.p_max > 0, ls.depth_schedule, ls.time_schedule, ls.curriculum) == (True, 'exp', 'exp', 'rotational')
  # the shared head is a small share of the weights, so early-exit drafts are cheap (spec section 2.3)
  assert tiny.model.vocab_size * tiny.model.hidden_size / count_params(ModelConfig.from_config(tiny.model)) < 0.05
  llama32 = config_lib.load('llama3_2_1b').model
  assert llama32.tie_word_embeddings and llama32.rope_scaling.rope_type == 'llama3'


def test_every_base_key_has_a_comment():
  for line in (ROOT / 'configs' / 'base.py').read_text().splitlines():
    if re.match(r'\s+\w+\.\w+(\.\w+)? = ', line) and 'ConfigDict()' not in line:
      assert '#' in line, f'configs/base.py: key without a comment: {line.strip()}'


def test_allowed_values_come_from_the_fields_they_constrain():
  """The model and layerskip sections' choices and ranges are read from their dataclasses' fields (one place)."""
  choices, ranges = config_lib.field_rules()
  assert choices['model.remat_policy'] == tuple(REMAT_POLICIES)  # the policies themselves: no second list
  assert choices['layerskip.curriculum'] == ('rotational', 'gradual', 'none')
  assert ranges['layerskip.exit_token_fraction'] == (0.0, 1.0, True)
  assert ranges['model.rope_scaling.factor'] == (1.0, None, False)
  with pytest.raises(
    ConfigError,
    match=r"^model.remat_policy='some': must be one of none, full, save_dots, "
    r"save_proj$",
  ):
    config_lib.load('tiny', ['model.remat_policy=some'])


def test_a_section_and_its_dataclass_that_disagree_are_one_line_naming_the_key():
  config = config_lib.load('tiny')
  model = config.model.to_dict()
  model['sliding_window'] = 64  # a key added to configs/base.py without its field
  with pytest.raises(
    ConfigError,
    match=r'^model.sliding_window: not a field of ModelConfig \(model/model_config.py\); '
    r'add the field there, or remove the key$',
  ):
    ModelConfig.from_config(config_lib.config_dict.ConfigDict(model))
  layerskip = config.layerskip.to_dict()
  del layerskip['p_max']  # not required (it has a default): the dataclass's default applies
  config.unlock()
  config.layerskip = config_lib.config_dict.ConfigDict(layerskip)
  assert ObjectiveConfig.from_config(config).p_max == ObjectiveConfig(total_steps=1).p_max
  config.layerskip.warmup_exits = 3
  with pytest.raises(
    ConfigError,
    match=r'^layerskip.warmup_exits: not a field of ObjectiveConfig '
    r'\(objective/objective_config.py\)',
  ):
    ObjectiveConfig.from_config(config)
  del model['sliding_window'], model['vocab_size']  # a required field (no default) missing from the section
  with pytest.raises(
    ConfigError,
    match=r'^model.vocab_size: a required field of ModelConfig missing from the '
    r'config; add it to configs/base.py$',
  ):
    ModelConfig.from_config(config_lib.config_dict.ConfigDict(model))
  model = config_lib.load('tiny').model.to_dict()
  model['rope_scaling']['beta'] = 2.0  # a nested section is checked against its own dataclass
  with pytest.raises(ConfigError, match=r'^model.rope_scaling.beta: not a field of RopeScaling'):
    ModelConfig.from_config(config_lib.config_dict.ConfigDict(model))


def test_overrides_are_typed():
  config = config_lib.load(
    'tiny',
    [
      '--config.model.num_hidden_layers=4',
      '--config.model.rope_theta=500000',
      'model.tie_word_embeddings=true',
      '--config.model.dtype=bfloat16',
    ],
  )
  assert config.model.num_hidden_layers == 4
  assert config.model.rope_theta == 500000.0 and isinstance(config.model.rope_theta, float)
  assert config.model.tie_word_embeddings is True and config.model.dtype == 'bfloat16'
  config = config_lib.load('tiny', {'layerskip.p_max': 0, 'train.steps': '20'})
  assert config.layerskip.p_max == 0.0 and config.train.steps == 20


def test_json_round_trip(tmp_path):
  config = config_lib.load('llama3_2_1b', {'train.steps': 7})
  path = config_lib.save(config, tmp_path)
  assert path.name == 'layerskip_config.json'
  assert config_lib.from_json(path) == config
  data = json.loads(path.read_text())
  data['model']['hidden_size'] = 'wide'
  path.write_text(json.dumps(data))
  with pytest.raises(ConfigError, match=r"model.hidden_size='wide': expected an integer"):
    config_lib.from_json(path)


BAD = [
  ({'model.hiden_size': 3}, r'^model\.hiden_size: unknown config key; did you mean model\.hidden_size\?$'),
  ({'nonsense': 1}, r'^nonsense: unknown config key'),
  ({'model.hidden_size': 'abc'}, r"^model\.hidden_size='abc': expected an integer$"),
  ({'model.hidden_size': '1.5'}, r"^model\.hidden_size='1\.5': expected an integer$"),
  ({'model.tie_word_embeddings': 'maybe'}, r"^model\.tie_word_embeddings='maybe': expected true or false$"),
  ({'model': 3}, r'^model: is a section, not a key'),
  ({'model.num_attention_heads': 5}, r'^model\.num_attention_heads=5: must divide model\.hidden_size=256$'),
  ({'model.num_key_value_heads': 3}, r'^model\.num_key_value_heads=3: must divide model\.num_attention_heads=4$'),
  ({'model.num_hidden_layers': 1}, r'^model\.num_hidden_layers=1: must be >= 2$'),
  ({'model.vocab_size': 0}, r'^model\.vocab_size=0: must be >= 1$'),
  ({'model.head_dim': 33}, r'^model\.head_dim=33: must be even'),
  ({'model.dtype': 'fp8'}, r"^model\.dtype='fp8': must be one of float32, bfloat16, float16$"),
  ({'model.remat_policy': 'some'}, r"^model\.remat_policy='some': must be one of none, full, save_dots, save_proj$"),
  (
    {'model.attention_impl': 'flash'},
    r"^model\.attention_impl='flash': must be one of auto, blockwise, xla, cudnn, pallas_gpu, splash$",
  ),
  ({'model.attention_impl': 'cudnn'}, r"^model\.attention_impl='cudnn': cuDNN's fused attention takes bfloat16"),
  ({'model.attention_block': 8}, r'^model\.attention_block=8: must be >= 16$'),
  ({'model.rope_scaling.rope_type': 'yarn'}, r"^model\.rope_scaling\.rope_type='yarn': must be one of"),
  ({'model.rms_norm_eps': 0}, r'^model\.rms_norm_eps=0\.0: must be > 0\.0$'),
  ({'model.scan_unroll': 9}, r'^model\.scan_unroll=9: must be at most model\.num_hidden_layers=8$'),
  ({'layerskip.p_max': 1.5}, r'^layerskip\.p_max=1\.5: must be >= 0\.0 and <= 1\.0$'),
  ({'layerskip.depth_schedule': 'cubic'}, r"^layerskip\.depth_schedule='cubic': must be one of exp, uniform"),
  ({'layerskip.time_schedule': 'linear'}, r"^layerskip\.time_schedule='linear': must be one of constant, exp$"),
  ({'layerskip.dropout_mode': 'x'}, r"^layerskip\.dropout_mode='x': must be one of per_sample, per_batch$"),
  ({'layerskip.curriculum': 'x'}, r"^layerskip\.curriculum='x': must be one of rotational, gradual, none$"),
  ({'layerskip.rotation_period': 0}, r'^layerskip\.rotation_period=0: must be >= 1$'),
  ({'layerskip.exit_token_fraction': 0.0}, r'^layerskip\.exit_token_fraction=0\.0: must be > 0\.0 and <= 1\.0$'),
  ({'train.steps': 0}, r'^train\.steps=0: must be >= 1$'),
  (
    {'train.batch_size': 8, 'train.grad_accum_steps': 3},
    r'^train\.grad_accum_steps=3: must divide train\.batch_size=8$',
  ),
  ({'train.seq_len': 4096}, r'^train\.seq_len=4096: must be at most model\.max_position_embeddings=2048$'),
  ({'mesh.fsdp': 0}, r'^mesh\.fsdp=0: must be a positive size or -1'),
  ({'mesh.data': -1}, r'^mesh\.fsdp=-1: only one of mesh\.data, mesh\.fsdp may be -1$'),
  ({'mesh.tensor': 4}, r'^mesh\.tensor=4: tensor parallelism must divide model\.num_key_value_heads=2$'),
]


@pytest.mark.parametrize('overrides,message', BAD, ids=[next(iter(o)) for o, _ in BAD])
def test_config_errors_name_the_key_and_value(overrides, message):
  with pytest.raises(ConfigError) as info:
    config_lib.load('tiny', overrides)
  text = str(info.value)
  assert '\n' not in text
  assert re.search(message, text), text


def test_bad_config_file(tmp_path):
  with pytest.raises(ConfigError, match='no such config file; give a path or one of the presets: .*tiny'):
    config_lib.load('no_such_preset')
  bad = tmp_path / 'bad.py'
  bad.write_text(
    'import runpy, pathlib\n'
    f'_b = runpy.run_path({str(ROOT / "configs" / "base.py")!r})\n'
    'def get_config():\n  c = _b["get_config"]()\n  c.model.hiden = 3\n  return c\n'
  )
  with pytest.raises(ConfigError, match='bad.py: .*hiden'):
    config_lib.load(bad)


@pytest.mark.parametrize(
  'args,message',
  [
    (['--config.model.num_key_value_heads=3'], 'error: model.num_key_value_heads=3: must divide'),
    (['--bogus_flag=1'], "error: Unknown command line flag 'bogus_flag'"),
    (['--config=configs/tiny.py', '--config.model.hidden_size'], 'needs a value'),
  ],
)
def test_command_line_errors_are_one_line_with_exit_status_2(args, message):
  result = subprocess.run(
    [sys.executable, '-m', 'layerskip_jax.print_config', *args], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0 and message in result.stderr, result.stderr
  assert 'Traceback' not in result.stderr


def test_print_config_prints_resolved_config_and_parameter_count():
  result = subprocess.run(
    [sys.executable, '-m', 'layerskip_jax.print_config', '--config', 'llama3_8b'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert 'parameters: 8,030,261,248' in result.stdout
  assert json.loads(result.stdout[: result.stdout.rindex('}') + 1])['model']['num_key_value_heads'] == 8


def test_an_attention_kernel_of_another_backend_is_refused_before_anything_is_written(tmp_path):
  workdir = tmp_path / 'run'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'layerskip_jax.train',
      '--config',
      'tiny',
      '--workdir',
      str(workdir),
      '--config.model.attention_impl=splash',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert result.returncode == 2 and result.stderr.strip().count('\n') == 0, result.stderr
  assert result.stderr.startswith("error: model.attention_impl='splash' needs a TPU, but the backend is cpu")
  assert not workdir.exists()

"""Loading, overriding, validating and saving configs (ml_collections; every key is documented in configs/base.py).

    config = load('configs/tiny.py', ['--config.model.num_hidden_layers=4'])   # or load('tiny', {...})

`load` returns a validated, locked ConfigDict. Every problem is a `ConfigError` whose message is one line naming the
key, the bad value and what is allowed; command lines print it and exit with status 2.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import pathlib
import runpy
from collections.abc import Iterable, Mapping
from typing import Any

from ml_collections import config_dict

from layerskip_jax.errors import UsageError, one_line

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs'
CONFIG_FILE_NAME = 'layerskip_config.json'

DTYPES = ('float32', 'bfloat16', 'float16')


# --- constraints beside the fields they constrain ----------------------------------------------------------------
# The `model` and `layerskip` sections are described by dataclasses (ModelConfig, ObjectiveConfig): each field
# carries its allowed values in its metadata, through choice() and bounded() below, and validate() reads them from
# there. Keys of the other sections (train, data, checkpoint, ...) have no dataclass: their ranges are in _RANGES.


def choice(default: Any, allowed: Iterable) -> Any:
  """A dataclass field of a config section whose value must be one of `allowed` (validate() checks it)."""
  return dataclasses.field(default=default, metadata={'choices': tuple(allowed)})


def bounded(
  default: Any = dataclasses.MISSING, *, low: float, high: float | None = None, low_excluded: bool = False
) -> Any:
  """A dataclass field of a config section whose value must lie in [low, high] ((low, high] when low_excluded;
  no upper bound when high is None). No default: a required field."""
  return dataclasses.field(default=default, metadata={'range': (low, high, low_excluded)})


def section_schemas() -> dict[str, type]:
  """Config section -> the dataclass that describes it. Imported when called: those modules import this one (for
  choice and bounded), and a config is validated long after both are loaded."""
  from layerskip_jax.model.model_config import ModelConfig, RopeScaling  # the schema, see above
  from layerskip_jax.objective.objective_config import ObjectiveConfig

  return {'model': ModelConfig, 'model.rope_scaling': RopeScaling, 'layerskip': ObjectiveConfig}


def section_kwargs(section: config_dict.ConfigDict, schema: type, name: str) -> dict[str, Any]:
  """The keyword arguments of `schema` from a config section, whose keys must be its fields (nested sections
  become dicts). A mismatch is a one-line ConfigError naming the key, not a TypeError from the constructor."""
  fields = {f.name for f in dataclasses.fields(schema) if not f.metadata.get('outside_section')}
  values = section.to_dict()
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ConfigError(
      f'{name}.{unknown[0]}: not a field of {schema.__name__} ({_schema_file(schema)}); add the '
      'field there, or remove the key'
    )
  missing = sorted(f for f in fields - set(values) if _required(schema, f))
  if missing:
    raise ConfigError(
      f'{name}.{missing[0]}: a required field of {schema.__name__} missing from the config; add it to configs/base.py'
    )
  return values


def _required(schema: type, name: str) -> bool:
  f = next(f for f in dataclasses.fields(schema) if f.name == name)
  return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _schema_file(schema: type) -> str:
  return schema.__module__.removeprefix('layerskip_jax.').replace('.', '/') + '.py'


def field_rules() -> tuple[dict[str, tuple], dict[str, tuple]]:
  """(choices, ranges) of every dataclass-described key, e.g. {'model.dtype': DTYPES}, read from the fields."""
  choices, ranges = {}, {}
  for section, schema in section_schemas().items():
    for f in dataclasses.fields(schema):
      if 'choices' in f.metadata:
        choices[f'{section}.{f.name}'] = f.metadata['choices']
      if 'range' in f.metadata:
        ranges[f'{section}.{f.name}'] = f.metadata['range']
  return choices, ranges


# Keys of the sections without a dataclass: (lowest allowed, highest allowed or None, whether the lowest is excluded)
_RANGES = {
  'train.steps': (1, None, False),
  'train.batch_size': (1, None, False),
  'train.grad_accum_steps': (1, None, False),
  'train.seq_len': (2, None, False),
  'train.seed': (0, None, False),
  'train.learning_rate': (0.0, None, True),
  'train.warmup_steps': (0, None, False),
  'train.min_lr_ratio': (0.0, 1.0, False),
  'train.weight_decay': (0.0, None, False),
  'train.adam_b1': (0.0, 1.0, False),
  'train.adam_b2': (0.0, 1.0, False),
  'train.adam_eps': (0.0, None, True),
  'train.grad_clip_norm': (0.0, None, False),
  'data.num_workers': (0, None, False),
  'data.prefetch': (0, None, False),
  'train.log_every': (1, None, False),
  'train.eval_every': (0, None, False),
  'train.eval_batches': (1, None, False),
  'train.peak_tflops': (0.0, None, True),
  'checkpoint.every_steps': (1, None, False),
  'checkpoint.keep': (1, None, False),
  'checkpoint.preemption_check_every': (1, None, False),
}

MESH_AXES = ('data', 'fsdp', 'tensor')


class ConfigError(UsageError):
  """A config that cannot be used. The message is one line: key, bad value, what is allowed."""


def base_config() -> config_dict.ConfigDict:
  return _run_config_file(CONFIGS_DIR / 'base.py')


def resolve_config_path(path_or_name: str) -> pathlib.Path:
  """A path to a config file, or a preset's name ('tiny' means configs/tiny.py)."""
  path = pathlib.Path(path_or_name).expanduser()
  if path.is_file():
    return path
  preset = CONFIGS_DIR / f'{path_or_name}.py'
  if preset.is_file():
    return preset
  known = ', '.join(sorted(p.stem for p in CONFIGS_DIR.glob('*.py')))
  raise ConfigError(f'--config={path_or_name}: no such config file; give a path or one of the presets: {known}')


def _run_config_file(path: pathlib.Path) -> config_dict.ConfigDict:
  try:
    module = runpy.run_path(str(path))
    config = module['get_config']()
  except KeyError:
    raise ConfigError(f'--config={path}: the file defines no get_config() function') from None
  except (AttributeError, TypeError, ValueError) as e:  # a preset setting an unknown key or a wrongly typed value
    raise ConfigError(f'--config={path}: {one_line(e)}') from None
  if not isinstance(config, config_dict.ConfigDict):
    raise ConfigError(f'--config={path}: get_config() returned {type(config).__name__}, expected a ConfigDict')
  return config


def load(path_or_name: str | pathlib.Path, overrides: Mapping[str, Any] | Iterable[str] = ()) -> config_dict.ConfigDict:
  """Loads a config file (or preset name), applies overrides, validates, and returns a locked ConfigDict.

  `overrides` is a mapping {'model.hidden_size': 128} of typed or string values, or command-line strings
  such as '--config.model.hidden_size=128' (the '--config.' prefix is optional).
  """
  config = _run_config_file(resolve_config_path(str(path_or_name)))
  apply_overrides(config, overrides)
  validate(config)
  return config


def split_override_args(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.key=value` arguments (ours) from the other flags (absl's)."""
  rest, overrides = [], []
  for arg in argv:
    (overrides if arg.startswith('--config.') else rest).append(arg)
  return rest, overrides


def apply_overrides(config: config_dict.ConfigDict, overrides: Mapping[str, Any] | Iterable[str]) -> None:
  if isinstance(overrides, Mapping):
    items = list(overrides.items())
  else:
    items = []
    for arg in overrides:
      text = arg[2:] if arg.startswith('--') else arg
      text = text[len('config.') :] if text.startswith('config.') else text
      if '=' not in text:
        raise ConfigError(f'{arg}: a config override needs a value, as --config.{text}=VALUE')
      key, value = text.split('=', 1)
      items.append((key, value))
  for key, value in items:
    _set(config, key, value)


def _lookup_parent(config: config_dict.ConfigDict, key: str) -> tuple[config_dict.ConfigDict, str]:
  parts = key.split('.')
  node = config
  for i, part in enumerate(parts):
    if not isinstance(node, config_dict.ConfigDict) or part not in node:
      raise ConfigError(f'{key}: unknown config key{_suggestion(config, key)}')
    if i < len(parts) - 1:
      node = node[part]
  return node, parts[-1]


def _set(config: config_dict.ConfigDict, key: str, value: Any) -> None:
  parent, name = _lookup_parent(config, key)
  current = parent[name]
  if isinstance(current, config_dict.ConfigDict):
    raise ConfigError(f'{key}: is a section, not a key; set one of its keys: {", ".join(sorted(current.keys()))}')
  parent[name] = _coerce(key, value, type(current))


def _coerce(key: str, value: Any, expected: type) -> Any:
  """Converts a command-line string (or a JSON value) to the type the key has in configs/base.py."""
  what = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string'}.get(expected, expected.__name__)
  original = value
  if isinstance(value, str) and expected is not str:
    text = value.strip()
    if expected is bool:
      if text.lower() in ('true', '1', 'yes'):
        return True
      if text.lower() in ('false', '0', 'no'):
        return False
      raise ConfigError(f'{key}={value!r}: expected {what}')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise ConfigError(f'{key}={value!r}: expected {what}') from None
  if expected is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if expected is int and isinstance(value, float) and value.is_integer():
    return int(value)
  if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
    raise ConfigError(f'{key}={original!r}: expected {what}')
  return value


def _suggestion(config: config_dict.ConfigDict, key: str) -> str:
  close = difflib.get_close_matches(key, list(_flat_keys(config)), n=1, cutoff=0.6)
  return f'; did you mean {close[0]}?' if close else '; see configs/base.py for every key'


def _flat_keys(config: config_dict.ConfigDict, prefix: str = '') -> Iterable[str]:
  for k, v in config.items():
    if isinstance(v, config_dict.ConfigDict):
      yield from _flat_keys(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}'


def _get(config: config_dict.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def validate(config: config_dict.ConfigDict) -> None:
  """Checks every key's type against configs/base.py and every value and relation; raises ConfigError."""
  base = base_config()
  for key in _flat_keys(base):
    try:
      value = _get(config, key)
    except (KeyError, AttributeError):
      raise ConfigError(f'{key}: missing from the config; start presets from configs/base.py') from None
    _coerce(key, value, type(_get(base, key)))
  for key in _flat_keys(config):
    try:
      _get(base, key)
    except (KeyError, AttributeError):
      raise ConfigError(f'{key}: unknown config key{_suggestion(base, key)}') from None
  for section, schema in section_schemas().items():
    section_kwargs(_get(base, section), schema, section)  # base.py and the dataclass agree on the keys
  choices, ranges = field_rules()
  for key, allowed in choices.items():
    value = _get(config, key)
    if value not in allowed:
      raise ConfigError(f'{key}={value!r}: must be one of {", ".join(allowed)}')
  for key, (low, high, low_excluded) in {**ranges, **_RANGES}.items():
    value = _get(config, key)
    if value < low or (low_excluded and value == low) or (high is not None and value > high):
      bound = f'> {low}' if low_excluded else f'>= {low}'
      if high is not None:
        bound += f' and <= {high}'
      raise ConfigError(f'{key}={value}: must be {bound}')
  _validate_relations(config)


def _validate_relations(config: config_dict.ConfigDict) -> None:
  m, t = config.model, config.train
  if m.hidden_size % m.num_attention_heads:
    raise ConfigError(
      f'model.num_attention_heads={m.num_attention_heads}: must divide model.hidden_size={m.hidden_size}'
    )
  if m.num_attention_heads % m.num_key_value_heads:
    raise ConfigError(
      f'model.num_key_value_heads={m.num_key_value_heads}: must divide '
      f'model.num_attention_heads={m.num_attention_heads}'
    )
  head_dim = m.head_dim or m.hidden_size // m.num_attention_heads
  if head_dim % 2:
    raise ConfigError(f'model.head_dim={head_dim}: must be even (rotary embeddings rotate pairs of channels)')
  rs = m.rope_scaling
  if rs.rope_type == 'llama3' and rs.high_freq_factor <= rs.low_freq_factor:
    raise ConfigError(
      f'model.rope_scaling.high_freq_factor={rs.high_freq_factor}: must exceed '
      f'model.rope_scaling.low_freq_factor={rs.low_freq_factor}'
    )
  if m.attention_impl == 'cudnn' and m.dtype == 'float32':
    raise ConfigError(
      "model.attention_impl='cudnn': cuDNN's fused attention takes bfloat16 or float16 "
      "(model.dtype='float32'); use model.dtype=bfloat16, or model.attention_impl=auto"
    )
  if config.layerskip.draft_exit >= m.num_hidden_layers:
    raise ConfigError(
      f'layerskip.draft_exit={config.layerskip.draft_exit}: must be an early exit, 1..'
      f'{m.num_hidden_layers - 1} (the last exit is always supervised), or 0 for none'
    )
  if m.scan_unroll > m.num_hidden_layers:
    raise ConfigError(
      f'model.scan_unroll={m.scan_unroll}: must be at most model.num_hidden_layers={m.num_hidden_layers}'
    )
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f'train.grad_accum_steps={t.grad_accum_steps}: must divide train.batch_size={t.batch_size}')
  parse_profile_steps(config.logging.profile_steps)
  if t.seq_len > m.max_position_embeddings:
    raise ConfigError(
      f'train.seq_len={t.seq_len}: must be at most model.max_position_embeddings={m.max_position_embeddings}'
    )
  for axis in MESH_AXES:
    for key in (axis, f'dcn_{axis}'):
      value = config.mesh[key]
      if value == 0 or value < -1:
        raise ConfigError(f'mesh.{key}={value}: must be a positive size or -1 (fill the remaining devices)')
  for prefix in ('', 'dcn_'):
    fills = [f'mesh.{prefix}{a}' for a in MESH_AXES if config.mesh[prefix + a] == -1]
    if len(fills) > 1:
      raise ConfigError(f'{fills[1]}=-1: only one of {", ".join(fills)} may be -1')
  tensor = config.mesh.tensor * config.mesh.dcn_tensor
  if tensor > 0 and m.num_key_value_heads % tensor:
    raise ConfigError(
      f'mesh.tensor={config.mesh.tensor}: tensor parallelism must divide '
      f'model.num_key_value_heads={m.num_key_value_heads}'
    )


def parse_profile_steps(value: str) -> tuple[int, int] | None:
  """logging.profile_steps: '' -> None (no trace), 'FIRST,LAST' -> (FIRST, LAST), 1 <= FIRST <= LAST."""
  if not value.strip():
    return None
  parts = value.split(',')
  try:
    first, last = (int(p) for p in parts) if len(parts) == 2 else (0, -1)
  except ValueError:
    first, last = 0, -1
  if not 1 <= first <= last:
    raise ConfigError(
      f"logging.profile_steps={value!r}: must be '' (off) or 'FIRST,LAST' with 1 <= FIRST <= LAST, "
      "e.g. '10,15' (a profiler trace of steps 10 to 15)"
    )
  return first, last


def to_json(config: config_dict.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def save(config: config_dict.ConfigDict, directory: str | pathlib.Path) -> pathlib.Path:
  """Writes DIR/layerskip_config.json (interfaces.md) atomically."""
  path = pathlib.Path(directory) / CONFIG_FILE_NAME
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.json.tmp')
  tmp.write_text(to_json(config) + '\n')
  tmp.replace(path)
  return path


def from_json(path: str | pathlib.Path) -> config_dict.ConfigDict:
  """Reads a saved config onto base.py's defaults (keys added since it was written keep their defaults)."""
  path = pathlib.Path(path)
  try:
    data = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f'{path}: not a readable layerskip config ({one_line(e)}); restore it from a copy') from None
  if not isinstance(data, dict):
    raise ConfigError(f'{path}: a JSON {type(data).__name__}, not a layerskip config object; restore it from a copy')
  config = base_config()
  try:
    apply_overrides(config, dict(_flatten(data)))
    validate(config)
  except ConfigError as e:
    raise ConfigError(f'{path}: {e}') from None
  return config


def _flatten(data: Mapping[str, Any], prefix: str = '') -> Iterable[tuple[str, Any]]:
  for k, v in data.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}', v

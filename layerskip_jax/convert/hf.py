"""Hugging Face Llama safetensors <-> layerskip_jax checkpoint directories, streamed tensor by tensor.

Our kernels are Hugging Face's transposed ([in, out] vs [out, in]) and the decoder layers are stacked on a leading
axis; rotary embeddings use the same rotate_half convention, so no q/k permutation is needed.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
from flax import nnx

from layerskip_jax import checkpoint_dir, outputs
from layerskip_jax import config as config_lib
from layerskip_jax.data import tokenizer as tokenizer_lib
from layerskip_jax.errors import UsageError
from layerskip_jax.model import ModelConfig, abstract

# (path in our parameter tree, Hugging Face tensor name, transposed?). Per-layer names take the layer index.
GLOBAL_TENSORS = (
  (('embed_tokens',), 'model.embed_tokens.weight', False),
  (('norm', 'scale'), 'model.norm.weight', False),
  (('lm_head',), 'lm_head.weight', True),  # absent with tied embeddings
)
LAYER_TENSORS = (
  (('layers', 'input_layernorm', 'scale'), 'model.layers.{}.input_layernorm.weight', False),
  (('layers', 'self_attn', 'q_proj'), 'model.layers.{}.self_attn.q_proj.weight', True),
  (('layers', 'self_attn', 'k_proj'), 'model.layers.{}.self_attn.k_proj.weight', True),
  (('layers', 'self_attn', 'v_proj'), 'model.layers.{}.self_attn.v_proj.weight', True),
  (('layers', 'self_attn', 'o_proj'), 'model.layers.{}.self_attn.o_proj.weight', True),
  (('layers', 'post_attention_layernorm', 'scale'), 'model.layers.{}.post_attention_layernorm.weight', False),
  (('layers', 'mlp', 'gate_proj'), 'model.layers.{}.mlp.gate_proj.weight', True),
  (('layers', 'mlp', 'up_proj'), 'model.layers.{}.mlp.up_proj.weight', True),
  (('layers', 'mlp', 'down_proj'), 'model.layers.{}.mlp.down_proj.weight', True),
)
IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)  # buffers some older checkpoints saved
SUPPORTED_ROPE = ('default', 'linear', 'llama3')
TOKENIZER_SIDE_FILES = ('tokenizer_config.json', 'generation_config.json', 'special_tokens_map.json')


# --- config.json ---------------------------------------------------------------------------------------------


def _unsupported(hf: dict[str, Any]) -> str | None:
  model_type = hf.get('model_type', 'llama')
  if hf.get('sliding_window') not in (None, 0) or model_type == 'mistral':
    return 'sliding-window attention'
  if any(hf.get(k) for k in ('num_local_experts', 'num_experts', 'n_routed_experts')) or 'moe' in model_type:
    return 'mixture-of-experts layers'
  if hf.get('attention_bias') or hf.get('mlp_bias'):
    return 'bias terms in attention or MLP projections'
  if hf.get('hidden_act', 'silu') != 'silu':
    return f'hidden_act={hf["hidden_act"]!r} (only silu / SwiGLU)'
  if model_type != 'llama':
    return f'model_type {model_type!r} (only llama-architecture checkpoints)'
  return None


def model_overrides_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """`model.*` config overrides from a Hugging Face config.json, in either layout: top-level rope_theta and
  rope_scaling (published checkpoints), or rope_parameters (current transformers)."""
  problem = _unsupported(hf)
  if problem:
    raise UsageError(f'config.json: unsupported architecture: {problem}; layerskip_jax converts Llama models')
  rope = dict(hf.get('rope_parameters') or {})
  scaling = dict(hf.get('rope_scaling') or rope)
  rope_type = scaling.get('rope_type', scaling.get('type', 'default'))
  if rope_type not in SUPPORTED_ROPE:
    raise UsageError(
      f'config.json: rope scaling type {rope_type!r} is not supported; use one of {", ".join(SUPPORTED_ROPE)}'
    )
  heads = hf['num_attention_heads']
  out = {
    'vocab_size': hf['vocab_size'],
    'hidden_size': hf['hidden_size'],
    'intermediate_size': hf['intermediate_size'],
    'num_hidden_layers': hf['num_hidden_layers'],
    'num_attention_heads': heads,
    'num_key_value_heads': hf.get('num_key_value_heads') or heads,
    'head_dim': hf.get('head_dim') or hf['hidden_size'] // heads,
    'rope_theta': float(rope.get('rope_theta', hf.get('rope_theta', 10000.0))),
    'rms_norm_eps': float(hf.get('rms_norm_eps', 1e-6)),
    'max_position_embeddings': hf.get('max_position_embeddings', 2048),
    'tie_word_embeddings': bool(hf.get('tie_word_embeddings', False)),
    'initializer_range': float(hf.get('initializer_range', 0.02)),
    'rope_scaling.rope_type': rope_type,
  }
  if rope_type in ('linear', 'llama3'):
    out['rope_scaling.factor'] = float(scaling['factor'])
  if rope_type == 'llama3':
    for key in ('low_freq_factor', 'high_freq_factor'):
      out[f'rope_scaling.{key}'] = float(scaling[key])
    out['rope_scaling.original_max_position_embeddings'] = int(scaling['original_max_position_embeddings'])
  return {f'model.{k}': v for k, v in out.items()}


def hf_config_from_model(model: ModelConfig, bos_id: int | None, eos_ids: tuple[int, ...]) -> dict[str, Any]:
  rs = model.rope_scaling
  scaling = None
  if rs.rope_type == 'linear':
    scaling = {'rope_type': 'linear', 'factor': rs.factor}
  elif rs.rope_type == 'llama3':
    scaling = {
      'rope_type': 'llama3',
      'factor': rs.factor,
      'low_freq_factor': rs.low_freq_factor,
      'high_freq_factor': rs.high_freq_factor,
      'original_max_position_embeddings': rs.original_max_position_embeddings,
    }
  dtype = model.param_dtype
  return {
    'architectures': ['LlamaForCausalLM'],
    'model_type': 'llama',
    'vocab_size': model.vocab_size,
    'hidden_size': model.hidden_size,
    'intermediate_size': model.intermediate_size,
    'num_hidden_layers': model.num_hidden_layers,
    'num_attention_heads': model.num_attention_heads,
    'num_key_value_heads': model.num_key_value_heads,
    'head_dim': model.head_dim,
    'hidden_act': 'silu',
    'max_position_embeddings': model.max_position_embeddings,
    'rms_norm_eps': model.rms_norm_eps,
    'rope_theta': model.rope_theta,
    'rope_scaling': scaling,
    'tie_word_embeddings': model.tie_word_embeddings,
    'attention_bias': False,
    'mlp_bias': False,
    'initializer_range': model.initializer_range,
    'dtype': dtype,
    'torch_dtype': dtype,
    'bos_token_id': bos_id,
    'eos_token_id': (list(eos_ids) if len(eos_ids) > 1 else eos_ids[0]) if eos_ids else None,
  }


# --- import ----------------------------------------------------------------------------------------------------

# safetensors dtype name -> numpy dtype
_SAFETENSORS_DTYPES = {
  'F64': np.float64,
  'F32': np.float32,
  'F16': np.float16,
  'BF16': ml_dtypes.bfloat16,
  'I64': np.int64,
  'I32': np.int32,
  'I16': np.int16,
  'I8': np.int8,
  'U8': np.uint8,
  'BOOL': np.bool_,
}


_SAFETENSORS_NAMES = {np.dtype(v).name: k for k, v in _SAFETENSORS_DTYPES.items()}


def _write_safetensors(path: pathlib.Path, tensors: list[tuple[str, np.dtype, tuple[int, ...], Any]]) -> None:
  """Writes a safetensors file tensor by tensor: `tensors` holds (name, dtype, shape, thunk returning the array),
  so only one tensor is in memory at a time (safetensors' own save_file needs them all at once)."""
  header, offset = {'__metadata__': {'format': 'pt'}}, 0
  for name, dtype, shape, _ in tensors:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {
      'dtype': _SAFETENSORS_NAMES[np.dtype(dtype).name],
      'shape': list(shape),
      'data_offsets': [offset, offset + nbytes],
    }
    offset += nbytes
  encoded = json.dumps(header, separators=(',', ':')).encode()
  encoded += b' ' * (-len(encoded) % 8)
  with open(path, 'wb') as f:
    f.write(len(encoded).to_bytes(8, 'little'))
    f.write(encoded)
    for name, dtype, shape, thunk in tensors:
      array = np.ascontiguousarray(thunk(), dtype=dtype)
      assert array.shape == tuple(shape), (name, array.shape, shape)
      f.write(array.tobytes())


class _SafetensorsReader:
  """Reads tensors one at a time from model.safetensors or the shards named by model.safetensors.index.json.

  Plain file reads rather than a memory map: mapped pages of a multi-GB file would stay resident and double the
  import's peak memory.
  """

  def __init__(self, hf_dir: pathlib.Path):
    index, single = hf_dir / 'model.safetensors.index.json', hf_dir / 'model.safetensors'
    if index.is_file():
      try:
        files = sorted(set(json.loads(index.read_text())['weight_map'].values()))
      except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise UsageError(
          f'{index}: not a safetensors index (a JSON object with a weight_map); download or copy it again'
        ) from None
    elif single.is_file():
      files = [single.name]
    else:
      raise UsageError(f'--hf_dir={hf_dir}: no model.safetensors or model.safetensors.index.json')
    self._entries = {}  # name -> (path, dtype, shape, byte offset)
    for name in files:
      path = hf_dir / name
      if not path.is_file():
        raise UsageError(f'--hf_dir={hf_dir}: shard {name} named by the index is missing')
      self._read_header(path)

  def _read_header(self, path: pathlib.Path) -> None:
    """Reads a safetensors header and checks it against the file: a truncated or damaged file (a copy cut short,
    a download in progress) is refused here, naming the file, not found later as a reshape error."""
    size = path.stat().st_size
    damaged = f'{path}: not a complete safetensors file'
    with open(path, 'rb') as f:
      prefix = f.read(8)
      header_len = int.from_bytes(prefix, 'little') if len(prefix) == 8 else -1
      if not 0 < header_len <= size - 8:
        raise UsageError(f'{damaged} ({size} bytes, header length {header_len}); download or copy it again')
      try:
        header = json.loads(f.read(header_len))
      except (UnicodeDecodeError, json.JSONDecodeError):
        raise UsageError(f'{damaged} (its header is not JSON); download or copy it again') from None
    if not isinstance(header, dict):
      raise UsageError(f'{damaged} (its header is not a JSON object); download or copy it again')
    for key, info in header.items():
      if key == '__metadata__':
        continue
      try:
        dtype, shape = info['dtype'], tuple(int(d) for d in info['shape'])
        begin, end = (int(v) for v in info['data_offsets'])
      except (KeyError, TypeError, ValueError):
        raise UsageError(
          f'{damaged} (tensor {key} has no dtype, shape and data_offsets); download or copy it again'
        ) from None
      if dtype not in _SAFETENSORS_DTYPES:
        raise UsageError(f'{path}: tensor {key} has unsupported dtype {dtype}')
      itemsize = np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
      if end - begin != math.prod(shape) * itemsize or 8 + header_len + end > size:
        raise UsageError(
          f'{damaged}: tensor {key} needs bytes {begin}..{end} after the header, the file holds '
          f'{size - 8 - header_len}; it is truncated: download or copy it again'
        )
      self._entries[key] = (path, np.dtype(_SAFETENSORS_DTYPES[dtype]), shape, 8 + header_len + begin)

  def names(self) -> set[str]:
    return set(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][2]

  def get(self, name: str) -> np.ndarray:
    path, dtype, shape, offset = self._entries[name]
    return np.fromfile(path, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)


def _expected_tensors(model: ModelConfig) -> Iterator[tuple[tuple[str, ...], str, bool, int | None]]:
  """(our path, HF name, transposed, layer index or None) for every tensor the checkpoint must hold."""
  for path, name, transposed in GLOBAL_TENSORS:
    if path == ('lm_head',) and model.tie_word_embeddings:
      continue
    yield path, name, transposed, None
  for layer in range(model.num_hidden_layers):
    for path, name, transposed in LAYER_TENSORS:
      yield path, name.format(layer), transposed, layer


def _get_path(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def _source_dtype(hf: dict[str, Any]) -> str:
  dtype = hf.get('dtype') or hf.get('torch_dtype') or 'float32'
  return dtype if dtype in config_lib.DTYPES else 'float32'


def import_hf(
  hf_dir: str | pathlib.Path, out: str | pathlib.Path, *, overwrite: bool = False, param_dtype: str | None = None
) -> pathlib.Path:
  """Converts a Hugging Face Llama directory into a checkpoint directory (one step, parameters only).

  Parameters are stored in `param_dtype` (default: the checkpoint's own dtype); peak host memory is one copy of
  the model in that dtype plus one tensor.
  """
  hf_dir = pathlib.Path(hf_dir).expanduser()
  if hf_dir.exists() and not hf_dir.is_dir():
    raise UsageError(f'--hf_dir={hf_dir}: is a file; give a Hugging Face model directory')
  outputs.check_dir('--out', out, kind=outputs.CHECKPOINT, inputs={'--hf_dir': hf_dir}, overwrite=overwrite)
  config_file = hf_dir / 'config.json'
  if not config_file.is_file():
    raise UsageError(f'--hf_dir={hf_dir}: no config.json (expected a Hugging Face model directory)')
  try:
    hf = json.loads(config_file.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UsageError(f'{config_file}: not valid JSON ({e})') from None
  if not isinstance(hf, dict):
    raise UsageError(f'{config_file}: a JSON {type(hf).__name__}, not the object of a Hugging Face config.json')
  param_dtype = param_dtype or _source_dtype(hf)
  if param_dtype not in config_lib.DTYPES:
    raise UsageError(f'--param_dtype={param_dtype}: must be one of {", ".join(config_lib.DTYPES)}')
  config = config_lib.base_config()
  try:
    config_lib.apply_overrides(
      config,
      {
        **model_overrides_from_hf(hf),
        'model.param_dtype': param_dtype,
        'model.dtype': 'float32' if param_dtype == 'float32' else 'bfloat16',
      },
    )
  except KeyError as e:
    raise UsageError(f'{config_file}: missing key {e}') from None
  config.train.seq_len = min(config.train.seq_len, config.model.max_position_embeddings)
  config_lib.validate(config)
  model_config = ModelConfig.from_config(config.model)

  reader = _SafetensorsReader(hf_dir)
  shapes = nnx.to_pure_dict(nnx.state(abstract(model_config), nnx.Param))
  expected = list(_expected_tensors(model_config))
  for path, name, transposed, layer in expected:  # check everything before allocating anything
    want = _get_path(shapes, path).shape[1 if layer is not None else 0 :]
    want = tuple(reversed(want)) if transposed else tuple(want)
    if name not in reader.names():
      raise UsageError(f'--hf_dir={hf_dir}: tensor {name} is missing')
    if reader.shape(name) != want:
      raise UsageError(
        f'--hf_dir={hf_dir}: tensor {name} has shape {reader.shape(name)}, but config.json implies {want}'
      )
  known = {name for _, name, _, _ in expected}
  extra = sorted(n for n in reader.names() - known if not n.endswith(IGNORED_SUFFIXES))
  if extra and not (model_config.tie_word_embeddings and extra == ['lm_head.weight']):
    raise UsageError(
      f'--hf_dir={hf_dir}: unexpected tensor {extra[0]} (and {len(extra) - 1} more): this is not a '
      'plain Llama checkpoint'
    )

  target = np.dtype(model_config.weight_dtype)
  params = _allocate(shapes, target)
  for path, name, transposed, layer in expected:
    tensor = reader.get(name)
    tensor = tensor.T if transposed else tensor
    if layer is None:
      _set_path(params, path, tensor.astype(target))
    else:
      _get_path(params, path)[layer] = tensor
    del tensor

  return checkpoint_dir.write_params_dir(
    out,
    config,
    params,
    overwrite=overwrite,
    extra_files=_tokenizer_files(hf_dir),
    meta={'source': f'import_hf {hf_dir}'},
    inputs={'--hf_dir': hf_dir},
  )


def _allocate(shapes: dict, dtype: np.dtype) -> dict:
  """Empty numpy arrays for the stacked (per-layer) parameters; global ones are filled whole later."""

  def alloc(tree, under_layers):
    if isinstance(tree, dict):
      return {k: alloc(v, under_layers or k == 'layers') for k, v in tree.items()}
    return np.empty(tree.shape, dtype) if under_layers else None

  return alloc(shapes, False)


def _tokenizer_files(src: pathlib.Path) -> dict[str, Any]:
  """The tokenizer of a Hugging Face directory (or of one of ours), as extra files to copy."""
  found = tokenizer_lib.find(src)
  if found is None:
    return {}
  names = [found.name] + [n for n in TOKENIZER_SIDE_FILES if (src / n).is_file()]
  return {name: (lambda dst, name=name: shutil.copyfile(src / name, dst)) for name in names}


# --- export ----------------------------------------------------------------------------------------------------


def _parse_size(text: str) -> int:
  units = {'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'B': 1}
  for unit, factor in units.items():
    if text.upper().endswith(unit):
      try:
        return int(float(text[: -len(unit)]) * factor)
      except ValueError:
        break
  raise UsageError(f'--max_shard_size={text}: expected a size such as 5GB or 500MB')


def export_hf(
  ckpt: str | pathlib.Path, out: str | pathlib.Path, *, overwrite: bool = False, max_shard_size: str = '5GB'
) -> pathlib.Path:
  """Writes config.json, safetensors (sharded above max_shard_size) and the tokenizer, loadable by
  transformers.LlamaForCausalLM.from_pretrained."""
  shard_limit = _parse_size(max_shard_size)
  out_path = pathlib.Path(out).expanduser()
  resolved = checkpoint_dir.resolve(ckpt)
  # Before the (possibly long) restore: never the checkpoint's directory, nor over its files (beside them is fine).
  inputs = {'--ckpt': resolved.parts}
  outputs.check_dir('--out', out_path, kind=outputs.HF_EXPORT, inputs=inputs, overwrite=overwrite)
  config, params, resolved = checkpoint_dir.restore_params(ckpt, host=True)
  model_config = ModelConfig.from_config(config.model)
  tok_path = tokenizer_lib.find(resolved.root)
  tok = tokenizer_lib.load(tok_path) if tok_path else None

  dtype = np.dtype(model_config.weight_dtype)
  tensors = []  # (HF name, dtype, shape, thunk producing the array)
  for path, name, transposed, layer in _expected_tensors(model_config):
    stacked = _get_path(params, path)
    shape = stacked.shape[1:] if layer is not None else stacked.shape
    shape = tuple(reversed(shape)) if transposed else tuple(shape)

    def thunk(stacked=stacked, layer=layer, transposed=transposed):
      array = np.asarray(stacked[layer] if layer is not None else stacked)
      return array.T if transposed else array

    tensors.append((name, dtype, shape, thunk))
  shards, current, size = [], [], 0
  for item in tensors:
    nbytes = math.prod(item[2]) * dtype.itemsize
    if current and size + nbytes > shard_limit:
      shards.append(current)
      current, size = [], 0
    current.append(item)
    size += nbytes
  shards.append(current)

  with outputs.atomic_directory(out_path, kind=outputs.HF_EXPORT, inputs=inputs, overwrite=overwrite) as tmp:
    hf_config = hf_config_from_model(model_config, tok.bos_id if tok else None, tok.eos_ids if tok else ())
    (tmp / 'config.json').write_text(json.dumps(hf_config, indent=2) + '\n')
    weight_map = {}
    for i, shard in enumerate(shards):
      file_name = 'model.safetensors' if len(shards) == 1 else f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
      _write_safetensors(tmp / file_name, shard)
      weight_map.update({name: file_name for name, *_ in shard})
    if len(shards) > 1:
      total = sum(math.prod(shape) * dtype.itemsize for _, _, shape, _ in tensors)
      (tmp / 'model.safetensors.index.json').write_text(
        json.dumps({'metadata': {'total_size': total}, 'weight_map': weight_map}, indent=2) + '\n'
      )
    for name, write in _tokenizer_files(resolved.root).items():
      write(tmp / name)
  return out_path

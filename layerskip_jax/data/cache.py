"""Auto-prepared data: the tokenizer and shards a training run needs, built once and cached (data.cache_dir).

Only process 0 prepares; the others wait at a barrier (the cache must be on a filesystem all processes see).
Errors name the config keys (data.source, data.tokenizer, model.vocab_size, data.cache_dir), not the flags of the
data commands; a damaged cache entry names the file and the directory to delete (it is prepared again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib

import jax
from jax.experimental import multihost_utils
from ml_collections import config_dict

from layerskip_jax.data import prepare as prepare_lib
from layerskip_jax.data import tokenizer as tokenizer_lib
from layerskip_jax.data.sources import open_source
from layerskip_jax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class PreparedData:
  tokenizer: pathlib.Path
  train: pathlib.Path  # shards directory
  heldout: pathlib.Path | None  # None: no evaluation split


def _key(*parts: str) -> str:
  return hashlib.sha1('|'.join(parts).encode()).hexdigest()[:12]


def _source_options(data: config_dict.ConfigDict) -> dict:
  return {'tfds_data_dir': data.tfds_data_dir or None, 'text_key': data.text_key}


def _prepare(config: config_dict.ConfigDict, tokenizer: str | None) -> PreparedData:
  data = config.data
  cache = pathlib.Path(data.cache_dir).expanduser()
  source = pathlib.Path(data.source).expanduser()
  if source.is_dir() and (source / prepare_lib.MANIFEST).is_file():  # already prepared shards
    if not tokenizer:
      raise UsageError(f'data.source={data.source} holds prepared shards: set data.tokenizer to the tokenizer they '
                       'were made with')
    manifest = prepare_lib.read_manifest(source)
    tokenizer_file = tokenizer_lib.load(tokenizer, flag='data.tokenizer').path
    if manifest['tokenizer_sha256'] != prepare_lib.file_sha256(tokenizer_file):
      raise UsageError(f'data.tokenizer={tokenizer}: is not the tokenizer the shards in {source} were made with')
    return PreparedData(tokenizer_file, source, None)
  options = _source_options(data)
  description = open_source(data.source, data.train_split, flag='data.source', **options).description
  if not tokenizer:
    path = cache / 'tokenizers' / f'{_key(description, str(config.model.vocab_size))}' / 'tokenizer.model'
    if not path.is_file():
      print(f'training a {config.model.vocab_size}-piece tokenizer on {description} -> {path}')
      tokenizer_lib.train_sentencepiece(data.source, config.model.vocab_size, path, split=data.train_split,
                                        source_flag='data.source', vocab_flag='model.vocab_size',
                                        out_flag='data.cache_dir', **options)
    tokenizer = str(path)
  tokenizer = str(tokenizer_lib.load(tokenizer, flag='data.tokenizer').path)  # a directory: the file in it
  checksum = prepare_lib.file_sha256(tokenizer)
  shards = {}
  for split in (data.train_split, data.eval_split):
    if not split:
      continue
    out = cache / 'shards' / _key(data.source, split, checksum) / split
    manifest = prepare_lib.read_manifest(out)
    if manifest is None:
      print(f'preparing {data.source}:{split} -> {out}')
      prepare_lib.prepare(data.source, tokenizer, out, split=split, source_flag='data.source',
                          tokenizer_flag='data.tokenizer', out_flag='data.cache_dir',
                          progress=config.logging.progress_bar, **options)  # off: stderr holds only errors
    shards[split] = out
  return PreparedData(pathlib.Path(tokenizer), shards[data.train_split],
                      shards.get(data.eval_split) if data.eval_split else None)


def ensure_prepared(config: config_dict.ConfigDict, tokenizer: str | None = None) -> PreparedData:
  """Tokenizer and shard directories for config.data (`tokenizer` overrides data.tokenizer), preparing what is
  missing. Checks that the tokenizer fits the model's vocabulary."""
  tokenizer = tokenizer or config.data.tokenizer or None
  if jax.process_index() == 0:
    prepared = _prepare(config, tokenizer)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('layerskip_jax data prepared')
    if jax.process_index() != 0:
      prepared = _prepare(config, tokenizer)  # finds everything in place (shared filesystem)
  tokenizer_lib.check_vocab(tokenizer_lib.load(prepared.tokenizer), config.model.vocab_size)
  return prepared

"""Auto-prepared data: the tokenizer and shards a training run needs, built once and cached (data.cache_dir).

Only process 0 prepares (and writes the chunk index for train.seq_len); the others wait at a barrier (the cache must
be on a filesystem all processes see). A tfds source is the exception: every process tokenizes its share of the
split's records (read by index), and process 0 joins the parts (prepare.merge_parts).
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
from layerskip_jax.data.index import ChunkIndex
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


def _tokenizer(config: config_dict.ConfigDict, tokenizer: str | None) -> str:
  """The tokenizer file: `tokenizer`, or one trained on the source (cached) when none is given."""
  data = config.data
  if not tokenizer:
    options = _source_options(data)
    description = open_source(data.source, data.train_split, flag='data.source', **options).description
    path = pathlib.Path(data.cache_dir).expanduser() / 'tokenizers' / _key(description, str(config.model.vocab_size))
    path = path / 'tokenizer.model'
    if not path.is_file():
      print(f'training a {config.model.vocab_size}-piece tokenizer on {description} -> {path}')
      tokenizer_lib.train_sentencepiece(
        data.source,
        config.model.vocab_size,
        path,
        split=data.train_split,
        source_flag='data.source',
        vocab_flag='model.vocab_size',
        out_flag='data.cache_dir',
        **options,
      )
    tokenizer = str(path)
  return str(tokenizer_lib.load(tokenizer, flag='data.tokenizer').path)  # a directory: the file in it


def _splits(config: config_dict.ConfigDict, tokenizer_file: str) -> dict[str, pathlib.Path]:
  """{split: its shards directory in the cache} for the train and eval splits."""
  data, checksum = config.data, prepare_lib.file_sha256(tokenizer_file)
  cache = pathlib.Path(data.cache_dir).expanduser()
  return {
    split: cache / 'shards' / _key(data.source, split, checksum) / split
    for split in (data.train_split, data.eval_split)
    if split
  }


def _prepare(config: config_dict.ConfigDict, tokenizer: str | None) -> PreparedData:
  data = config.data
  source = pathlib.Path(data.source).expanduser()
  if source.is_dir() and (source / prepare_lib.MANIFEST).is_file():  # already prepared shards
    if not tokenizer:
      raise UsageError(
        f'data.source={data.source} holds prepared shards: set data.tokenizer to the tokenizer they were made with'
      )
    manifest = prepare_lib.read_manifest(source)
    tokenizer_file = tokenizer_lib.load(tokenizer, flag='data.tokenizer').path
    if manifest['tokenizer_sha256'] != prepare_lib.file_sha256(tokenizer_file):
      raise UsageError(f'data.tokenizer={tokenizer}: is not the tokenizer the shards in {source} were made with')
    return PreparedData(tokenizer_file, source, None)
  tokenizer = _tokenizer(config, tokenizer)
  shards = _splits(config, tokenizer)
  for split, out in shards.items():
    if prepare_lib.read_manifest(out) is None:
      print(f'preparing {data.source}:{split} -> {out}')
      # progress off: stderr holds only errors
      prepare_lib.prepare(
        data.source,
        tokenizer,
        out,
        split=split,
        source_flag='data.source',
        tokenizer_flag='data.tokenizer',
        out_flag='data.cache_dir',
        progress=config.logging.progress_bar,
        **_source_options(data),
      )
  return PreparedData(
    pathlib.Path(tokenizer), shards[data.train_split], shards.get(data.eval_split) if data.eval_split else None
  )


def _prepare_in_parts(config: config_dict.ConfigDict, tokenizer: str | None) -> None:
  """A tfds source on several processes: each tokenizes its share of every split not yet prepared (its contiguous
  part of the records, read by index: no process reads the whole split), then process 0 joins the parts."""
  process, count = jax.process_index(), jax.process_count()
  if process == 0:
    _tokenizer(config, tokenizer)  # trained once, if none is given
  multihost_utils.sync_global_devices('layerskip_jax tokenizer ready')
  tokenizer = _tokenizer(config, tokenizer)
  for split, out in _splits(config, tokenizer).items():
    if prepare_lib.read_manifest(out) is not None:  # every process sees the same: the last barrier was after it
      continue
    part = prepare_lib.part_directory(out, process, count)
    manifest = prepare_lib.prepare(
      config.data.source,
      tokenizer,
      part,
      split=split,
      part=(process, count),
      source_flag='data.source',
      tokenizer_flag='data.tokenizer',
      out_flag='data.cache_dir',
      progress=False,
      **_source_options(config.data),
    )
    print(f'process {process}: {manifest["source"]}: {manifest["documents"]} documents -> {part}')
    multihost_utils.sync_global_devices(f'layerskip_jax {split} parts prepared')
    if process == 0:
      prepare_lib.merge_parts(out, count, out_flag='data.cache_dir')
    multihost_utils.sync_global_devices(f'layerskip_jax {split} parts merged')


def ensure_prepared(config: config_dict.ConfigDict, tokenizer: str | None = None) -> PreparedData:
  """Tokenizer and shard directories for config.data (`tokenizer` overrides data.tokenizer), preparing what is
  missing. Checks that the tokenizer fits the model's vocabulary."""
  tokenizer = tokenizer or config.data.tokenizer or None
  if jax.process_count() > 1 and config.data.source.startswith('tfds:'):
    _prepare_in_parts(config, tokenizer)
  if jax.process_index() == 0:
    prepared = _prepare(config, tokenizer)
    for directory in (prepared.train, prepared.heldout):  # the chunk index, once, before the others open it
      if directory is not None:
        ChunkIndex(prepare_lib.shard_files(directory)[0], config.train.seq_len)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('layerskip_jax data prepared')
    if jax.process_index() != 0:
      prepared = _prepare(config, tokenizer)  # finds everything in place (shared filesystem)
  tokenizer_lib.check_vocab(tokenizer_lib.load(prepared.tokenizer), config.model.vocab_size)
  return prepared

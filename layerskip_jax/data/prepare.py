"""Tokenize a source into ArrayRecord shards plus a manifest, in parallel, idempotently.

    python -m layerskip_jax.data.prepare --source python_stdlib --split train --tokenizer tok.model --out DIR

Each record is one document: int32 [prompt_length, id_0, id_1, ...] where the ids run from BOS to EOS and
prompt_length is the number of leading ids that are a fine-tuning prompt (0 for pretraining text). The manifest
(DIR/manifest.json) records documents, tokens, the tokenizer's sha256 and the source; beside each shard,
`<shard>.lengths.npy` holds its records' token counts (the loader cuts documents into chunks without reading them).
A second run with the same inputs changes nothing, and shards made with another tokenizer or source are never
appended to.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
from collections.abc import Iterator

import numpy as np

from layerskip_jax.data import tokenizer as tokenizer_lib
from layerskip_jax.data.sources import Document, open_source
from layerskip_jax.errors import UsageError

MANIFEST = 'manifest.json'
FORMAT = 'layerskip_jax.tokens.v1'
_worker_tokenizer: tokenizer_lib.Tokenizer | None = None


def file_sha256(path: str | pathlib.Path) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def encode_document(tok: tokenizer_lib.Tokenizer, doc: Document) -> np.ndarray:
  """int32 [prompt_length, BOS, ids..., EOS] for one document (see the module docstring)."""
  if doc.prompt is not None:
    prompt = tok.encode(doc.prompt, add_bos=True)
    completion = tok.encode(doc.completion, add_bos=False, add_eos=True)
    return np.asarray([len(prompt), *prompt, *completion], np.int32)
  return np.asarray([0, *tok.encode(doc.text, add_bos=True, add_eos=True)], np.int32)


def decode_record(record: bytes) -> tuple[np.ndarray, int]:
  """(token ids, prompt length) of one ArrayRecord record."""
  data = np.frombuffer(record, np.int32)
  return data[1:], int(data[0])


def _init_worker(tokenizer_path: str) -> None:
  global _worker_tokenizer
  _worker_tokenizer = tokenizer_lib.load(tokenizer_path)


def _encode_in_worker(doc: Document) -> bytes:
  return encode_document(_worker_tokenizer, doc).tobytes()


def lengths_file(shard_file: str | pathlib.Path) -> pathlib.Path:
  """The sidecar of a shard: int64 token counts of its records, in order."""
  return pathlib.Path(f'{shard_file}.lengths.npy')


def _close_shard(directory: pathlib.Path, shard: dict, lengths: list[int]) -> None:
  np.save(lengths_file(directory / shard['file']), np.asarray(lengths, np.int64))
  shard.update(documents=len(lengths), tokens=int(sum(lengths)))


def read_manifest(directory: str | pathlib.Path) -> dict | None:
  path = pathlib.Path(directory) / MANIFEST
  if not path.is_file():
    return None
  try:
    manifest = json.loads(path.read_text())
  except json.JSONDecodeError:
    raise UsageError(f'{path}: corrupt manifest; delete {directory} and prepare again') from None
  if manifest.get('format') != FORMAT:
    raise UsageError(f'{path}: not a {FORMAT} manifest')
  return manifest


def prepare(source_spec: str, tokenizer_path: str | pathlib.Path, out: str | pathlib.Path, *, split: str = 'train',
            workers: int | None = None, shard_tokens: int = 16 << 20, progress: bool = True,
            **source_options) -> dict:
  """Writes (or confirms up to date) the shards of one source split; returns the manifest."""
  from array_record.python.array_record_module import ArrayRecordWriter
  from tqdm import tqdm

  out = pathlib.Path(out).expanduser()
  tokenizer_path = pathlib.Path(tokenizer_path).expanduser()
  tok = tokenizer_lib.load(tokenizer_path)
  checksum = file_sha256(tok.path)
  source = open_source(source_spec, split, **source_options)
  existing = read_manifest(out)
  if existing is not None:
    if existing['tokenizer_sha256'] != checksum:
      raise UsageError(f'--out={out}: holds shards made with another tokenizer (sha256 '
                       f'{existing["tokenizer_sha256"][:12]}..., not {checksum[:12]}...); use a new directory')
    if existing['source'] != source.description:
      raise UsageError(f'--out={out}: holds shards of {existing["source"]}, not {source.description}; use a new '
                       'directory')
    return existing
  if out.exists() and any(out.iterdir()):
    raise UsageError(f'--out={out}: exists, is not empty and has no {MANIFEST}; use a new directory')

  tmp = out.with_name(f'.{out.name}.tmp-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  workers = workers or os.cpu_count() or 1
  shards, documents, tokens, shard_tokens_now, writer, lengths = [], 0, 0, 0, None, []
  try:
    records: Iterator[bytes]
    pool = None
    if workers > 1:
      pool = multiprocessing.get_context('spawn').Pool(workers, _init_worker, (str(tok.path),))
      records = pool.imap(_encode_in_worker, source.documents(), chunksize=16)
    else:
      records = (encode_document(tok, doc).tobytes() for doc in source.documents())
    for record in tqdm(records, desc=f'tokenizing {source.description}', unit='doc', disable=not progress,
                       mininterval=1.0):
      if writer is None:
        name = f'shard-{len(shards):05d}.array_record'
        writer = ArrayRecordWriter(str(tmp / name), 'group_size:1')
        shards.append({'file': name})
      writer.write(record)
      n = len(record) // 4 - 1
      lengths.append(n)
      documents, tokens, shard_tokens_now = documents + 1, tokens + n, shard_tokens_now + n
      if shard_tokens_now >= shard_tokens:
        writer.close()
        _close_shard(tmp, shards[-1], lengths)
        writer, shard_tokens_now, lengths = None, 0, []
    if pool is not None:
      pool.close()
      pool.join()
    if writer is not None:
      writer.close()
      _close_shard(tmp, shards[-1], lengths)
    if documents == 0:
      raise UsageError(f'--source={source_spec}: no readable documents ({len(source.skipped)} files skipped)')
    manifest = {'format': FORMAT, 'source': source.description, 'tokenizer_sha256': checksum,
                'tokenizer_vocab_size': tok.vocab_size, 'documents': documents, 'tokens': tokens,
                'skipped_files': len(source.skipped), 'shards': shards}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + '\n')
    shutil.rmtree(out, ignore_errors=True)  # empty (checked above)
    tmp.rename(out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return manifest


def main(args) -> None:
  from absl import flags
  f = flags.FLAGS
  if not f.source or not f.tokenizer or not f.out:
    raise UsageError('prepare needs --source, --tokenizer and --out')
  manifest = prepare(f.source, f.tokenizer, f.out, split=f.split, workers=f.workers,
                     tfds_data_dir=f.tfds_data_dir, text_key=f.text_key)
  print(f'{f.out}: {manifest["documents"]} documents, {manifest["tokens"]} tokens in {len(manifest["shards"])} '
        f'shards ({manifest["skipped_files"]} files skipped)')


if __name__ == '__main__':
  from absl import flags

  from layerskip_jax import cli
  flags.DEFINE_string('source', None, 'python_stdlib, a directory, glob, @list file, .jsonl, or tfds:NAME')
  flags.DEFINE_string('split', 'train', 'split of the source')
  flags.DEFINE_string('tokenizer', None, 'tokenizer.model or tokenizer.json')
  flags.DEFINE_string('out', None, 'directory for the shards and manifest.json')
  flags.DEFINE_integer('workers', None, 'tokenizer processes (default: one per core)')
  flags.DEFINE_string('tfds_data_dir', None, 'TFDS data_dir for tfds: sources')
  flags.DEFINE_string('text_key', 'text', 'text field of tfds records')
  cli.run(main)

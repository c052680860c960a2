"""Tokenize a source into ArrayRecord shards plus a manifest, in parallel, idempotently.

    python -m layerskip_jax.data.prepare --source python_stdlib --split train --tokenizer tok.model --out DIR

Each record is one document: int32 [prompt_length, id_0, id_1, ...] where the ids run from BOS to EOS and
prompt_length is the number of leading ids that are a fine-tuning prompt (0 for pretraining text). The manifest
(DIR/manifest.json) records documents, tokens, the tokenizer's sha256 and the source; beside each shard,
`<shard>.lengths.npy` holds its records' token counts (the loader cuts documents into chunks without reading them).
A second run with the same inputs changes nothing, and shards made with another tokenizer or source are never
appended to.

--out is checked before any work: it is never the source, the tokenizer, a directory holding either or a directory
inside one (shards written into a source directory would be read back as documents by the next run), and a
non-empty directory without a manifest is refused, not emptied. The shards are written into a hidden sibling that
replaces --out only once complete (outputs.atomic_directory): a killed run leaves no half-written --out, and its
leftover sibling is removed by the next run. A manifest, shard or lengths file that is missing, truncated or does
not match the manifest is one error line naming the file (`verify_shards`; the loader runs it too), never a
traceback from the reader or a silently shorter corpus.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pathlib
from collections.abc import Iterator

import numpy as np

from layerskip_jax import outputs
from layerskip_jax.data import tokenizer as tokenizer_lib
from layerskip_jax.data.sources import Document, check_outside, open_source
from layerskip_jax.errors import UsageError, one_line

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


def _again(directory: pathlib.Path) -> str:
  return f'delete {directory} and prepare it again'


def read_manifest(directory: str | pathlib.Path) -> dict | None:
  """The manifest of a shards directory (None if it has none); a UsageError naming the file if it is truncated, not
  JSON, or not a manifest of this format."""
  directory = pathlib.Path(directory).expanduser()
  path = directory / MANIFEST
  if not path.is_file():
    return None
  try:
    manifest = json.loads(path.read_bytes().decode('utf-8'))
  except json.JSONDecodeError as e:
    raise UsageError(f'{path}: truncated or not JSON ({e.msg}: line {e.lineno}, column {e.colno}); '
                     f'{_again(directory)}') from None
  except UnicodeDecodeError:
    raise UsageError(f'{path}: not UTF-8 text (corrupt); {_again(directory)}') from None
  except OSError as e:
    raise UsageError(f'{path}: cannot be read ({outputs.describe_os_error(e)})') from None
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    found = repr(manifest.get('format')) if isinstance(manifest, dict) else f'a JSON {type(manifest).__name__}'
    raise UsageError(f'{path}: not a {FORMAT} manifest (format: {found}); give a directory written by '
                     'python -m layerskip_jax.data.prepare')
  problem = _manifest_problem(manifest)
  if problem:
    raise UsageError(f'{path}: {problem}; {_again(directory)}')
  return manifest


def _manifest_problem(manifest: dict) -> str | None:
  """What is wrong with a manifest's fields (None: nothing); a shard's file must be a plain name in the directory."""
  def count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
  for key, check in (('source', lambda v: isinstance(v, str)), ('tokenizer_sha256', lambda v: isinstance(v, str)),
                     ('documents', count), ('tokens', count), ('skipped_files', count),
                     ('shards', lambda v: isinstance(v, list))):
    if not check(manifest.get(key)):
      return f'its {key!r} is {json.dumps(manifest.get(key))}' if key in manifest else f'it has no {key!r}'
  for i, shard in enumerate(manifest['shards']):
    if not (isinstance(shard, dict) and isinstance(shard.get('file'), str) and shard['file'].startswith('shard-')
            and '/' not in shard['file'] and '\\' not in shard['file'] and count(shard.get('documents'))
            and count(shard.get('tokens'))):
      return (f'shard {i} is {json.dumps(shard)[:100]}, not {{"file": "shard-N.array_record", "documents": N, '
              '"tokens": N}')
  if sum(shard['documents'] for shard in manifest['shards']) != manifest['documents']:
    return 'its shards\' documents do not add up to its "documents"'
  return None


def verify_shards(directory: str | pathlib.Path, manifest: dict) -> None:
  """Every shard the manifest lists is present, readable and holds the documents the manifest counts, and its
  lengths file (when present) matches; else a UsageError naming the file. Reads each shard's index, not its records."""
  from array_record.python.array_record_module import ArrayRecordReader
  directory = pathlib.Path(directory).expanduser()
  for shard in manifest['shards']:
    path = directory / shard['file']
    if not path.is_file():
      raise UsageError(f'{path}: listed in {directory / MANIFEST} but missing; {_again(directory)}')
    try:
      reader = ArrayRecordReader(str(path))
      ok, records = reader.ok(), reader.num_records()
      reader.close()
    except RuntimeError as e:  # the reader raises for some damage, reports not ok() for other
      ok, detail = False, one_line(e, 160)
      detail = f': {detail}' if detail else ''
    else:
      detail = ''
    if not ok:
      raise UsageError(f'{path}: not a readable ArrayRecord file (truncated or corrupt{detail}); '
                       f'{_again(directory)}')
    if records != shard['documents']:
      raise UsageError(f'{path}: holds {records} records, but {MANIFEST} lists {shard["documents"]}; '
                       f'{_again(directory)}')
    sidecar = lengths_file(path)
    if not sidecar.is_file():
      continue  # shards of early versions have none: the loader reads the lengths from the records
    try:
      lengths = np.load(sidecar, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise UsageError(f'{sidecar}: truncated or not a lengths file ({one_line(e, 120)}); '
                       f'{_again(directory)}') from None
    if lengths.ndim != 1 or len(lengths) != records or int(lengths.sum()) != shard['tokens']:
      raise UsageError(f'{sidecar}: does not match its shard ({lengths.size} lengths, {int(lengths.sum())} tokens; '
                       f'the manifest lists {records} documents, {shard["tokens"]} tokens); {_again(directory)}')


def prepare(source_spec: str, tokenizer_path: str | pathlib.Path, out: str | pathlib.Path, *, split: str = 'train',
            workers: int | None = None, shard_tokens: int = 16 << 20, progress: bool = True,
            source_flag: str = '--source', tokenizer_flag: str = '--tokenizer', out_flag: str = '--out',
            **source_options) -> dict:
  """Writes (or confirms up to date) the shards of one source split; returns the manifest. Errors name the options
  by the *_flag names (data.source, data.tokenizer, data.cache_dir when training)."""
  from array_record.python.array_record_module import ArrayRecordWriter
  from tqdm import tqdm

  out = pathlib.Path(out).expanduser()
  # checked even when --out is already prepared: shards inside a source directory would be read back as documents
  check_outside(out_flag, out, source_flag, source_spec, 'shards there would mix with it',
                **{tokenizer_flag: str(tokenizer_path)})
  inputs = {tokenizer_flag: str(tokenizer_path)}  # the source was checked above (check_outside)
  if out.exists() and not out.is_dir():
    raise UsageError(f'{out_flag}={out}: is a file; give a directory path')
  tok = tokenizer_lib.load(tokenizer_path, flag=tokenizer_flag)
  checksum = file_sha256(tok.path)
  source = open_source(source_spec, split, flag=source_flag, **source_options)
  existing = read_manifest(out)
  if existing is not None:
    if existing['tokenizer_sha256'] != checksum:
      raise UsageError(f'{out_flag}={out}: holds shards made with another tokenizer (sha256 '
                       f'{existing["tokenizer_sha256"][:12]}..., not {checksum[:12]}...); use a new directory')
    if existing['source'] != source.description:
      raise UsageError(f'{out_flag}={out}: holds shards of {existing["source"]}, not {source.description}; use a new '
                       'directory')
    verify_shards(out, existing)
    return existing
  if out.is_dir() and any(out.iterdir()):
    raise UsageError(f'{out_flag}={out}: exists, is not empty and has no {MANIFEST}; use a new directory')

  workers = workers or os.cpu_count() or 1
  shards, documents, tokens, shard_tokens_now, writer, lengths = [], 0, 0, 0, None, []
  with outputs.atomic_directory(out, flag=out_flag, kind=outputs.SHARDS, inputs=inputs) as tmp:
    pool = None
    try:
      records: Iterator[bytes]
      if workers > 1:
        pool = multiprocessing.get_context('spawn').Pool(workers, _init_worker, (str(tok.path),))
        records = pool.imap(_encode_in_worker, source.documents(), chunksize=16)
      else:
        records = (encode_document(tok, doc).tobytes() for doc in source.documents())
      for record in tqdm(records, desc=f'tokenizing {source.description}', unit='doc', disable=not progress,
                         mininterval=1.0, delay=2.0):  # delay: a run that fails at once prints only its error
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
      if writer is not None:
        writer.close()
        _close_shard(tmp, shards[-1], lengths)
        writer = None
    finally:
      if pool is not None:  # after an error, workers may still be encoding: stop them
        pool.terminate()
        pool.join()
      if writer is not None:
        writer.close()
    if documents == 0:
      raise source.no_text(source_flag, source_spec)
    manifest = {'format': FORMAT, 'source': source.description, 'tokenizer_sha256': checksum,
                'tokenizer_vocab_size': tok.vocab_size, 'documents': documents, 'tokens': tokens,
                'skipped_files': len(source.skipped), 'shards': shards}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + '\n')
  return manifest


def main(args) -> None:
  from absl import flags
  f = flags.FLAGS
  if not f.source or not f.tokenizer or not f.out:
    raise UsageError('prepare needs --source, --tokenizer and --out: python -m layerskip_jax.data.prepare --source S '
                     '--tokenizer tokenizer.model --out DIR')
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

"""Tokenize a source into ArrayRecord shards plus a manifest, in parallel, idempotently.

    python -m layerskip_jax.data.prepare --source python_stdlib --split train --tokenizer tok.model --out DIR
    python -m layerskip_jax.data.prepare --source tfds:c4 ... --out DIR --part I/N   # on N machines, then once:
    python -m layerskip_jax.data.prepare --out DIR --merge_parts N [--index_seq_len 8192]

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

A tfds split, read by index, can be tokenized by N machines (or the N processes of a training run, data/cache.py)
at once: part I holds its contiguous share of the records, and `merge_parts` moves the parts' shards into DIR in
part order, so DIR holds the records of a one-machine prepare, in the same order (the loader's batches are the
same). `--index_seq_len` writes the loader's chunk index (data/index.py) for shared storage the training hosts cannot
write.
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

from layerskip_jax import outputs
from layerskip_jax.data import tokenizer as tokenizer_lib
from layerskip_jax.data.index import ChunkIndex, lengths_file
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
    raise UsageError(
      f'{path}: truncated or not JSON ({e.msg}: line {e.lineno}, column {e.colno}); {_again(directory)}'
    ) from None
  except UnicodeDecodeError:
    raise UsageError(f'{path}: not UTF-8 text (corrupt); {_again(directory)}') from None
  except OSError as e:
    raise UsageError(f'{path}: cannot be read ({outputs.describe_os_error(e)})') from None
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    found = repr(manifest.get('format')) if isinstance(manifest, dict) else f'a JSON {type(manifest).__name__}'
    raise UsageError(
      f'{path}: not a {FORMAT} manifest (format: {found}); give a directory written by '
      'python -m layerskip_jax.data.prepare'
    )
  problem = _manifest_problem(manifest)
  if problem:
    raise UsageError(f'{path}: {problem}; {_again(directory)}')
  return manifest


def _manifest_problem(manifest: dict) -> str | None:
  """What is wrong with a manifest's fields (None: nothing); a shard's file must be a plain name in the directory."""

  def count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0

  for key, check in (
    ('source', lambda v: isinstance(v, str)),
    ('tokenizer_sha256', lambda v: isinstance(v, str)),
    ('documents', count),
    ('tokens', count),
    ('skipped_files', count),
    ('shards', lambda v: isinstance(v, list)),
  ):
    if not check(manifest.get(key)):
      return f'its {key!r} is {json.dumps(manifest.get(key))}' if key in manifest else f'it has no {key!r}'
  for i, shard in enumerate(manifest['shards']):
    if not (
      isinstance(shard, dict)
      and isinstance(shard.get('file'), str)
      and shard['file'].startswith('shard-')
      and '/' not in shard['file']
      and '\\' not in shard['file']
      and count(shard.get('documents'))
      and count(shard.get('tokens'))
    ):
      return (
        f'shard {i} is {json.dumps(shard)[:100]}, not {{"file": "shard-N.array_record", "documents": N, "tokens": N}}'
      )
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
      raise UsageError(f'{path}: not a readable ArrayRecord file (truncated or corrupt{detail}); {_again(directory)}')
    if records != shard['documents']:
      raise UsageError(
        f'{path}: holds {records} records, but {MANIFEST} lists {shard["documents"]}; {_again(directory)}'
      )
    sidecar = lengths_file(path)
    if not sidecar.is_file():
      continue  # shards of early versions have none: the loader reads the lengths from the records
    try:
      lengths = np.load(sidecar, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise UsageError(
        f'{sidecar}: truncated or not a lengths file ({one_line(e, 120)}); {_again(directory)}'
      ) from None
    if lengths.ndim != 1 or len(lengths) != records or int(lengths.sum()) != shard['tokens']:
      raise UsageError(
        f'{sidecar}: does not match its shard ({lengths.size} lengths, {int(lengths.sum())} tokens; '
        f'the manifest lists {records} documents, {shard["tokens"]} tokens); {_again(directory)}'
      )


def shard_files(directory: str | pathlib.Path) -> tuple[list[str], dict]:
  """The shard files of a prepared directory and its manifest, checked (verify_shards): a missing or truncated shard
  is one error line naming it, here, rather than a reader's error in a data thread."""
  directory = pathlib.Path(directory).expanduser()
  manifest = read_manifest(directory)
  if manifest is None:
    raise UsageError(f'{directory}: no prepared shards (manifest.json); run python -m layerskip_jax.data.prepare')
  verify_shards(directory, manifest)
  return [str(directory / shard['file']) for shard in manifest['shards']], manifest


def prepare(
  source_spec: str,
  tokenizer_path: str | pathlib.Path,
  out: str | pathlib.Path,
  *,
  split: str = 'train',
  workers: int | None = None,
  shard_tokens: int = 16 << 20,
  progress: bool = True,
  source_flag: str = '--source',
  tokenizer_flag: str = '--tokenizer',
  out_flag: str = '--out',
  part: tuple[int, int] | None = None,
  **source_options,
) -> dict:
  """Writes (or confirms up to date) the shards of one source split; returns the manifest. Errors name the options
  by the *_flag names (data.source, data.tokenizer, data.cache_dir when training). `part` = (index, count): only
  that share of a tfds split's records (it may be empty), to be joined by merge_parts."""
  from array_record.python.array_record_module import ArrayRecordWriter
  from tqdm import tqdm

  out = pathlib.Path(out).expanduser()
  # checked even when --out is already prepared: shards inside a source directory would be read back as documents
  check_outside(
    out_flag, out, source_flag, source_spec, 'shards there would mix with it', **{tokenizer_flag: str(tokenizer_path)}
  )
  inputs = {tokenizer_flag: str(tokenizer_path)}  # the source was checked above (check_outside)
  if out.exists() and not out.is_dir():
    raise UsageError(f'{out_flag}={out}: is a file; give a directory path')
  tok = tokenizer_lib.load(tokenizer_path, flag=tokenizer_flag)
  checksum = file_sha256(tok.path)
  source = open_source(source_spec, split, flag=source_flag, part=part, **source_options)
  existing = read_manifest(out)
  if existing is not None:
    if existing['tokenizer_sha256'] != checksum:
      raise UsageError(
        f'{out_flag}={out}: holds shards made with another tokenizer (sha256 '
        f'{existing["tokenizer_sha256"][:12]}..., not {checksum[:12]}...); use a new directory'
      )
    if existing['source'] != source.description:
      raise UsageError(
        f'{out_flag}={out}: holds shards of {existing["source"]}, not {source.description}; use a new directory'
      )
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
      for record in tqdm(
        records, desc=f'tokenizing {source.description}', unit='doc', disable=not progress, mininterval=1.0, delay=2.0
      ):  # delay: a run that fails at once prints only its error
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
    if documents == 0 and part is None:
      raise source.no_text(source_flag, source_spec)
    manifest = {
      'format': FORMAT,
      'source': source.description,
      'tokenizer_sha256': checksum,
      'tokenizer_vocab_size': tok.vocab_size,
      'documents': documents,
      'tokens': tokens,
      'skipped_files': len(source.skipped),
      'shards': shards,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + '\n')
  return manifest


def part_directory(out: str | pathlib.Path, index: int, count: int) -> pathlib.Path:
  """Where part `index` of `count` of the shards of `out` is prepared (a sibling; merge_parts joins them into out)."""
  out = pathlib.Path(out).expanduser()
  return out.with_name(f'{out.name}.part-{index}-of-{count}')


def merge_parts(out: str | pathlib.Path, count: int, *, out_flag: str = '--out') -> dict:
  """Joins the `count` prepared parts of `out` (part_directory) into `out`, in part order: the same records in the
  same order as one process preparing the whole split, so the same batches. Their shards are moved, not copied;
  the parts are removed once `out` is complete. Returns the manifest."""
  out = pathlib.Path(out).expanduser()
  parts = [part_directory(out, i, count) for i in range(count)]
  manifests = []
  for part in parts:
    manifest = read_manifest(part)
    if manifest is None:
      raise UsageError(
        f'{part}: missing or not prepared; prepare every part ({out_flag}={out} --part I/{count}, '
        f'I = 0..{count - 1}) before merging'
      )
    verify_shards(part, manifest)
    manifests.append(manifest)
  first = manifests[0]
  whole = first['source'].split(' part ')[0]
  for part, manifest in zip(parts, manifests):
    if manifest['source'].split(' part ')[0] != whole or manifest['tokenizer_sha256'] != first['tokenizer_sha256']:
      raise UsageError(
        f'{part}: holds shards of {manifest["source"]} (tokenizer sha256 '
        f'{manifest["tokenizer_sha256"][:12]}...), not of {whole} like {parts[0]}; prepare it again'
      )
  if sum(m['documents'] for m in manifests) == 0:
    raise UsageError(f'{out_flag}={out}: the {count} parts of {whole} hold no document')
  shards = []
  with outputs.atomic_directory(out, flag=out_flag, kind=outputs.SHARDS) as tmp:
    for part, manifest in zip(parts, manifests):
      for shard in manifest['shards']:
        name = f'shard-{len(shards):05d}.array_record'
        os.replace(part / shard['file'], tmp / name)
        if lengths_file(part / shard['file']).is_file():
          os.replace(lengths_file(part / shard['file']), lengths_file(tmp / name))
        shards.append(dict(shard, file=name))
    merged = {
      'format': FORMAT,
      'source': whole,
      'tokenizer_sha256': first['tokenizer_sha256'],
      'tokenizer_vocab_size': first.get('tokenizer_vocab_size'),
      'shards': shards,
      **{key: sum(m[key] for m in manifests) for key in ('documents', 'tokens', 'skipped_files')},
    }
    (tmp / MANIFEST).write_text(json.dumps(merged, indent=2) + '\n')
  for part in parts:
    shutil.rmtree(part)
  return merged


def _parse_part(value: str) -> tuple[int, int]:
  index, _, count = value.partition('/')
  if not (index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
    raise UsageError(f'--part={value}: expected I/N with 0 <= I < N (this machine\'s share of N), e.g. 0/8')
  return int(index), int(count)


def main(args) -> None:
  from absl import flags

  f = flags.FLAGS
  usage = (
    'python -m layerskip_jax.data.prepare --source S --tokenizer tokenizer.model --out DIR [--part I/N]; or '
    '--out DIR --merge_parts N'
  )
  if not f.out or (f.merge_parts is None and (not f.source or not f.tokenizer)):
    raise UsageError(f'prepare needs --source, --tokenizer and --out (or --out and --merge_parts): {usage}')
  if f.merge_parts is not None and (f.merge_parts < 1 or f.part):
    raise UsageError(f'--merge_parts={f.merge_parts}: give the number of parts (1 or more), without --part: {usage}')
  part = _parse_part(f.part) if f.part else None
  lengths = []
  for value in f.index_seq_len:
    if not value.isdigit() or int(value) < 1:
      raise UsageError(
        f'--index_seq_len={",".join(f.index_seq_len)}: {value!r} is not a positive sequence length; '
        'give the train.seq_len values the shards will be read with, e.g. 4096,8192'
      )
    lengths.append(int(value))
  out = part_directory(f.out, *part) if part else pathlib.Path(f.out)
  if f.merge_parts is not None:
    manifest = merge_parts(out, f.merge_parts)
  else:
    manifest = prepare(
      f.source,
      f.tokenizer,
      out,
      split=f.split,
      workers=f.workers,
      tfds_data_dir=f.tfds_data_dir,
      text_key=f.text_key,
      part=part,
    )
  print(
    f'{out}: {manifest["documents"]} documents, {manifest["tokens"]} tokens in {len(manifest["shards"])} '
    f'shards ({manifest["skipped_files"]} files skipped)'
  )
  for seq_len in lengths if not part else []:
    index = ChunkIndex(shard_files(out)[0], seq_len)
    print(f'{out}: chunk index for seq_len {seq_len}: {len(index)} chunks')


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
  flags.DEFINE_string(
    'part',
    None,
    'I/N: prepare only share I of N of a tfds split, into OUT.part-I-of-N (one '
    'machine each), then join them with --merge_parts N',
  )
  flags.DEFINE_integer('merge_parts', None, 'join the N prepared parts OUT.part-I-of-N into OUT')
  flags.DEFINE_list(
    'index_seq_len',
    [],
    'also write the chunk index for these sequence lengths (shared storage that training hosts cannot write)',
  )
  cli.run(main)

"""Where documents come from. `open_source(spec, split)` returns a Source: a description and a document iterator.

Specs (interfaces.md); every local source is split train/heldout by a stable hash of each file's path (5%
heldout), JSONL by line number, so any corpus gets a held-out set; tfds sources use their own split names.
  python_stdlib          the running interpreter's standard library (tests excluded), split train/heldout by a
                         stable hash (sha1) of each file's path relative to the stdlib root
  DIR | GLOB | @LIST     local text or code files: a directory (recursively), a glob, or a file listing paths
  FILE.jsonl             JSON lines: {"text": ...} documents, or {"prompt": ..., "completion": ...} for fine-tuning
  tfds:NAME[:VERSION]    a TensorFlow Datasets dataset prepared on disk (data_dir), read with tfds.data_source
  DIR with manifest.json our prepared ArrayRecord shards (read by the loader, not here)

Unreadable, binary and non-UTF-8 files are skipped, counted, and reported in one warning line each.
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import hashlib
import json
import pathlib
import sys
import sysconfig
from collections.abc import Callable, Iterator

from layerskip_jax.errors import UsageError

STDLIB = 'python_stdlib'
SPLITS = ('train', 'heldout')
HELDOUT_PERCENT = 5  # of stdlib files, chosen by hash
_TEST_DIRS = {'test', 'tests', 'idle_test', 'site-packages'}


@dataclasses.dataclass(frozen=True)
class Document:
  text: str = ''  # a pretraining document
  prompt: str | None = None  # fine-tuning: the loss covers only the completion
  completion: str | None = None


@dataclasses.dataclass
class Source:
  description: str  # names the source and split; recorded in the shards' manifest
  documents: Callable[[], Iterator[Document]]
  skipped: list[str] = dataclasses.field(default_factory=list)  # files skipped while iterating


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()['stdlib'])


def stable_split(relative_path: str) -> str:
  """train or heldout from sha1 of the path (never Python's salted hash()): the same on every machine and run."""
  bucket = int(hashlib.sha1(relative_path.encode()).hexdigest()[:8], 16) % 100
  return 'heldout' if bucket < HELDOUT_PERCENT else 'train'


def stdlib_files(split: str) -> list[pathlib.Path]:
  root = stdlib_root()
  files = []
  for path in sorted(root.rglob('*.py')):
    rel = path.relative_to(root)
    if _TEST_DIRS & set(rel.parts[:-1]) or rel.name.startswith('test_'):
      continue
    if stable_split(rel.as_posix()) == split:
      files.append(path)
  return files


def _read_text(path: pathlib.Path, skipped: list[str]) -> str | None:
  try:
    data = path.read_bytes()
  except OSError as e:
    reason = f'unreadable ({e.strerror})'
  else:
    if b'\x00' in data[:8192]:
      reason = 'binary'
    else:
      try:
        return data.decode('utf-8')
      except UnicodeDecodeError:
        reason = 'not UTF-8'
  skipped.append(str(path))
  print(f'warning: skipped {path}: {reason}', file=sys.stderr)
  return None


def _split_files(files: list[pathlib.Path], root: pathlib.Path | None, split: str) -> list[pathlib.Path]:
  """A local corpus gets the same stable train/heldout split as the stdlib (by each file's relative path)."""
  def rel(path):
    try:
      return path.resolve().relative_to(root.resolve()).as_posix() if root else path.as_posix()
    except ValueError:
      return path.as_posix()
  return [p for p in files if stable_split(rel(p)) == split]


def _file_source(description: str, files: list[pathlib.Path]) -> Source:
  source = Source(description=description, documents=lambda: iter(()))

  def documents() -> Iterator[Document]:
    source.skipped.clear()
    for path in files:
      text = _read_text(path, source.skipped)
      if text:
        yield Document(text=text)
  source.documents = documents
  return source


def _jsonl_source(path: pathlib.Path, split: str) -> Source:
  def documents() -> Iterator[Document]:
    with open(path, encoding='utf-8') as f:
      for number, line in enumerate(f, start=1):
        if not line.strip() or stable_split(f'line:{number}') != split:
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise UsageError(f'{path}:{number}: not valid JSON ({e.msg})') from None
        if isinstance(record, dict) and isinstance(record.get('prompt'), str) and isinstance(
            record.get('completion'), str):
          yield Document(prompt=record['prompt'], completion=record['completion'])
        elif isinstance(record, dict) and isinstance(record.get('text'), str):
          yield Document(text=record['text'])
        else:
          raise UsageError(f'{path}:{number}: expected a JSON object with string fields "prompt" and '
                           f'"completion" (fine-tuning) or "text" (pretraining)')
  return Source(description=f'jsonl:{path.resolve()}:{split}', documents=documents)


def _tfds_source(spec: str, split: str, data_dir: str | None, text_key: str) -> Source:
  parts = spec.split(':')
  if len(parts) not in (2, 3) or not parts[1]:
    raise UsageError(f'--source={spec}: expected tfds:NAME or tfds:NAME:VERSION')
  name = parts[1] if len(parts) == 2 else f'{parts[1]}:{parts[2]}'
  import tensorflow_datasets as tfds
  try:
    data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types (DatasetNotFoundError, AssertionError, ValueError, ...)
    raise UsageError(f'--source={spec}: split {split!r} not found in data_dir={data_dir} '
                     f'({" ".join(str(e).split())[:200]})') from None

  def documents() -> Iterator[Document]:
    for i in range(len(data)):
      record = data[i]
      if text_key not in record:
        raise UsageError(f'--source={spec}: records have no {text_key!r} field (fields: {sorted(record)}); '
                         'set data.text_key')
      value = record[text_key]
      yield Document(text=value.decode('utf-8', errors='replace') if isinstance(value, bytes) else str(value))
  return Source(description=f'tfds:{name}:{split}@{data_dir}', documents=documents)


def open_source(spec: str, split: str = 'train', *, tfds_data_dir: str | None = None,
                text_key: str = 'text') -> Source:
  """The documents of a source spec (see the module docstring); raises UsageError for a bad spec."""
  if spec == STDLIB:
    if split not in SPLITS:
      raise UsageError(f'--split={split}: python_stdlib has the splits {", ".join(SPLITS)}')
    files = stdlib_files(split)
    version = '.'.join(map(str, sys.version_info[:2]))
    return _file_source(f'python_stdlib:{version}:{split}', files)
  if spec.startswith('tfds:'):
    return _tfds_source(spec, split, tfds_data_dir, text_key)
  if spec.startswith('@'):
    list_file = pathlib.Path(spec[1:]).expanduser()
    if not list_file.is_file():
      raise UsageError(f'--source={spec}: no such list file')
    files = [pathlib.Path(line.strip()).expanduser() for line in list_file.read_text().splitlines() if line.strip()]
    if not files:
      raise UsageError(f'--source={spec}: the list file names no files')
    return _file_source(f'list:{list_file.resolve()}:{split}', _split_files(files, None, split))
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    if (path / 'manifest.json').is_file():
      raise UsageError(f'--source={spec}: already prepared shards; give this directory to the loader '
                       '(data.source) rather than to prepare')
    files = sorted(p for p in path.rglob('*') if p.is_file() and not p.name.startswith('.'))
    if not files:
      raise UsageError(f'--source={spec}: the directory holds no files')
    return _file_source(f'dir:{path.resolve()}:{split}', _split_files(files, path, split))
  if path.is_file():
    if path.suffix == '.jsonl':
      return _jsonl_source(path, split)
    return _file_source(f'file:{path.resolve()}:{split}', [path] if split == 'train' else [])
  if any(ch in spec for ch in '*?['):
    files = sorted(pathlib.Path(p) for p in glob_lib.glob(str(path), recursive=True) if pathlib.Path(p).is_file())
    if not files:
      raise UsageError(f'--source={spec}: the glob matches no files')
    return _file_source(f'glob:{spec}:{split}', _split_files(files, None, split))
  raise UsageError(f'--source={spec}: not python_stdlib, tfds:NAME, an existing file or directory, a glob, '
                   'or @LIST_FILE')

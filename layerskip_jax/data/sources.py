"""Where documents come from. `open_source(spec, split)` returns a Source: a description and a document iterator.

Specs (interfaces.md); every local source is split train/heldout by a stable hash of each file's path (5%
heldout), JSONL by line number, so any corpus gets a held-out set; tfds sources use their own split names.
  python_stdlib          the running interpreter's standard library (tests excluded), split train/heldout by a
                         stable hash (sha1) of each file's path relative to the stdlib root
  DIR | GLOB | @LIST     local text or code files: a directory (recursively), a glob, or a file listing paths
  FILE.jsonl             JSON lines: {"text": ...} documents, or {"prompt": ..., "completion": ...} for fine-tuning
  tfds:NAME[:VERSION]    a TensorFlow Datasets dataset prepared on disk (data_dir), read with tfds.data_source
  DIR with manifest.json our prepared ArrayRecord shards (read by the loader, not here)

Unreadable, binary and non-UTF-8 files are skipped, counted, and reported in one warning line each, once a source
has yielded a document; a source of nothing but such files is reported by its caller as one error line
(`Source.no_text`), not a warning per file followed by the error. A JSONL file is strict: every line, in either split,
must be a valid record, and a bad one is an error naming the file and line (a skipped line would be silently lost).
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import glob as glob_lib
import hashlib
import json
import pathlib
import sys
import sysconfig
from collections.abc import Callable, Iterator

from layerskip_jax import outputs
from layerskip_jax.errors import UsageError, describe_json, one_line

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
  split: str = 'train'
  files: int | None = None  # local files in the split (None: not a source of files)
  records: int | None = None  # JSONL: non-blank lines of the whole file, both splits (known after iterating)
  reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # why files were skipped

  def no_text(self, flag: str, spec: str) -> UsageError:
    """The error for a source whose split gave no document (call after iterating it): what was found, and what to
    do, in one line."""
    where = f'{flag}={spec}: no text to use'
    if self.files == 0:
      return UsageError(
        f'{where}: none of its files falls in the {self.split!r} split (a local source holds out a '
        f'stable {HELDOUT_PERCENT}% of its files, by a hash of each path; a single file is all train); '
        'add files'
      )
    if self.files is not None:
      found = f'{self.files} file{"s" if self.files != 1 else ""}'
      if self.skipped:
        why = ', '.join(f'{n} {reason}' for reason, n in self.reasons.most_common())
        which = 'all' if len(self.skipped) == self.files else f'{len(self.skipped)}'
        rest = '' if len(self.skipped) == self.files else ', the rest empty'
        return UsageError(
          f'{where}: {found}, {which} skipped ({why}; first: {self.skipped[0]}){rest}; give UTF-8 text files'
        )
      return UsageError(f'{where}: {found}, all empty; give files with text')
    if self.records == 0:
      return UsageError(
        f'{where}: the file has no records; add lines of {{"text": ...}} or {{"prompt": ..., "completion": ...}}'
      )
    if self.records is not None:
      return UsageError(
        f'{where}: none of its {self.records} records falls in the {self.split!r} split (a stable '
        f'{HELDOUT_PERCENT}% of the lines are held out); add records'
      )
    return UsageError(f'{where}: the {self.split!r} split has no records; choose another split or source')


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


def _read_text(path: pathlib.Path) -> tuple[str | None, str | None]:
  """(text, None), or (None, why the file is skipped)."""
  try:
    data = path.read_bytes()
  except OSError as e:
    return None, f'unreadable ({e.strerror or e})'
  if b'\x00' in data[:8192]:
    return None, 'binary'
  try:
    return data.decode('utf-8'), None
  except UnicodeDecodeError:
    return None, 'not UTF-8'


def _split_files(files: list[pathlib.Path], root: pathlib.Path | None, split: str) -> list[pathlib.Path]:
  """A local corpus gets the same stable train/heldout split as the stdlib (by each file's relative path)."""

  def rel(path):
    try:
      return path.resolve().relative_to(root.resolve()).as_posix() if root else path.as_posix()
    except ValueError:
      return path.as_posix()

  return [p for p in files if stable_split(rel(p)) == split]


def _file_source(description: str, files: list[pathlib.Path], split: str) -> Source:
  source = Source(description=description, documents=lambda: iter(()), split=split, files=len(files))

  def documents() -> Iterator[Document]:
    source.skipped.clear()
    source.reasons.clear()
    pending: list[str] | None = []  # warnings held back until a document is found (None: one was); if none is,
    for path in files:  # the caller's one error line (Source.no_text) counts them instead
      text, reason = _read_text(path)
      if reason is not None:
        source.skipped.append(str(path))
        source.reasons[reason] += 1
        warning = f'warning: skipped {path}: {reason}'
        if pending is None:
          print(warning, file=sys.stderr)
        else:
          pending.append(warning)
      elif text:
        if pending:
          print('\n'.join(pending), file=sys.stderr)
        pending = None
        yield Document(text=text)

  source.documents = documents
  return source


_RECORD = 'expected a JSON object with string fields "prompt" and "completion" (fine-tuning) or "text" (pretraining)'


def _jsonl_record(path: pathlib.Path, number: int, line: bytes) -> Document:
  """The document of one line of a JSONL file; a UsageError naming the file and line if it is not a valid record."""
  where = f'{path}:{number}'
  try:
    text = line.decode('utf-8-sig' if number == 1 else 'utf-8')
  except UnicodeDecodeError as e:
    raise UsageError(
      f'{where}: not UTF-8 (byte {line[e.start]:#04x} at byte {e.start + 1} of the line); save the file as UTF-8'
    ) from None
  try:
    record = json.loads(text.rstrip('\r\n'))  # an error at the end of the line, not at column 1 of the next
  except json.JSONDecodeError as e:
    raise UsageError(f'{where}: not valid JSON ({e.msg}: column {e.colno}); fix or delete the line') from None
  if not isinstance(record, dict):
    problem = f'got {describe_json(record)}'
  elif 'prompt' in record or 'completion' in record:
    wrong = [k for k in ('prompt', 'completion') if not isinstance(record.get(k), str)]
    if not wrong:
      return Document(prompt=record['prompt'], completion=record['completion'])
    key = wrong[0]
    problem = f'got no "{key}"' if key not in record else f'got "{key}": {describe_json(record[key])}'
  elif 'text' in record:
    if isinstance(record['text'], str):
      return Document(text=record['text'])
    problem = f'got "text": {describe_json(record["text"])}'
  else:
    problem = (
      f'got an object with the keys {", ".join(json.dumps(k) for k in list(record)[:5])}'
      if record
      else ('got an empty object')
    )
  raise UsageError(f'{where}: {_RECORD}, {problem}; fix or delete the line')


def _jsonl_source(path: pathlib.Path, split: str, flag: str, spec: str) -> Source:
  """Every line is checked, in both splits: a corrupt line is an error whichever split is being prepared."""
  source = Source(description=f'jsonl:{path.resolve()}:{split}', documents=lambda: iter(()), split=split)

  def documents() -> Iterator[Document]:
    source.records = None
    try:
      f = open(path, 'rb')
    except OSError as e:
      raise UsageError(f'{flag}={spec}: cannot be read ({e.strerror or e})') from None
    records = 0
    with f:
      for number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        records += 1
        document = _jsonl_record(path, number, line)
        if stable_split(f'line:{number}') == split:
          yield document
    source.records = records

  source.documents = documents
  return source


def part_range(records: int, part: tuple[int, int]) -> tuple[int, int]:
  """Records [start, stop) of part `part` = (index, count) of `records` records: contiguous, in order, sizes
  differing by at most one."""
  index, count = part
  return index * records // count, (index + 1) * records // count


def _tfds_source(
  spec: str, split: str, data_dir: str | None, text_key: str, flag: str, part: tuple[int, int] | None = None
) -> Source:
  parts = spec.split(':')
  if len(parts) not in (2, 3) or not parts[1]:
    raise UsageError(f'{flag}={spec}: expected tfds:NAME or tfds:NAME:VERSION')
  name = parts[1] if len(parts) == 2 else f'{parts[1]}:{parts[2]}'
  import tensorflow_datasets as tfds

  try:
    data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types (DatasetNotFoundError, AssertionError, ValueError, ...)
    raise UsageError(f'{flag}={spec}: split {split!r} not found in data_dir={data_dir} ({one_line(e, 200)})') from None

  start, stop = part_range(len(data), part) if part else (0, len(data))

  def documents() -> Iterator[Document]:
    for i in range(start, stop):
      record = data[i]
      if text_key not in record:
        raise UsageError(
          f'{flag}={spec}: records have no {text_key!r} field (fields: {sorted(record)}); set data.text_key'
        )
      value = record[text_key]
      yield Document(text=value.decode('utf-8', errors='replace') if isinstance(value, bytes) else str(value))

  description = f'tfds:{name}:{split}@{data_dir}'
  if part:
    description += f' part {part[0]} of {part[1]} (records {start}-{stop - 1} of {len(data)})'
  return Source(description=description, documents=documents, split=split)


def open_source(
  spec: str,
  split: str = 'train',
  *,
  tfds_data_dir: str | None = None,
  text_key: str = 'text',
  flag: str = '--source',
  part: tuple[int, int] | None = None,
) -> Source:
  """The documents of a source spec (see the module docstring); raises UsageError for a bad spec, naming `flag`
  (data.source when training). `part` = (index, count): only that contiguous share of the split's records (tfds
  sources, which are read by index: hosts tokenize their shares in parallel, prepare.merge_parts joins them)."""
  if part is not None and not spec.startswith('tfds:'):
    raise UsageError(f'{flag}={spec}: only tfds: sources are prepared in parts')
  if spec == STDLIB:
    if split not in SPLITS:
      raise UsageError(f'--split={split}: python_stdlib has the splits {", ".join(SPLITS)}')
    files = stdlib_files(split)
    version = '.'.join(map(str, sys.version_info[:2]))
    return _file_source(f'python_stdlib:{version}:{split}', files, split)
  if spec.startswith('tfds:'):
    return _tfds_source(spec, split, tfds_data_dir, text_key, flag, part)
  if spec.startswith('@'):
    list_file = pathlib.Path(spec[1:]).expanduser()
    if not list_file.is_file():
      raise UsageError(f'{flag}={spec}: no such list file')
    try:
      names = list_file.read_bytes().decode('utf-8').splitlines()
    except (OSError, UnicodeDecodeError) as e:
      why = 'not UTF-8 text' if isinstance(e, UnicodeDecodeError) else f'unreadable ({e.strerror or e})'
      raise UsageError(f'{flag}={spec}: the list file is {why}; give a text file of paths, one a line') from None
    files = [pathlib.Path(line.strip()).expanduser() for line in names if line.strip()]
    if not files:
      raise UsageError(f'{flag}={spec}: the list file names no files')
    return _file_source(f'list:{list_file.resolve()}:{split}', _split_files(files, None, split), split)
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    if (path / 'manifest.json').is_file():
      raise UsageError(
        f'{flag}={spec}: already prepared shards; give this directory to the loader '
        '(data.source) rather than to prepare'
      )
    files = sorted(p for p in path.rglob('*') if p.is_file() and not p.name.startswith('.'))
    if not files:
      raise UsageError(f'{flag}={spec}: the directory holds no files')
    return _file_source(f'dir:{path.resolve()}:{split}', _split_files(files, path, split), split)
  if path.is_file():
    if path.suffix == '.jsonl':
      return _jsonl_source(path, split, flag, spec)
    return _file_source(f'file:{path.resolve()}:{split}', [path] if split == 'train' else [], split)
  if any(ch in spec for ch in '*?['):
    files = sorted(pathlib.Path(p) for p in glob_lib.glob(str(path), recursive=True) if pathlib.Path(p).is_file())
    if not files:
      raise UsageError(f'{flag}={spec}: the glob matches no files')
    return _file_source(f'glob:{spec}:{split}', _split_files(files, None, split), split)
  raise UsageError(f'{flag}={spec}: not python_stdlib, tfds:NAME, an existing file or directory, a glob, or @LIST_FILE')


def check_outside(
  out_flag: str, out: str | pathlib.Path, source_flag: str, spec: str, consequence: str, **other_inputs: str | None
) -> None:
  """A data command's output is not read by its own source: not the source's file, directory or list file, nor
  anywhere inside them, new or not (a directory source is read recursively, so anything written into it would be
  read back as documents by the next run); for a glob, not a file it matches nor a path the pattern would match.
  `other_inputs` ({flag: path}, e.g. the tokenizer) must not be replaced either. Raises UsageError naming the flags."""
  if spec == STDLIB:
    paths = [str(stdlib_root())]
  elif spec.startswith('tfds:'):
    paths = []
  elif spec.startswith('@'):
    paths = [spec[1:]]
  elif any(ch in spec for ch in '*?['):
    pattern = str(pathlib.Path(spec).expanduser().absolute())
    paths = glob_lib.glob(pattern, recursive=True)
    real = pathlib.Path(out).expanduser().absolute()
    if fnmatch.fnmatch(str(real), pattern):
      raise UsageError(
        f'{out_flag}={out}: matches the input {source_flag}={spec}; {consequence}: choose an output '
        'path the pattern does not match'
      )
  else:
    paths = [spec]
  outputs.check_not_input(out_flag, out, {source_flag: paths}, new_inside_ok=False, consequence=consequence)
  outputs.check_not_input(out_flag, out, other_inputs, consequence=consequence)

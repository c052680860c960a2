"""Where commands write: every output path is checked before any work, and every output appears whole or not at all.

    out = outputs.check_dir('--out', f.out, kind=outputs.HF_EXPORT, inputs={'--ckpt': f.ckpt}, overwrite=True)
    json_path = outputs.check_file('--json', f.json)          # before the benchmark, not after it
    ...
    with outputs.atomic_directory(out, overwrite=True) as tmp:  # fill tmp; swapped in only when complete
      ...
    outputs.write_text(json_path, text)                         # a sibling file, renamed over the target
    plot = outputs.check_plot('--plot', f.plot, others={'--json': f.json})  # and matplotlib can write its format

The rules (issue 14), in one place so every command keeps them:
- An output is never an input, an ancestor of one or an existing part of one (`--out` equal to `--ckpt`, or its
  parent, would delete the model being read); a new directory inside an input is fine.
- `--overwrite` replaces only a previous output of the same kind (its MARKER file names the command that wrote it;
  file names alone would take a downloaded model for an export) or an empty directory; a directory of runs, a
  training workdir or a home directory is refused, not wiped.
- A file output's directory must exist or be creatable, and be writable; the path must not be a directory.
- Writes go to a hidden sibling (`.NAME.tmp-HOST-PID`) renamed over the target when complete: a crash, a full disk
  or Ctrl-C leaves the previous output as it was. What a killed process of this host left is cleaned up (or put
  back) on the next write; another host's siblings are never touched (it may still be writing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as errno_lib
import fnmatch
import os
import pathlib
import re
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence

from layerskip_jax.errors import UsageError


MARKER = '.layerskip_output'  # in every output directory: the command that wrote it (what --overwrite may replace)


@dataclasses.dataclass(frozen=True)
class Kind:
  """A kind of output directory: what it is called in messages, the command that writes it (recorded in its MARKER
  file), the names its entries may have (fnmatch patterns) and the names one must have."""

  name: str
  writer: str
  allowed: tuple[str, ...]
  required: tuple[str, ...]

  def describe(self, directory: pathlib.Path) -> str | None:
    """None if `directory` is an output of this kind; else why not (for the refusal). Names alone do not make one:
    a downloaded Hugging Face model holds the same files as an export, so the marker must name this kind's
    writer."""
    entries = sorted(p.name for p in directory.iterdir())
    foreign = [e for e in entries if e != MARKER and not any(fnmatch.fnmatchcase(e, p) for p in self.allowed)]
    if foreign:
      return f'it holds {foreign[0]!r}'
    missing = [r for r in self.required if not any(fnmatch.fnmatchcase(e, r) for e in entries)]
    if missing:
      return f'it has no {missing[0]}'
    marker = directory / MARKER
    written_by = marker.read_text(errors='replace').strip() if marker.is_file() else None
    if written_by != self.writer:
      return (
        f'its {MARKER} names {written_by!r}'
        if written_by
        else f'it has no {MARKER} file naming {self.writer}, so it was not written by this version of it'
      )
    return None


_TOKENIZER = (
  'tokenizer.model',
  'tokenizer.json',
  'tokenizer_config.json',
  'generation_config.json',
  'special_tokens_map.json',
)
# `convert import_hf`: a parameters-only checkpoint directory (no metrics.jsonl: a training workdir is not one).
CHECKPOINT = Kind(
  'a converted checkpoint',
  'convert import_hf',
  ('layerskip_config.json', 'checkpoints', *_TOKENIZER),
  ('layerskip_config.json',),
)
# `convert export_hf`: a Hugging Face model directory.
HF_EXPORT = Kind(
  'a Hugging Face export',
  'convert export_hf',
  ('config.json', '*.safetensors', 'model.safetensors.index.json', *_TOKENIZER),
  ('config.json',),
)
# `data.prepare`: ArrayRecord shards and their manifest.
SHARDS = Kind(
  'prepared shards',
  'data.prepare',
  ('manifest.json', 'shard-*.array_record', 'shard-*.lengths.npy'),
  ('manifest.json',),
)


def _real(path: str | os.PathLike) -> pathlib.Path:
  """Absolute, with symlinks and `..` resolved (an output reached through a link is still the input)."""
  return pathlib.Path(os.path.realpath(pathlib.Path(path).expanduser()))


Inputs = Mapping[str, 'str | os.PathLike | Sequence[str | os.PathLike] | None']  # {flag: its path, or its parts}


def _input_paths(inputs: Inputs) -> Iterator[tuple[str, str | os.PathLike, pathlib.Path]]:
  """(flag, path as given, real path) of every input; a flag may name several paths (the parts of a checkpoint
  directory: outputs may go beside them, not over them)."""
  for name, value in inputs.items():
    for path in value if isinstance(value, (list, tuple)) else [value]:
      if path:
        yield name, path, _real(path)


def check_not_input(
  flag: str,
  out: str | os.PathLike,
  inputs: Inputs,
  *,
  new_inside_ok: bool = True,
  consequence: str = 'replacing it would destroy the input',
) -> None:
  """`out` is not one of `inputs`, an ancestor of one, or an existing part of one. With `new_inside_ok=False` not
  anywhere inside one either: a data command's source directory is read recursively, so what is written into it
  would be read back as documents by the next run. `consequence` ends the message."""
  out = _real(out)
  for name, value, source in _input_paths(inputs):
    if source == out:
      relation = 'the same path as'
    elif out in source.parents:
      relation = 'a parent of'
    elif source in out.parents and (out.exists() or not new_inside_ok):
      relation = 'inside'
    else:
      continue
    raise UsageError(
      f'{flag}={out}: is {relation} the input {name}={value}; {consequence}: choose an output path outside it'
    )


def check_writable(flag: str, path: str | os.PathLike) -> None:
  """`path` (a directory, existing or to be created) can be written: it, or its nearest existing ancestor, is a
  writable directory."""
  path = _real(path)
  if path.is_dir():
    if not os.access(path, os.W_OK | os.X_OK):
      raise UsageError(f'{flag}={path}: cannot write in it (permission denied)')
    return
  _check_parent_writable(flag, path)


def _check_parent_writable(flag: str, path: pathlib.Path) -> None:
  """The nearest existing ancestor of `path` must be a writable directory (the rest is created)."""
  ancestor = path.parent
  while not ancestor.exists():
    ancestor = ancestor.parent
  if not ancestor.is_dir():
    raise UsageError(f'{flag}={path}: {ancestor} is a file, not a directory')
  if not os.access(ancestor, os.W_OK | os.X_OK):
    raise UsageError(f'{flag}={path}: cannot write in {ancestor} (permission denied); choose a writable path')


def check_dir(
  flag: str, out: str | os.PathLike, *, kind: Kind, inputs: Inputs = {}, overwrite: bool = False
) -> pathlib.Path:
  """Checks an output directory before any work; returns it absolute. Raises UsageError naming `flag` if it is (or
  contains, or lies inside) an input, is a file, exists without `overwrite` (an empty directory is fine), is not a
  previous output of `kind`, or cannot be written."""
  path = _real(out)
  check_not_input(flag, path, inputs)
  if path.exists():
    if not path.is_dir():
      raise UsageError(f'{flag}={out}: is a file; give a directory path')
    if any(path.iterdir()):
      if not overwrite:
        raise UsageError(f'{flag}={out}: already exists; pass --overwrite to replace it')
      why = kind.describe(path)
      if why is not None:
        raise UsageError(
          f'{flag}={out}: --overwrite replaces only {kind.name} ({kind.writer}), and this is not one '
          f'({why}); nothing was changed: remove it yourself or choose another path'
        )
    if not os.access(path, os.W_OK | os.X_OK):
      raise UsageError(f'{flag}={out}: cannot write in it (permission denied)')
  _check_parent_writable(flag, path)
  return path


def check_file(flag: str, path: str | os.PathLike | None, *, inputs: Inputs = {}) -> pathlib.Path | None:
  """Checks an output file (--json, --plot) before any work; returns it absolute (None for None). It is replaced
  when written, so an existing file is fine; a directory, an input or an unwritable place is not."""
  if not path:
    return None
  real = _real(path)
  check_not_input(flag, real, inputs)
  if real.is_dir():
    raise UsageError(f'{flag}={path}: is a directory; give a file path')
  if real.exists() and not os.access(real, os.W_OK):
    raise UsageError(f'{flag}={path}: exists and is not writable (permission denied)')
  _check_parent_writable(flag, real)
  return real


# --- figures (--plot): checked with the other outputs before any work, written whole ---------------------------


def _figure_format(path: str | os.PathLike) -> str:
  """matplotlib's format name for a path: its suffix, or png without one (the temporary sibling savefig writes has
  no telling suffix, so the format is always passed explicitly)."""
  return pathlib.Path(path).suffix.lstrip('.').lower() or 'png'


def check_plot(flag: str, path: str | None, *, inputs: Inputs = {}, others: Inputs = {}) -> pathlib.Path | None:
  """outputs.check_file for a figure, and what only a figure needs, before any work: matplotlib installed, a
  format it writes (from the suffix; none = PNG), not the same file as another output (`others`: {flag: path})."""
  out = check_file(flag, path, inputs=inputs)
  if out is None:
    return None
  for other, value in others.items():
    if value and _real(value) == out:
      raise UsageError(f'{flag}={path}: is the same file as {other}={value}; give them different paths')
  try:
    import matplotlib

    matplotlib.use('Agg')
    from matplotlib.backend_bases import FigureCanvasBase
  except ImportError:
    raise UsageError(
      f'{flag}={path}: drawing needs matplotlib, which is not installed; pip install -r '
      f'requirements-dev.txt, or leave out {flag}'
    ) from None
  if _figure_format(out) not in FigureCanvasBase.get_supported_filetypes():
    raise UsageError(
      f'{flag}={path}: matplotlib cannot write {out.suffix} files; give a path ending in .png, .pdf or .svg'
    )
  return out


def save_figure(fig, path: str | os.PathLike, **savefig_options) -> None:
  """fig.savefig into `path` whole (a sibling renamed over it), in the format its suffix names; closes `fig`."""
  import matplotlib.pyplot as plt

  with atomic_file(path) as tmp:
    fig.savefig(tmp, format=_figure_format(path), **savefig_options)
  plt.close(fig)


_HOST = socket.gethostname()


def _sibling(path: pathlib.Path, tag: str) -> pathlib.Path:
  """`.NAME.tmp-HOST-PID` (being written) or `.NAME.old-HOST-PID` (the previous output, during a swap)."""
  return path.with_name(f'.{path.name}.{tag}-{_HOST}-{os.getpid()}')


def _recover_siblings(path: pathlib.Path) -> None:
  """What a process killed mid-write left beside `path`, on this host: its temporary is removed; the previous
  output it had renamed aside (killed between the two renames of a swap) is put back if `path` is missing, else
  removed. Siblings of other hosts (a shared filesystem) and of live processes are left alone."""
  if not path.parent.is_dir():
    return
  pattern = re.compile(rf'\.{re.escape(path.name)}\.(tmp|old)-(.+)-(\d+)')
  for entry in sorted(path.parent.iterdir(), key=lambda e: e.name):  # 'old' before 'tmp'
    match = pattern.fullmatch(entry.name)
    if not match or match[2] != _HOST or int(match[3]) == os.getpid() or _alive(int(match[3])):
      continue
    if match[1] == 'old' and not path.exists():
      entry.rename(path)
    else:
      _remove(entry)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(
  out: str | os.PathLike, *, flag: str = '--out', kind: Kind | None = None, inputs: Inputs = {}, overwrite: bool = False
) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling of `out` to fill; swaps it in for `out` only if the block succeeds.

  `out` is checked first (check_dir with `kind`, when given; the kind's MARKER is written into the new output). The
  previous `out` is renamed aside, the new one renamed into place, then the old one removed. A failure (or Ctrl-C)
  between the two renames renames the old output back; a kill -9 there leaves it beside `out`, and the next write
  of `out` puts it back first (_recover_siblings). A failure before the swap leaves the old output and no
  temporary directory.
  """
  path = check_dir(flag, out, kind=kind, inputs=inputs, overwrite=overwrite) if kind else _real(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  _recover_siblings(path)
  tmp = _sibling(path, 'tmp')
  _remove(tmp)
  tmp.mkdir()
  try:
    yield tmp
    if kind is not None:
      (tmp / MARKER).write_text(kind.writer + '\n')
    old = _sibling(path, 'old')
    try:
      if path.exists():
        path.rename(old)
      tmp.rename(path)
    except BaseException:
      if old.exists() and not path.exists():
        old.rename(path)
      raise
    _remove(old)
  finally:
    _remove(tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling path to write (by any writer: savefig, a model writer); renamed over `path` only if
  the block succeeds."""
  path = _real(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  _recover_siblings(path)
  tmp = _sibling(path, 'tmp')
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  """Writes `text` to `path` whole (a sibling renamed over it); returns the path."""
  with atomic_file(path) as tmp:
    with open(tmp, 'w') as fh:
      fh.write(text)
      fh.flush()
      os.fsync(fh.fileno())
  return _real(path)


def describe_os_error(e: OSError) -> str:
  """'No space left on device (ENOSPC)': what an I/O error means, for one-line messages."""
  code = errno_lib.errorcode.get(e.errno, '') if e.errno else ''
  reason = e.strerror or str(e)
  return f'{reason} ({code})' if code else reason

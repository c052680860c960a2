"""One tokenizer interface over sentencepiece (`tokenizer.model`: Llama 2, CodeLlama, the ones we train) and
Hugging Face tokenizers (`tokenizer.json`: Llama 3.x). BOS/EOS handling is explicit: `encode` adds BOS only when
asked, never through a post-processor; `eos_ids` lists every id that ends generation.

A tokenizer file that is missing, truncated or of another format, or a tokenizer_config.json /
generation_config.json beside a tokenizer.json that is not valid JSON, is a UsageError naming the file: silently
falling back would tokenize with the wrong special tokens, and a corpus prepared that way is lost work.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Sequence

from layerskip_jax import outputs
from layerskip_jax.errors import UsageError, one_line

FILE_NAMES = ('tokenizer.model', 'tokenizer.json')
# Special-token names that Llama-family tokenizers use, for tokenizer.json files without a tokenizer_config.json.
_BOS_NAMES = ('<|begin_of_text|>', '<s>')
_EOS_NAMES = ('<|end_of_text|>', '<|eot_id|>', '<|eom_id|>', '</s>')


class Tokenizer:
  """text <-> ids. Subclasses set path, vocab_size, bos_id (or None), eos_ids, pad_id (or None)."""

  path: pathlib.Path
  vocab_size: int
  bos_id: int | None
  eos_ids: tuple[int, ...]
  pad_id: int | None

  def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]:
    ids = self._encode(text)
    if add_bos and self.bos_id is not None:
      ids = [self.bos_id, *ids]
    if add_eos and self.eos_ids:
      ids = [*ids, self.eos_ids[0]]
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  def _encode(self, text: str) -> list[int]:
    raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
  def __init__(self, path: str | pathlib.Path):
    import sentencepiece as spm

    self.path = pathlib.Path(path)
    self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eos_ids = (self._sp.eos_id(),) if self._sp.eos_id() >= 0 else ()
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None

  def _encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


def _token_content(token) -> str | None:
  return token.get('content') if isinstance(token, dict) else token


class HFTokenizer(Tokenizer):
  """tokenizer.json; special tokens from tokenizer_config.json / generation_config.json beside it when present."""

  def __init__(self, path: str | pathlib.Path):
    from tokenizers import Tokenizer as _Tokenizer

    self.path = pathlib.Path(path)
    self._tok = _Tokenizer.from_file(str(self.path))
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    special = _read_json(self.path.with_name('tokenizer_config.json'))
    generation = _read_json(self.path.with_name('generation_config.json'))
    bos = _token_content(special.get('bos_token'))
    self.bos_id = self._tok.token_to_id(bos) if bos else self._first_present(_BOS_NAMES)
    eos = _token_content(special.get('eos_token'))
    eos_ids = generation.get('eos_token_id', [])
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else eos_ids
    if not isinstance(eos_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids):
      raise UsageError(
        f'{self.path.with_name("generation_config.json")}: eos_token_id is '
        f'{json.dumps(generation["eos_token_id"])}, not an id or a list of ids; restore the file from '
        'the model\'s files'
      )
    eos_ids = list(eos_ids)
    if eos and self._tok.token_to_id(eos) is not None:
      eos_ids.insert(0, self._tok.token_to_id(eos))
    if not eos_ids:
      eos_ids = [i for i in (self._tok.token_to_id(n) for n in _EOS_NAMES) if i is not None][:1]
    self.eos_ids = tuple(dict.fromkeys(eos_ids))
    pad = _token_content(special.get('pad_token'))
    self.pad_id = self._tok.token_to_id(pad) if pad else None

  def _first_present(self, names: Sequence[str]) -> int | None:
    for name in names:
      if (i := self._tok.token_to_id(name)) is not None:
        return i
    return None

  def _encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _read_json(path: pathlib.Path) -> dict:
  """A JSON object beside a tokenizer.json ({} when absent); a corrupt one is an error, not a silent default."""
  if not path.is_file():
    return {}
  fix = f'it sets the special tokens of {path.with_name("tokenizer.json")}: restore it from the model\'s files'
  try:
    value = json.loads(path.read_bytes().decode('utf-8'))
  except json.JSONDecodeError as e:
    raise UsageError(f'{path}: not valid JSON ({e.msg}: line {e.lineno}, column {e.colno}); {fix}') from None
  except UnicodeDecodeError:
    raise UsageError(f'{path}: not UTF-8 text; {fix}') from None
  except OSError as e:
    raise UsageError(f'{path}: cannot be read ({outputs.describe_os_error(e)}); {fix}') from None
  if not isinstance(value, dict):
    raise UsageError(f'{path}: holds a JSON {type(value).__name__}, not an object; {fix}')
  return value


def _json_problem(path: pathlib.Path, error: Exception) -> str:
  """Why tokenizers refused a file: not JSON at all (truncated, another format), or JSON of something else."""
  try:
    json.loads(path.read_bytes().decode('utf-8'))
  except json.JSONDecodeError as e:
    return f'truncated or not JSON ({e.msg}: line {e.lineno}, column {e.colno})'
  except (UnicodeDecodeError, OSError):
    return 'not JSON text'
  return f'not a Hugging Face tokenizer.json ({one_line(error, 200)})'


def is_sentencepiece(path: str | pathlib.Path) -> bool:
  """Llama 3's `tokenizer.model` is a tiktoken file, not sentencepiece: this tells them apart."""
  try:
    SentencePieceTokenizer(path)
    return True
  except (RuntimeError, OSError):
    return False


def find(directory: str | pathlib.Path) -> pathlib.Path | None:
  """The tokenizer file in a directory: a sentencepiece tokenizer.model, else tokenizer.json, else None."""
  directory = pathlib.Path(directory)
  model, json_file = directory / FILE_NAMES[0], directory / FILE_NAMES[1]
  if model.is_file() and is_sentencepiece(model):
    return model
  return json_file if json_file.is_file() else None


def load(path: str | pathlib.Path, *, flag: str | None = None) -> Tokenizer:
  """A tokenizer from a file (tokenizer.model or tokenizer.json) or a directory holding one. A missing, unreadable,
  truncated or foreign file is a UsageError naming it (and `flag`, the option that gave it, when given)."""
  path = pathlib.Path(path).expanduser()
  name = f'{flag}={path}' if flag else str(path)
  if path.is_dir():
    found = find(path)
    if found is None:
      if (path / FILE_NAMES[0]).is_file():
        raise UsageError(
          f'{name}: its {FILE_NAMES[0]} is not a sentencepiece model (truncated, corrupt, or Llama 3\'s '
          f'tiktoken format) and there is no {FILE_NAMES[1]} beside it; copy the tokenizer files again'
        )
      raise UsageError(
        f'{name}: holds no sentencepiece {FILE_NAMES[0]} or {FILE_NAMES[1]}; give the tokenizer file or '
        'a directory holding one'
      )
    name = f'{name} ({found.name})'
    path = found
  if not path.is_file():
    raise UsageError(f'{name}: no such tokenizer file; give a tokenizer.model or tokenizer.json')
  try:
    with open(path, 'rb') as f:
      f.read(1)
  except OSError as e:
    raise UsageError(f'{name}: cannot be read ({outputs.describe_os_error(e)})') from None
  if path.suffix == '.json':
    try:
      return HFTokenizer(path)
    except UsageError:
      raise
    except Exception as e:  # tokenizers raises its own Exception type
      raise UsageError(
        f'{name}: {_json_problem(path, e)}; give a complete tokenizer.json or a sentencepiece .model'
      ) from None
  try:
    return SentencePieceTokenizer(path)
  except (RuntimeError, OSError):
    raise UsageError(
      f'{name}: not a sentencepiece model: truncated, corrupt or another format (for Llama 3, give '
      'its tokenizer.json); give a complete tokenizer file'
    ) from None


# --- training a sentencepiece tokenizer -------------------------------------------------------------------------

# With byte fallback the vocabulary holds 256 byte pieces, unk, bos and eos (259), then one piece per distinct character
# of the text (the word boundary '▁' always among them), then merges: 261 is the least any text can need, and a real
# one needs 259 plus its characters (python_stdlib: about 350). Measured with sentencepiece 0.2: a text of one
# character trains at 261 and fails at 260.
FIXED_PIECES = 259
MIN_VOCAB = 261


def train_sentencepiece(
  source_spec: str,
  vocab_size: int,
  out: str | pathlib.Path,
  *,
  split: str = 'train',
  max_lines: int = 2_000_000,
  source_flag: str = '--source',
  vocab_flag: str = '--vocab_size',
  out_flag: str = '--out',
  **source_options,
) -> pathlib.Path:
  """Trains a code-friendly BPE sentencepiece model (byte fallback, no normalisation, whitespace kept) on the
  documents of a source; writes it atomically to `out`. Ids: unk 0, bos 1, eos 2 (Llama's layout).

  `out` is checked before any work (a file outside the source, in a writable place). A vocabulary the text cannot
  fill or that cannot hold the text's characters, or a source without text, is a UsageError naming the option
  (the *_flag names: data.source and model.vocab_size when training)."""
  import sentencepiece as spm

  from layerskip_jax.data.sources import check_outside, open_source

  if vocab_size < MIN_VOCAB:
    raise UsageError(
      f'{vocab_flag}={vocab_size}: must be at least {MIN_VOCAB} (256 byte pieces, unk, bos, eos, the '
      f'word boundary and one character); a source needs {FIXED_PIECES} plus its number of distinct '
      'characters (python_stdlib: about 350)'
    )
  check_outside(
    out_flag, out, source_flag, source_spec, 'the next run would read the model as a document of the source'
  )
  out = outputs.check_file(out_flag, out)
  source = open_source(source_spec, split, flag=source_flag, **source_options)
  seen = {'documents': 0, 'lines': 0}
  failure: list[Exception] = []  # raised by the source; sentencepiece would turn it into an INTERNAL error

  def lines():
    try:
      for doc in source.documents():
        seen['documents'] += 1
        for text in (doc.text, doc.prompt, doc.completion):
          for line in (text or '').splitlines():
            if line.strip():
              yield line
              seen['lines'] += 1
              if seen['lines'] >= max_lines:
                return
    except Exception as e:  # re-raised below, once sentencepiece has returned
      failure.append(e)

  with outputs.atomic_file(out) as tmp:
    error = None
    with open(tmp, 'wb') as writer:
      try:
        spm.SentencePieceTrainer.train(
          sentence_iterator=lines(),
          model_writer=writer,
          vocab_size=vocab_size,
          model_type='bpe',
          byte_fallback=True,
          character_coverage=0.9995,
          normalization_rule_name='identity',
          remove_extra_whitespaces=False,
          split_digits=True,
          allow_whitespace_only_pieces=True,
          max_sentence_length=16384,
          unk_id=0,
          bos_id=1,
          eos_id=2,
          pad_id=-1,
          num_threads=os.cpu_count() or 1,
          minloglevel=2,
        )
      except RuntimeError as e:
        error = e
    if failure:
      raise failure[0]
    if error is not None:
      raise _training_error(error, seen, source, source_flag, source_spec, vocab_flag, vocab_size) from None
  return out


def _training_error(
  error: RuntimeError, seen: dict, source, source_flag: str, spec: str, vocab_flag: str, vocab_size: int
) -> UsageError:
  """sentencepiece's INTERNAL check failures, as what they mean for this source and vocabulary."""
  message = one_line(error)
  if 'KeyboardInterrupt' in message:  # Ctrl-C while sentencepiece read the source
    raise KeyboardInterrupt
  if seen['lines'] == 0:
    if seen['documents']:
      return UsageError(
        f'{source_flag}={spec}: no text to use: its {seen["documents"]} documents hold only blank lines; give text'
      )
    return source.no_text(source_flag, spec)
  if m := re.search(r'smaller than required_chars\. \d+ vs (\d+)', message):
    need = int(m[1])
    return UsageError(
      f'{vocab_flag}={vocab_size}: too small for {source_flag}={spec}: its text has '
      f'{need - FIXED_PIECES} distinct characters, which with the {FIXED_PIECES} fixed pieces (256 '
      f'bytes, unk, bos, eos) need at least {need}; set {vocab_flag} to {need} or more'
    )
  if m := re.search(r'Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)', message):
    most = int(m[1])
    return UsageError(
      f'{vocab_flag}={vocab_size}: too large for {source_flag}={spec}: its text ({seen["lines"]} '
      f'lines) yields at most {most} pieces; give more text or set {vocab_flag} to {most} or less'
    )
  return UsageError(f'{source_flag}={spec}: sentencepiece training failed ({message[:300]})')


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """A tokenizer whose ids reach past the model's embedding is an error before training, not a crash in a gather."""
  if tokenizer.vocab_size > model_vocab_size:
    raise UsageError(
      f'model.vocab_size={model_vocab_size}: smaller than the tokenizer\'s {tokenizer.vocab_size} '
      f'pieces ({tokenizer.path}); set --config.model.vocab_size={tokenizer.vocab_size}'
    )


def main(args) -> None:
  from absl import flags

  f = flags.FLAGS
  if args.positional[1:] != ['train']:
    raise UsageError(f'expected the command "train"; got {" ".join(args.positional[1:]) or "nothing"}')
  if not f.source or not f.out:
    raise UsageError(
      'train needs --source and --out: python -m layerskip_jax.data.tokenizer train --source S --out tokenizer.model'
    )
  out = train_sentencepiece(
    f.source, f.vocab_size, f.out, split=f.split, tfds_data_dir=f.tfds_data_dir, text_key=f.text_key
  )
  tok = load(out)
  print(f'wrote {out}: {tok.vocab_size} pieces')


if __name__ == '__main__':
  from absl import flags

  from layerskip_jax import cli

  flags.DEFINE_string('source', None, 'python_stdlib, a directory, glob, @list file, .jsonl, or tfds:NAME')
  flags.DEFINE_string('split', 'train', 'split of the source (python_stdlib: train or heldout)')
  flags.DEFINE_integer('vocab_size', 1024, 'pieces in the trained model')
  flags.DEFINE_string('out', None, 'the tokenizer.model file to write')
  flags.DEFINE_string('tfds_data_dir', None, 'TFDS data_dir for tfds: sources')
  flags.DEFINE_string('text_key', 'text', 'text field of tfds records')
  cli.run(main)

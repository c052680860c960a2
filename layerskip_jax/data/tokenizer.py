"""One tokenizer interface over sentencepiece (`tokenizer.model`: Llama 2, CodeLlama, the ones we train) and
Hugging Face tokenizers (`tokenizer.json`: Llama 3.x). BOS/EOS handling is explicit: `encode` adds BOS only when
asked, never through a post-processor; `eos_ids` lists every id that ends generation.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

from layerskip_jax.errors import UsageError

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
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
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
  try:
    return json.loads(path.read_text()) if path.is_file() else {}
  except json.JSONDecodeError:
    return {}


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


def load(path: str | pathlib.Path) -> Tokenizer:
  """A tokenizer from a file (tokenizer.model or tokenizer.json) or a directory holding one."""
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    found = find(path)
    if found is None:
      raise UsageError(f'{path}: holds no sentencepiece tokenizer.model or tokenizer.json')
    path = found
  if not path.is_file():
    raise UsageError(f'{path}: no such tokenizer file')
  if path.suffix == '.json':
    try:
      return HFTokenizer(path)
    except Exception as e:  # tokenizers raises its own Exception type
      raise UsageError(f'{path}: not a Hugging Face tokenizer.json ({" ".join(str(e).split())[:200]})') from None
  try:
    return SentencePieceTokenizer(path)
  except (RuntimeError, OSError):
    raise UsageError(f'{path}: not a sentencepiece model (Llama 3 ships tokenizer.json; use that)') from None

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


# --- training a sentencepiece tokenizer -------------------------------------------------------------------------

MIN_VOCAB = 300  # byte fallback needs 256 byte pieces plus the specials and some merges


def train_sentencepiece(source_spec: str, vocab_size: int, out: str | pathlib.Path, *, split: str = 'train',
                        max_lines: int = 2_000_000, **source_options) -> pathlib.Path:
  """Trains a code-friendly BPE sentencepiece model (byte fallback, no normalisation, whitespace kept) on the
  documents of a source; writes it atomically to `out`. Ids: unk 0, bos 1, eos 2 (Llama's layout)."""
  import os

  import sentencepiece as spm

  from layerskip_jax.data.sources import open_source
  if vocab_size < MIN_VOCAB:
    raise UsageError(f'--vocab_size={vocab_size}: must be at least {MIN_VOCAB} (byte fallback needs 259 pieces)')
  source = open_source(source_spec, split, **source_options)

  def lines():
    count = 0
    for doc in source.documents():
      for text in (doc.text, doc.prompt, doc.completion):
        for line in (text or '').splitlines():
          if line.strip():
            yield line
            count += 1
            if count >= max_lines:
              return

  out = pathlib.Path(out).expanduser()
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f'.{out.name}.tmp-{os.getpid()}')
  try:
    with open(tmp, 'wb') as writer:
      spm.SentencePieceTrainer.train(
          sentence_iterator=lines(), model_writer=writer, vocab_size=vocab_size, model_type='bpe',
          byte_fallback=True, character_coverage=0.9995, normalization_rule_name='identity',
          remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
          max_sentence_length=16384, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
          num_threads=os.cpu_count() or 1, minloglevel=2)
    tmp.replace(out)
  except RuntimeError as e:
    raise UsageError(f'sentencepiece training failed on --source={source_spec}: {" ".join(str(e).split())[:300]}'
                     ) from None
  finally:
    tmp.unlink(missing_ok=True)
  return out


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """A tokenizer whose ids reach past the model's embedding is an error before training, not a crash in a gather."""
  if tokenizer.vocab_size > model_vocab_size:
    raise UsageError(f'model.vocab_size={model_vocab_size}: smaller than the tokenizer\'s {tokenizer.vocab_size} '
                     f'pieces ({tokenizer.path}); set --config.model.vocab_size={tokenizer.vocab_size}')


def main(args) -> None:
  from absl import flags
  f = flags.FLAGS
  if args.positional[1:] != ['train']:
    raise UsageError(f'expected the command "train"; got {" ".join(args.positional[1:]) or "nothing"}')
  if not f.source or not f.out:
    raise UsageError('train needs --source and --out')
  out = train_sentencepiece(f.source, f.vocab_size, f.out, split=f.split, tfds_data_dir=f.tfds_data_dir,
                            text_key=f.text_key)
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

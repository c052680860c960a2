"""Issue 14 for the data commands: every corrupt or wrong input is one `error:` line naming the file or flag (exit 2),
and nothing is written or destroyed. In-process calls check the messages; a few subprocesses check the one-line
contract of the command lines themselves."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from layerskip_jax.data import loader, prepare as prepare_lib, sources, tokenizer as tokenizer_lib
from layerskip_jax.errors import UsageError

VOCAB = 400


def _tree(path: pathlib.Path) -> dict:
  """Every file under `path` (hidden ones too) with its bytes: to show that a refused command changed nothing."""
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob('*')) if p.is_file()}


def _command(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-m', f'layerskip_jax.data.{module}', *map(str, args)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )


def _one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
  """The command failed with status 2 and exactly one stderr line, `error: ...`, holding every needle."""
  lines = result.stderr.splitlines()
  assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> pathlib.Path:
  """Twelve small code files (about 140 kB; as a directory source, a stable 5% of them are held out)."""
  d = tmp_path_factory.mktemp('corpus')
  for path in sources.stdlib_files('train')[:12]:
    (d / path.name).write_bytes(path.read_bytes()[:12000])
  return d


@pytest.fixture(scope='module')
def tok(tmp_path_factory, corpus) -> pathlib.Path:
  return tokenizer_lib.train_sentencepiece(str(corpus), VOCAB, tmp_path_factory.mktemp('tok') / 'tokenizer.model')


@pytest.fixture(scope='module')
def binary_dir(tmp_path_factory) -> pathlib.Path:
  d = tmp_path_factory.mktemp('binary')
  for i in range(3):
    (d / f'blob{i}.bin').write_bytes(b'\x00\x01\x02' * 50 + bytes([i]))
  (d / 'latin1.txt').write_bytes('caf\xe9 cr\xe8me'.encode('latin-1'))
  return d


@pytest.fixture
def shards(tmp_path, corpus, tok) -> pathlib.Path:
  """A fresh prepared directory per test (tests damage it)."""
  out = tmp_path / 'shards'
  prepare_lib.prepare(str(corpus), tok, out, workers=1, progress=False, shard_tokens=4000)
  return out


def _jsonl(path: pathlib.Path, bad: bytes | str | None = None, at: int = 4, records: int = 30) -> pathlib.Path:
  """`records` fine-tuning records, one a line, with `bad` as line `at` (1-based) when given."""
  lines = [json.dumps({'prompt': f'def f{i}(', 'completion': f'x):\n  return {i}\n'}).encode() for i in range(records)]
  if bad is not None:
    lines.insert(at - 1, bad.encode() if isinstance(bad, str) else bad)
  path.write_bytes(b'\n'.join(lines) + b'\n')
  return path


# --- tokenizer train -----------------------------------------------------------------------------------------------


def test_vocab_below_the_absolute_minimum_is_refused_before_reading(tmp_path):
  with pytest.raises(UsageError, match=rf'^--vocab_size=260: must be at least {tokenizer_lib.MIN_VOCAB} '):
    tokenizer_lib.train_sentencepiece('/nonexistent/source', 260, tmp_path / 't.model')
  assert tokenizer_lib.MIN_VOCAB == 261


def test_minimum_vocab_is_261_for_a_one_character_text(tmp_path):
  """The floor the check states is real: 256 bytes + unk/bos/eos + the word boundary + one character."""
  (tmp_path / 'a.txt').write_text('a\n' * 20)
  source = tmp_path / 'a.txt'
  assert tokenizer_lib.load(tokenizer_lib.train_sentencepiece(str(source), 261, tmp_path / 'a.model')).vocab_size == 261
  (tmp_path / 'b.txt').write_text('ab\n' * 20)
  with pytest.raises(
    UsageError,
    match=r'^--vocab_size=261: too small for --source=.*b\.txt: its text has 3 distinct '
    r'characters, .* need at least 262; set --vocab_size to 262 or more$',
  ):
    tokenizer_lib.train_sentencepiece(str(tmp_path / 'b.txt'), 261, tmp_path / 'b.model')


def test_vocab_too_small_or_too_large_for_the_source_names_the_bound(tmp_path, corpus):
  with pytest.raises(
    UsageError,
    match=r'^--vocab_size=262: too small for --source=.*: its text has \d+ distinct '
    r'characters, .* need at least (\d+); set --vocab_size to \1 or more$',
  ):
    tokenizer_lib.train_sentencepiece(str(corpus), 262, tmp_path / 't.model')
  with pytest.raises(
    UsageError,
    match=r'^--vocab_size=60000: too large for --source=.*: its text \(\d+ lines\) yields '
    r'at most (\d+) pieces; give more text or set --vocab_size to \1 or less$',
  ):
    tokenizer_lib.train_sentencepiece(str(corpus), 60000, tmp_path / 't.model')
  assert list(tmp_path.iterdir()) == []  # no model, no temporary file


def test_failed_training_keeps_the_previous_model(tmp_path, corpus, tok):
  out = tmp_path / 'tokenizer.model'
  out.write_bytes(tok.read_bytes())
  with pytest.raises(UsageError, match='too large'):
    tokenizer_lib.train_sentencepiece(str(corpus), 60000, out)
  assert out.read_bytes() == tok.read_bytes() and [p.name for p in tmp_path.iterdir()] == ['tokenizer.model']


def test_source_without_text(tmp_path, binary_dir):
  with pytest.raises(
    UsageError,
    match=r'^--source=.*: no text to use: 4 files, all skipped \(3 binary, 1 not UTF-8; '
    r'first: .*blob0\.bin\); give UTF-8 text files$',
  ):
    tokenizer_lib.train_sentencepiece(str(binary_dir), VOCAB, tmp_path / 't.model')
  empty = tmp_path / 'empty'
  empty.mkdir()
  for name in 'abc':
    (empty / f'{name}.py').write_text('')
  with pytest.raises(
    UsageError,
    match=r'^--source=.*empty: no text to use: \d files, all empty; give files with '
    r'text$',
  ):
    tokenizer_lib.train_sentencepiece(str(empty), VOCAB, tmp_path / 't.model')
  blank = tmp_path / 'blank.jsonl'
  blank.write_text('\n'.join(json.dumps({'text': '   \n\n'}) for _ in range(30)) + '\n')
  with pytest.raises(UsageError, match=r'^--source=.*blank\.jsonl: no text to use: its \d+ documents hold only blank'):
    tokenizer_lib.train_sentencepiece(str(blank), VOCAB, tmp_path / 't.model')
  assert not (tmp_path / 't.model').exists()


def test_an_error_of_the_source_is_not_hidden_by_sentencepiece(tmp_path):
  """A bad JSONL line met while sentencepiece reads is that line's error, not sentencepiece's INTERNAL one."""
  path = _jsonl(tmp_path / 'ft.jsonl', '{"text": 5}', at=20)
  with pytest.raises(UsageError, match=r'ft\.jsonl:20: expected a JSON object .*, got "text": a number; fix or delete'):
    tokenizer_lib.train_sentencepiece(str(path), VOCAB, tmp_path / 't.model')
  assert not (tmp_path / 't.model').exists()


@pytest.mark.parametrize('where', ['inside', 'glob', 'directory', 'the source file'])
def test_tokenizer_out_is_checked_before_any_work(tmp_path, corpus, where):
  before = _tree(corpus)
  spec, out, message = {
    'inside': (str(corpus), corpus / 'tok.model', r'is inside the input --source='),
    'glob': (str(corpus / '*.py'), corpus / 'tok.py', r'matches the input --source='),
    'directory': (str(corpus), tmp_path, r'is a directory; give a file path'),
    'the source file': (str(next(corpus.iterdir())), next(corpus.iterdir()), r'is the same path as the input'),
  }[where]
  with pytest.raises(UsageError, match=rf'^--out={out}: {message}'):
    tokenizer_lib.train_sentencepiece(spec, VOCAB, out)
  assert _tree(corpus) == before


def test_a_glob_source_protects_what_it_matches_not_its_directory(corpus):
  from layerskip_jax.data.sources import check_outside

  spec = str(corpus / '*.py')
  check_outside('--out', corpus / 'tok.model', '--source', spec, 'x')  # the pattern never reads it
  for out, relation in (
    (corpus / 'new.py', 'matches'),
    (next(corpus.glob('*.py')), 'matches'),
    (corpus, 'is a parent of'),
  ):
    with pytest.raises(UsageError, match=f'--out={out}: {relation} the input --source='):
      check_outside('--out', out, '--source', spec, 'x')


def test_tokenizer_command_lines(tmp_path, binary_dir, corpus):
  out = tmp_path / 'tok.model'
  _one_error_line(
    _command('tokenizer', 'train', '--source', binary_dir, '--out', out, '--vocab_size', VOCAB),
    f'--source={binary_dir}: no text to use',
    'all skipped (3 binary, 1 not UTF-8',
  )
  _one_error_line(
    _command('tokenizer', 'train', '--source', corpus, '--out', corpus / 'tok.model'),
    f'--out={corpus / "tok.model"}: is inside the input --source={corpus}',
  )
  _one_error_line(
    _command('tokenizer', 'train', '--source', corpus, '--out', out, '--vocab_size', 100),
    '--vocab_size=100: must be at least 261',
  )
  assert list(tmp_path.iterdir()) == [] and not (corpus / 'tok.model').exists()


# --- tokenizer files -----------------------------------------------------------------------------------------------


def _hf_tokenizer(directory: pathlib.Path) -> pathlib.Path:
  from tokenizers import Tokenizer, models, pre_tokenizers

  t = Tokenizer(models.WordLevel({'<unk>': 0, '<s>': 1, '</s>': 2, 'a': 3}, unk_token='<unk>'))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  directory.mkdir(exist_ok=True)
  t.save(str(directory / 'tokenizer.json'))
  return directory / 'tokenizer.json'


@pytest.mark.parametrize(
  'name,content,message',
  [
    ('text.model', b'hello, I am not a model\n', 'not a sentencepiece model: truncated, corrupt or another format'),
    ('empty.model', b'', 'not a sentencepiece model: truncated, corrupt or another format'),
    ('truncated.model', None, 'not a sentencepiece model: truncated, corrupt or another format'),
    ('other.json', b'{"vocab": [1, 2]}', 'not a Hugging Face tokenizer.json'),
    ('truncated.json', b'{"version": "1.0", "model": {', 'truncated or not JSON'),
    ('binary.json', b'\xff\xfe\x00\x01', 'not JSON text'),
  ],
  ids=['text as .model', 'empty .model', 'truncated .model', 'other JSON', 'truncated JSON', 'binary .json'],
)
def test_corrupt_tokenizer_file_is_one_error_naming_it(tmp_path, tok, name, content, message):
  path = tmp_path / name
  path.write_bytes(tok.read_bytes()[: len(tok.read_bytes()) // 2] if content is None else content)
  with pytest.raises(UsageError, match=rf'^--tokenizer={path}: {message}') as e:
    tokenizer_lib.load(path, flag='--tokenizer')
  assert '\n' not in str(e.value)


def test_corrupt_files_beside_a_tokenizer_json(tmp_path, tok):
  path = _hf_tokenizer(tmp_path / 'hf')
  assert tokenizer_lib.load(path).bos_id == 1
  (path.parent / 'tokenizer_config.json').write_text('{"bos_token": "<s>", ')
  with pytest.raises(UsageError, match=r'tokenizer_config\.json: not valid JSON \(.*\); it sets the special tokens'):
    tokenizer_lib.load(path)
  (path.parent / 'tokenizer_config.json').write_text('["<s>"]')
  with pytest.raises(UsageError, match=r'tokenizer_config\.json: holds a JSON list, not an object'):
    tokenizer_lib.load(path.parent)
  (path.parent / 'tokenizer_config.json').unlink()
  (path.parent / 'generation_config.json').write_text('{"eos_token_id": "</s>"}')
  with pytest.raises(UsageError, match=r'generation_config\.json: eos_token_id is "</s>", not an id or a list of ids'):
    tokenizer_lib.load(path)
  # a directory whose tokenizer.model is damaged and that has no tokenizer.json says so
  (tmp_path / 'sp').mkdir()
  (tmp_path / 'sp' / 'tokenizer.model').write_bytes(tok.read_bytes()[:100])
  with pytest.raises(UsageError, match=r'^--tokenizer=.*sp: its tokenizer\.model is not a sentencepiece model'):
    tokenizer_lib.load(tmp_path / 'sp', flag='--tokenizer')


# --- prepare: --out ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'where,relation',
  [
    ('source', 'the same path as the input --source='),
    ('source/shards', 'inside the input --source='),
    ('parent', 'a parent of the input --source='),
    ('tokenizer', 'the same path as the input --tokenizer='),
  ],
)
def test_prepare_out_is_never_an_input(tmp_path, tok, where, relation):
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  (corpus / 'a.py').write_text('def f():\n  return 1\n')
  tokenizer_dir = tmp_path / 'tok'
  tokenizer_dir.mkdir()
  (tokenizer_dir / 'tokenizer.model').write_bytes(tok.read_bytes())
  out = {'source': corpus, 'source/shards': corpus / 'shards', 'parent': tmp_path, 'tokenizer': tokenizer_dir}[where]
  before = _tree(tmp_path)
  with pytest.raises(UsageError, match=rf'^--out={out}: is {relation}'):
    prepare_lib.prepare(str(corpus), tokenizer_dir, out, workers=1, progress=False)
  assert _tree(tmp_path) == before and not (corpus / 'shards').exists()


def test_prepare_refuses_a_file_or_a_directory_of_other_things(tmp_path, corpus, tok):
  (tmp_path / 'notes.txt').write_text('keep me')
  with pytest.raises(UsageError, match=rf'^--out={tmp_path / "notes.txt"}: is a file; give a directory path$'):
    prepare_lib.prepare(str(corpus), tok, tmp_path / 'notes.txt', workers=1, progress=False)
  with pytest.raises(UsageError, match=rf'^--out={tmp_path}: exists, is not empty and has no manifest\.json'):
    prepare_lib.prepare(str(corpus), tok, tmp_path, workers=1, progress=False)
  assert _tree(tmp_path) == {'notes.txt': b'keep me'}


def test_prepare_removes_what_killed_runs_left(tmp_path, corpus, tok):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  leftover = tmp_path / f'.shards.tmp-{socket.gethostname()}-{dead.pid}'
  leftover.mkdir()
  (leftover / 'shard-00000.array_record').write_bytes(b'half')
  prepare_lib.prepare(str(corpus), tok, tmp_path / 'shards', workers=1, progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['shards']


# --- prepare: sources and tokenizer --------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'bad,message',
  [
    (
      '{"prompt": "x", ',
      r'not valid JSON \(Expecting property name enclosed in double quotes: column 17\); fix or '
      r'delete the line$',
    ),
    (b'{"text": "caf\xe9"}', r'not UTF-8 \(byte 0xe9 at byte 14 of the line\); save the file as UTF-8$'),
    ('{"text": 5}', r'expected a JSON object .* or "text" \(pretraining\), got "text": a number; fix or delete the'),
    ('["a", "b"]', r'expected a JSON object .*, got a list; '),
    ('"just a string"', r'expected a JSON object .*, got a string; '),
    (
      '{"question": "q", "answer": "a"}',
      r'expected a JSON object .*, got an object with the keys "question", '
      r'"answer"; ',
    ),
    ('{"prompt": "p"}', r'expected a JSON object .*, got no "completion"; '),
    ('{"prompt": "p", "completion": null}', r'expected a JSON object .*, got "completion": null; '),
    ('{}', r'expected a JSON object .*, got an empty object; '),
  ],
  ids=[
    'invalid JSON',
    'invalid UTF-8',
    'text a number',
    'list',
    'string',
    'other keys',
    'no completion',
    'null completion',
    'empty object',
  ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, tok, bad, message):
  path = _jsonl(tmp_path / 'ft.jsonl', bad, at=7)
  with pytest.raises(UsageError, match=rf'^{path}:7: {message}'):
    prepare_lib.prepare(str(path), tok, tmp_path / 'out', workers=1, progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ft.jsonl']


def test_bad_jsonl_line_in_the_other_split_is_still_an_error(tmp_path, tok):
  """Nothing lost: a corrupt line is reported whichever split is prepared, not skipped because it is held out."""
  heldout = next(n for n in range(1, 200) if sources.stable_split(f'line:{n}') == 'heldout')
  path = _jsonl(tmp_path / 'ft.jsonl', '{"text": ', at=heldout, records=heldout + 5)
  with pytest.raises(UsageError, match=rf'^{path}:{heldout}: not valid JSON'):
    prepare_lib.prepare(str(path), tok, tmp_path / 'out', split='train', workers=1, progress=False)


def test_jsonl_without_records_in_the_split(tmp_path, tok):
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('\n\n')
  with pytest.raises(UsageError, match=r'^--source=.*empty\.jsonl: no text to use: the file has no records; add'):
    prepare_lib.prepare(str(empty), tok, tmp_path / 'out', workers=1, progress=False)
  one = _jsonl(tmp_path / 'one.jsonl', records=1)
  with pytest.raises(
    UsageError,
    match=r"^--source=.*one\.jsonl: no text to use: none of its 1 records falls in the "
    r"'heldout' split",
  ):
    prepare_lib.prepare(str(one), tok, tmp_path / 'out', split='heldout', workers=1, progress=False)
  assert not (tmp_path / 'out').exists()


def test_prepare_command_lines(tmp_path, tok, binary_dir, corpus):
  """The one-line contract where it matters: binary source (no progress bar, no warning per file), a truncated
  tokenizer, a bad JSONL line read by the worker pool's feeder thread."""
  out = tmp_path / 'out'
  _one_error_line(
    _command('prepare', '--source', binary_dir, '--tokenizer', tok, '--out', out),
    f'--source={binary_dir}: no text to use: 4 files, all skipped',
  )
  truncated = tmp_path / 'truncated.model'
  truncated.write_bytes(tok.read_bytes()[:3000])
  _one_error_line(
    _command('prepare', '--source', corpus, '--tokenizer', truncated, '--out', out),
    f'--tokenizer={truncated}: not a sentencepiece model',
  )
  jsonl = _jsonl(tmp_path / 'ft.jsonl', '[1, 2]', at=25, records=200)
  _one_error_line(
    _command('prepare', '--source', jsonl, '--tokenizer', tok, '--out', out, '--workers', 2),
    f'{jsonl}:25: expected a JSON object',
    'got a list',
  )
  assert sorted(p.name for p in tmp_path.iterdir()) == ['ft.jsonl', 'truncated.model']


# --- prepared shards -----------------------------------------------------------------------------------------------


def _damage_manifest(d: pathlib.Path, how: str) -> str:
  manifest = json.loads((d / 'manifest.json').read_text())
  if how == 'truncated':
    (d / 'manifest.json').write_text(json.dumps(manifest)[:60])
    return r'manifest\.json: truncated or not JSON \(.*\); delete .* and prepare it again$'
  if how == 'list':
    (d / 'manifest.json').write_text('[]')
    return r'manifest\.json: not a layerskip_jax\.tokens\.v1 manifest \(format: a JSON list\); give a directory written'
  if how == 'no shards':
    del manifest['shards']
    (d / 'manifest.json').write_text(json.dumps(manifest))
    return r"manifest\.json: it has no 'shards'; delete .* and prepare it again$"
  if how == 'escaping shard':
    manifest['shards'][0]['file'] = '../../etc/passwd'
    (d / 'manifest.json').write_text(json.dumps(manifest))
    return r'manifest\.json: shard 0 is .*, not \{"file": "shard-N\.array_record"'
  raise ValueError(how)


@pytest.mark.parametrize('how', ['truncated', 'list', 'no shards', 'escaping shard'])
def test_damaged_manifest_is_one_error_naming_it(shards, corpus, tok, how):
  message = _damage_manifest(shards, how)
  before = _tree(shards)
  with pytest.raises(UsageError, match=rf'^{shards}/{message}'):
    prepare_lib.prepare(str(corpus), tok, shards, workers=1, progress=False)
  with pytest.raises(UsageError, match=rf'^{shards}/{message}'):
    loader.dataset(shards, 32, 2)
  assert _tree(shards) == before  # prepare has no --overwrite: a damaged directory is reported, not replaced


def _damage_shard(d: pathlib.Path, how: str) -> str:
  shard = d / 'shard-00001.array_record'
  sidecar = prepare_lib.lengths_file(shard)
  if how == 'missing shard':
    shard.unlink()
    return rf'{shard}: listed in {d}/manifest\.json but missing; delete {d} and prepare it again$'
  if how == 'truncated shard':
    shard.write_bytes(shard.read_bytes()[:70000])
    return rf'{shard}: not a readable ArrayRecord file \(truncated or corrupt.*\); delete {d} and prepare it again$'
  if how == 'tiny shard':
    shard.write_bytes(b'x')
    return rf'{shard}: not a readable ArrayRecord file \(truncated or corrupt'
  if how == 'truncated lengths':
    sidecar.write_bytes(sidecar.read_bytes()[:100])
    return rf'{sidecar}: truncated or not a lengths file \(.*\); delete {d} and prepare it again$'
  if how == 'wrong lengths':
    np.save(sidecar, np.load(sidecar)[:-1])
    return rf'{sidecar}: does not match its shard \(\d+ lengths, \d+ tokens; the manifest lists \d+ documents'
  if how == 'pickled lengths':
    np.save(sidecar, np.asarray([{'a': 1}], dtype=object), allow_pickle=True)
    return rf'{sidecar}: truncated or not a lengths file'
  raise ValueError(how)


@pytest.mark.parametrize(
  'how', ['missing shard', 'truncated shard', 'tiny shard', 'truncated lengths', 'wrong lengths', 'pickled lengths']
)
def test_damaged_shard_is_one_error_naming_it(shards, corpus, tok, how):
  assert len(prepare_lib.read_manifest(shards)['shards']) >= 2
  message = _damage_shard(shards, how)
  before = _tree(shards)
  with pytest.raises(UsageError, match=rf'^{message}'):
    prepare_lib.prepare(str(corpus), tok, shards, workers=1, progress=False)
  with pytest.raises(UsageError, match=rf'^{message}'):
    loader.dataset(shards, 32, 2)
  assert _tree(shards) == before


def test_record_damaged_after_the_check_names_its_shard(shards):
  """Damage inside a record (its index intact) shows when the record is read: still one line naming the shard."""
  shard = shards / 'shard-00000.array_record'
  data = bytearray(shard.read_bytes())
  data[300:340] = bytes(40)
  shard.write_bytes(bytes(data))
  it = iter(loader.dataset(shards, 32, 2, shuffle=False, repeat=False))
  with pytest.raises(UsageError, match=rf'^{shard}: record \d+ cannot be read \(.*\); delete {shards} and prepare'):
    for _ in range(10_000):
      next(it)


def test_prepare_command_line_on_damaged_shards(shards, corpus, tok):
  (shards / 'manifest.json').write_text('{"format": "layerskip_jax.tokens.v1", "sour')
  _one_error_line(
    _command('prepare', '--source', corpus, '--tokenizer', tok, '--out', shards),
    f'{shards}/manifest.json: truncated or not JSON',
    f'delete {shards} and prepare it again',
  )


def test_unreadable_list_file(tmp_path):
  listing = tmp_path / 'files.list'
  listing.write_bytes(b'\xff\xfe\x00binary')
  with pytest.raises(UsageError, match=rf'^--source=@{listing}: the list file is not UTF-8 text; give a text file'):
    sources.open_source(f'@{listing}')
  if os.geteuid() != 0:  # root reads anything
    listing.write_text('a.py\n')
    listing.chmod(0)
    with pytest.raises(UsageError, match=r'the list file is unreadable \(Permission denied\)'):
      sources.open_source(f'@{listing}')


def test_a_corpus_smaller_than_one_global_batch_is_refused_before_compiling(tmp_path, tok):
  """Training on prepared shards too small to fill one global batch: one line naming them, exit 2, no workdir."""
  small = tmp_path / 'small'
  (small / 'src').mkdir(parents=True)
  (small / 'src' / 'a.py').write_text('def f(x):\n    return x + 1\n')
  out = tmp_path / 'shards'
  prepare_lib.prepare(str(small / 'src'), tok, out, workers=1, progress=False)
  chunks = len(loader.ChunkSource(prepare_lib.shard_files(out)[0], 64))
  workdir = tmp_path / 'run'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'layerskip_jax.train',
      '--config',
      'tiny',
      '--workdir',
      str(workdir),
      f'--config.data.source={out}',
      f'--config.data.tokenizer={tok}',
      '--config.train.seq_len=64',
      '--config.train.batch_size=8',
      '--config.logging.progress_bar=false',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  _one_error_line(
    result,
    f'{out}: holds {chunks} chunks of at most 64 tokens, fewer than one global batch of 8 rows; '
    'use a larger corpus or a smaller train.batch_size',
  )
  assert 'compiled' not in result.stdout and not workdir.exists()

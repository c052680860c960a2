"""The data pipeline: sources, tokenizer training, prepare (manifest, idempotence), the grain loader."""

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT, run_processes

from layerskip_jax.data import loader, prepare as prepare_lib, sources, tokenizer as tokenizer_lib
from layerskip_jax.errors import UsageError


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> pathlib.Path:
  """A small code corpus: 40 stdlib files plus a binary and a non-UTF-8 file (both skipped)."""
  d = tmp_path_factory.mktemp('corpus')
  for path in sources.stdlib_files('train')[:40]:
    (d / path.name).write_bytes(path.read_bytes())
  (d / 'blob.bin').write_bytes(b'\x00\x01\x02binary')
  (d / 'latin1.txt').write_bytes('caf\xe9'.encode('latin-1'))
  return d


@pytest.fixture(scope='module')
def tok_path(tmp_path_factory, corpus) -> pathlib.Path:
  return tokenizer_lib.train_sentencepiece(str(corpus), 512, tmp_path_factory.mktemp('tok') / 'tokenizer.model')


@pytest.fixture(scope='module')
def shards(tmp_path_factory, corpus, tok_path) -> pathlib.Path:
  out = tmp_path_factory.mktemp('shards') / 'train'
  prepare_lib.prepare(str(corpus), tok_path, out, workers=2, progress=False)
  return out


def test_stdlib_split_is_stable_disjoint_and_excludes_tests():
  train, heldout = sources.stdlib_files('train'), sources.stdlib_files('heldout')
  assert not set(train) & set(heldout) and len(train) > 500 and 0.02 < len(heldout) / len(train) < 0.1
  root = sources.stdlib_root()
  assert not any('test' in p.relative_to(root).parts[:-1] or p.name.startswith('test_') for p in train + heldout)
  # sha1 of the relative path: known values, the same on every machine
  assert sources.stable_split('json/decoder.py') == sources.stable_split('json/decoder.py')
  import hashlib
  for rel in ('json/decoder.py', 'email/parser.py', 'asyncio/tasks.py'):
    expected = 'heldout' if int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) % 100 < 5 else 'train'
    assert sources.stable_split(rel) == expected


def test_tokenizer_round_trips_code(tok_path):
  tok = tokenizer_lib.load(tok_path)
  text = 'def f(x):\n\tif x  >  10:\n        return "ünïcode ✓"\n'
  ids = tok.encode(text)
  assert tok.vocab_size == 512 and ids[0] == tok.bos_id == 1 and tok.eos_ids == (2,)
  assert tok.decode(ids) == text


def test_manifest_counts_and_idempotence(shards, corpus, tok_path):
  manifest = prepare_lib.read_manifest(shards)
  from array_record.python.array_record_module import ArrayRecordReader
  documents = tokens = 0
  for shard in manifest['shards']:
    reader = ArrayRecordReader(str(shards / shard['file']))
    for record in reader.read_all():
      ids, prompt_length = prepare_lib.decode_record(record)
      documents, tokens = documents + 1, tokens + len(ids)
      assert ids[0] == 1 and ids[-1] == 2 and prompt_length == 0
  assert (documents, tokens) == (manifest['documents'], manifest['tokens'])
  assert manifest['skipped_files'] == 2  # the binary and the latin-1 file
  assert manifest['tokenizer_sha256'] == prepare_lib.file_sha256(tok_path)
  before = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
  assert prepare_lib.prepare(str(corpus), tok_path, shards, progress=False) == manifest
  assert {p.name: p.stat().st_mtime_ns for p in shards.iterdir()} == before  # a second run changes nothing


def test_prepare_refuses_another_tokenizer(shards, corpus, tmp_path):
  other = tokenizer_lib.train_sentencepiece(str(corpus), 400, tmp_path / 'other.model')
  with pytest.raises(UsageError, match='holds shards made with another tokenizer'):
    prepare_lib.prepare(str(corpus), other, shards, progress=False)


def test_same_seed_same_batches_and_exact_resume(shards):
  first = [next(it) for it in [iter(loader.dataset(shards, 64, 4, seed=3))] for _ in range(5)]
  it = iter(loader.dataset(shards, 64, 4, seed=3))
  batches = [next(it) for _ in range(3)]
  state = it.get_state()
  rest = [next(it) for _ in range(4)]
  for a, b in zip(first, batches + rest):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  other = next(iter(loader.dataset(shards, 64, 4, seed=4)))
  assert not np.array_equal(other['inputs'], first[0]['inputs'])
  resumed = iter(loader.dataset(shards, 64, 4, seed=3))
  resumed.set_state(json.loads(json.dumps(state)))  # the state survives a JSON round trip (checkpoints)
  for expected in rest:
    got = next(resumed)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)


def test_packing_keeps_documents_apart_and_loses_no_token(shards):
  manifest = prepare_lib.read_manifest(shards)
  from array_record.python.array_record_module import ArrayRecordReader
  docs = [prepare_lib.decode_record(r)[0] for s in manifest['shards']
          for r in ArrayRecordReader(str(shards / s['file'])).read_all()]
  rows = list(loader.dataset(shards, 128, 1, shuffle=False, repeat=False))
  targets = sum(int(r['loss_mask'].sum()) for r in rows)
  assert targets == manifest['tokens'] - manifest['documents']  # every (input, target) pair of every document
  pieces = []  # rebuild the documents from the packed rows, segment by segment
  for r in rows:
    seg, pos = r['segment_ids'][0], r['positions'][0]
    for s in np.unique(seg[seg > 0]):
      where = seg == s
      assert np.all(np.diff(pos[where]) == 1)  # one document per segment, contiguous positions
      pieces.append((int(pos[where][0]), r['inputs'][0][where], r['targets'][0][where]))
  # in order, the pieces are exactly the documents' pairs ...
  np.testing.assert_array_equal(np.concatenate([p[1] for p in pieces]), np.concatenate([d[:-1] for d in docs]))
  np.testing.assert_array_equal(np.concatenate([p[2] for p in pieces]), np.concatenate([d[1:] for d in docs]))
  # ... and no piece (one attention span) straddles two documents: every document boundary is a piece boundary
  piece_ends = set(np.cumsum([len(p[1]) for p in pieces]).tolist())
  assert set(np.cumsum([len(d) - 1 for d in docs]).tolist()) <= piece_ends


def test_chunks_cover_every_pair_once_and_shuffling_mixes_documents(shards):
  manifest = prepare_lib.read_manifest(shards)
  files = [str(shards / s['file']) for s in manifest['shards']]
  from array_record.python.array_record_module import ArrayRecordReader
  docs = [prepare_lib.decode_record(r)[0] for f in files for r in ArrayRecordReader(f).read_all()]
  sidecar = np.concatenate([np.load(prepare_lib.lengths_file(f)) for f in files])
  np.testing.assert_array_equal(sidecar, [len(d) for d in docs])  # prepare wrote each record's length
  seq_len = 64
  source = loader.ChunkSource(files, seq_len)
  assert len(source) == sum(-(-(len(d) - 1) // seq_len) for d in docs)
  chunks = [source[i] for i in range(len(source))]
  assert max(len(c['inputs']) for c in chunks) == seq_len
  np.testing.assert_array_equal(np.concatenate([c['targets'] for c in chunks]), np.concatenate([d[1:] for d in docs]))
  # Shuffled, a batch mixes chunks of many documents: consecutive rows no longer walk through one long file.
  doc_of_chunk = np.repeat(np.arange(len(docs)), [-(-(len(d) - 1) // seq_len) for d in docs])
  assert np.bincount(doc_of_chunk).max() >= 8  # the corpus has long documents (else this shows nothing)
  first_targets = next(iter(loader.dataset(shards, seq_len, 8, seed=0)))['targets']
  starts = {tuple(c['targets'][:8]): doc_of_chunk[i] for i, c in enumerate(chunks)}
  row_docs = {starts.get(tuple(row[:8])) for row in first_targets} - {None}
  assert len(row_docs) >= 6


def test_fine_tuning_masks_cover_exactly_the_completions(tmp_path, tok_path):
  records = [{'prompt': f'# task {i}\ndef f{i}(', 'completion': f'x):\n    return x * {i}\n'} for i in range(60)]
  path = tmp_path / 'ft.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in records) + '\n')
  out = tmp_path / 'ft_shards'
  prepare_lib.prepare(str(path), tok_path, out, workers=1, progress=False)
  tok = tokenizer_lib.load(tok_path)
  train = [r for i, r in enumerate(records, start=1) if sources.stable_split(f'line:{i}') == 'train']
  rows = list(loader.dataset(out, 32, 1, shuffle=False, repeat=False))
  masked = [int(t) for r in rows for t, m in zip(r['targets'][0], r['loss_mask'][0]) if m]
  expected = [t for r in train for t in tok.encode(r['completion'], add_bos=False, add_eos=True)]
  assert masked == expected


def test_tfds_round_trip(tmp_path, tok_path):
  import tensorflow_datasets as tfds

  class TinyCorpus(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(12), 'validation': self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {'text': f'def f{i}():\n    return {i}\n'}

  TinyCorpus(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  source = sources.open_source('tfds:tiny_corpus', 'validation', tfds_data_dir=str(tmp_path))
  assert sorted(d.text for d in source.documents()) == [f'def f{i}():\n    return {i}\n' for i in range(3)]
  manifest = prepare_lib.prepare('tfds:tiny_corpus:1.0.0', tok_path, tmp_path / 'tfds_shards', split='train',
                                 tfds_data_dir=str(tmp_path), progress=False, workers=1)
  assert manifest['documents'] == 12
  with pytest.raises(UsageError, match="split 'test' not found"):
    sources.open_source('tfds:tiny_corpus', 'test', tfds_data_dir=str(tmp_path))
  with pytest.raises(UsageError, match="not found"):
    sources.open_source('tfds:no_such_dataset', 'train', tfds_data_dir=str(tmp_path))


@pytest.mark.parametrize('spec,message', [
    ('/nonexistent/*.py', 'the glob matches no files'),
    ('/nonexistent/dir', 'not python_stdlib, tfds:NAME'),
    ('@/nonexistent.list', 'no such list file'),
    ('tfds:', 'expected tfds:NAME'),
])
def test_bad_sources(spec, message):
  with pytest.raises(UsageError, match=message):
    sources.open_source(spec)


def test_bad_jsonl_and_vocab_mismatch(tmp_path, tok_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('\n'.join(json.dumps({'prompt': 'x', 'answer': 'y'}) for _ in range(40)) + '\n')
  with pytest.raises(UsageError, match=r'bad.jsonl:\d+: expected a JSON object with string fields "prompt"'):
    list(sources.open_source(str(path)).documents())
  with pytest.raises(UsageError, match=r"model.vocab_size=256: smaller than the tokenizer's 512 pieces"):
    tokenizer_lib.check_vocab(tokenizer_lib.load(tok_path), 256)


def test_command_lines(tmp_path, corpus):
  run = lambda module, *a: subprocess.run([sys.executable, '-m', module, *a], cwd=ROOT, capture_output=True,
                                          text=True, timeout=300)
  tok = tmp_path / 'tok.model'
  result = run('layerskip_jax.data.tokenizer', 'train', '--source', str(corpus), '--vocab_size', '400',
               '--out', str(tok))
  assert result.returncode == 0 and 'wrote' in result.stdout, result.stderr
  result = run('layerskip_jax.data.prepare', '--source', str(corpus), '--tokenizer', str(tok), '--out',
               str(tmp_path / 'shards'), '--workers', '1')
  assert result.returncode == 0, result.stderr
  assert 'files skipped' in result.stdout and result.stderr.count('warning: skipped') == 2
  bad = run('layerskip_jax.data.prepare', '--source', str(tmp_path / 'nothing' / '*.txt'), '--tokenizer',
            str(tok), '--out', str(tmp_path / 'x'))
  assert bad.returncode == 2 and 'the glob matches no files' in bad.stderr and 'Traceback' not in bad.stderr
  small = run('layerskip_jax.data.tokenizer', 'train', '--source', str(corpus), '--vocab_size', '100',
              '--out', str(tmp_path / 't.model'))
  assert small.returncode == 2 and 'must be at least 261' in small.stderr


TWO_PROCESS_ROWS = textwrap.dedent('''
    import os, json, jax, numpy as np
    jax.distributed.initialize(os.environ['LS_COORDINATOR'], int(os.environ['LS_NUM_PROCESSES']),
                               int(os.environ['LS_PROCESS_ID']))
    from layerskip_jax import sharding
    from layerskip_jax.data import loader
    mesh = sharding.make_mesh()  # fsdp over all 4 devices of the 2 processes
    it = iter(loader.dataset(os.environ['LS_SHARDS'], 32, 8, seed=1))
    for step in range(3):
      batch = loader.to_global_array(next(it), mesh)
      rows = {}
      for shard in batch['inputs'].addressable_shards:
        rows[shard.index[0].start] = np.asarray(shard.data).tolist()
      print(json.dumps({'step': step, 'rows': rows}))
''')


def test_two_processes_get_the_rows_of_the_single_process_batch(shards):
  outputs = run_processes(TWO_PROCESS_ROWS, extra_env={'LS_SHARDS': str(shards)})
  it = iter(loader.dataset(shards, 32, 8, seed=1))
  expected = [next(it)['inputs'] for _ in range(3)]
  seen = [{} for _ in range(3)]
  for out in outputs:
    for line in out.splitlines():
      record = json.loads(line)
      for start, rows in record['rows'].items():
        assert int(start) not in seen[record['step']]  # each row lives on exactly one device
        seen[record['step']][int(start)] = rows
  for step in range(3):
    rebuilt = np.concatenate([np.asarray(seen[step][k]) for k in sorted(seen[step])])
    np.testing.assert_array_equal(rebuilt, expected[step])

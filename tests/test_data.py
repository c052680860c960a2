"""The data pipeline: sources, tokenizer training, prepare (manifest, idempotence), the grain loader."""

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT, run_processes

from layerskip_jax.data import index as index_lib, loader, prepare as prepare_lib, sources, tokenizer as tokenizer_lib
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

  docs = [
    prepare_lib.decode_record(r)[0]
    for s in manifest['shards']
    for r in ArrayRecordReader(str(shards / s['file'])).read_all()
  ]
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


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  """A TFDS dataset prepared on disk (ArrayRecord files): tiny_corpus, 12 train and 3 validation records."""
  import tensorflow_datasets as tfds

  class TinyCorpus(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(12), 'validation': self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {'text': f'def f{i}():\n    return {i}\n' * (i + 1)}

  directory = tmp_path_factory.mktemp('tfds')
  TinyCorpus(data_dir=str(directory), file_format='array_record').download_and_prepare()
  return directory


def _records(directory):
  files, _ = prepare_lib.shard_files(directory)
  from array_record.python.array_record_module import ArrayRecordReader

  return [r for f in files for r in ArrayRecordReader(f).read_all()]


def test_tfds_round_trip(tmp_path, tok_path, tfds_dir):
  source = sources.open_source('tfds:tiny_corpus', 'validation', tfds_data_dir=str(tfds_dir))
  assert sorted(d.text for d in source.documents()) == [f'def f{i}():\n    return {i}\n' * (i + 1) for i in range(3)]
  manifest = prepare_lib.prepare(
    'tfds:tiny_corpus:1.0.0',
    tok_path,
    tmp_path / 'tfds_shards',
    split='train',
    tfds_data_dir=str(tfds_dir),
    progress=False,
    workers=1,
  )
  assert manifest['documents'] == 12
  with pytest.raises(UsageError, match="split 'test' not found"):
    sources.open_source('tfds:tiny_corpus', 'test', tfds_data_dir=str(tfds_dir))
  with pytest.raises(UsageError, match="not found"):
    sources.open_source('tfds:no_such_dataset', 'train', tfds_data_dir=str(tfds_dir))


def test_a_tfds_split_prepared_in_parts_is_the_one_prepare(tmp_path, tok_path, tfds_dir):
  """N machines each tokenize a contiguous share of the records (--part I/N), --merge_parts joins them: the same
  records in the same order, the same manifest counts and source, the same batches."""
  whole = tmp_path / 'whole'
  one = prepare_lib.prepare('tfds:tiny_corpus', tok_path, whole, tfds_data_dir=str(tfds_dir), progress=False, workers=1)
  out = tmp_path / 'parts'
  run = lambda *a: subprocess.run(
    [
      sys.executable,
      '-m',
      'layerskip_jax.data.prepare',
      '--tokenizer',
      str(tok_path),
      '--source',
      'tfds:tiny_corpus',
      '--tfds_data_dir',
      str(tfds_dir),
      '--workers',
      '1',
      '--out',
      str(out),
      *a,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  shares = []
  for i in range(3):
    result = run('--part', f'{i}/3')
    assert result.returncode == 0, result.stderr
    shares.append(prepare_lib.read_manifest(prepare_lib.part_directory(out, i, 3))['documents'])
  assert shares == [4, 4, 4]
  bad = run('--part', '3/3')
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith(
    "--part=3/3: expected I/N with 0 <= I < N (this machine's share of N), e.g. 0/8"
  )
  merged = subprocess.run(
    [
      sys.executable,
      '-m',
      'layerskip_jax.data.prepare',
      '--out',
      str(out),
      '--merge_parts',
      '3',
      '--index_seq_len',
      '32',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert merged.returncode == 0 and 'chunk index for seq_len 32' in merged.stdout, merged.stderr
  manifest = prepare_lib.read_manifest(out)
  assert {k: manifest[k] for k in ('source', 'documents', 'tokens', 'tokenizer_sha256')} == {
    k: one[k] for k in ('source', 'documents', 'tokens', 'tokenizer_sha256')
  }
  assert _records(out) == _records(whole) and not prepare_lib.part_directory(out, 0, 3).exists()
  for a, b in zip(loader.dataset(whole, 32, 2, seed=0, repeat=False), loader.dataset(out, 32, 2, seed=0, repeat=False)):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  assert (
    prepare_lib.prepare('tfds:tiny_corpus', tok_path, out, tfds_data_dir=str(tfds_dir), progress=False) == manifest
  )  # the merged directory is up to date for the one-machine command


TFDS_PROCESSES = textwrap.dedent('''
    import os, jax
    jax.distributed.initialize(os.environ['LS_COORDINATOR'], int(os.environ['LS_NUM_PROCESSES']),
                               int(os.environ['LS_PROCESS_ID']))
    from layerskip_jax import config as config_lib
    from layerskip_jax.data.cache import ensure_prepared
    env = os.environ
    config = config_lib.load('tiny', ['data.source=tfds:tiny_corpus', f'data.tfds_data_dir={env["LS_TFDS"]}',
                                      f'data.tokenizer={env["LS_TOK"]}', f'data.cache_dir={env["LS_CACHE"]}',
                                      'data.train_split=train', 'data.eval_split=validation', 'train.seq_len=32'])
    prepared = ensure_prepared(config)
    print('train', prepared.train)
''')


def test_training_processes_prepare_a_tfds_split_in_parts(tmp_path, tok_path, tfds_dir):
  outputs = run_processes(
    TFDS_PROCESSES,
    2,
    devices_per_process=1,
    extra_env={'LS_TFDS': str(tfds_dir), 'LS_TOK': str(tok_path), 'LS_CACHE': str(tmp_path / 'cache')},
  )
  for process, out in enumerate(outputs):  # each process read only its half of each split's records
    assert (
      f'process {process}: tfds:tiny_corpus:train@{tfds_dir} part {process} of 2 (records '
      f'{6 * process}-{6 * process + 5} of 12): 6 documents' in out
    ), out
  train = pathlib.Path(outputs[0].split('train ')[-1].strip())
  whole = prepare_lib.prepare(
    'tfds:tiny_corpus', tok_path, tmp_path / 'whole', tfds_data_dir=str(tfds_dir), progress=False, workers=1
  )
  assert (
    _records(train) == _records(tmp_path / 'whole') and prepare_lib.read_manifest(train)['source'] == whole['source']
  )
  assert index_lib.chunks_file(prepare_lib.shard_files(train)[0][0], 32).is_file()  # indexed before training


@pytest.mark.parametrize(
  'spec,message',
  [
    ('/nonexistent/*.py', 'the glob matches no files'),
    ('/nonexistent/dir', 'not python_stdlib, tfds:NAME'),
    ('@/nonexistent.list', 'no such list file'),
    ('tfds:', 'expected tfds:NAME'),
  ],
)
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
  run = lambda module, *a: subprocess.run(
    [sys.executable, '-m', module, *a], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  tok = tmp_path / 'tok.model'
  result = run(
    'layerskip_jax.data.tokenizer', 'train', '--source', str(corpus), '--vocab_size', '400', '--out', str(tok)
  )
  assert result.returncode == 0 and 'wrote' in result.stdout, result.stderr
  result = run(
    'layerskip_jax.data.prepare',
    '--source',
    str(corpus),
    '--tokenizer',
    str(tok),
    '--out',
    str(tmp_path / 'shards'),
    '--workers',
    '1',
  )
  assert result.returncode == 0, result.stderr
  assert 'files skipped' in result.stdout and result.stderr.count('warning: skipped') == 2
  bad = run(
    'layerskip_jax.data.prepare',
    '--source',
    str(tmp_path / 'nothing' / '*.txt'),
    '--tokenizer',
    str(tok),
    '--out',
    str(tmp_path / 'x'),
  )
  assert bad.returncode == 2 and 'the glob matches no files' in bad.stderr and 'Traceback' not in bad.stderr
  small = run(
    'layerskip_jax.data.tokenizer',
    'train',
    '--source',
    str(corpus),
    '--vocab_size',
    '100',
    '--out',
    str(tmp_path / 't.model'),
  )
  assert small.returncode == 2 and 'must be at least 261' in small.stderr


PROCESS_ROWS = textwrap.dedent('''
    import os, json, jax, numpy as np
    jax.distributed.initialize(os.environ['LS_COORDINATOR'], int(os.environ['LS_NUM_PROCESSES']),
                               int(os.environ['LS_PROCESS_ID']))
    from layerskip_jax import sharding
    from layerskip_jax.data import loader
    mesh = sharding.make_mesh()  # fsdp over the devices of all processes
    it = iter(loader.dataset(os.environ['LS_SHARDS'], 32, 8, seed=1, rows=loader.Rows.of_process(mesh, 8)))
    for step in range(8):
      batch = loader.to_global_array(next(it), mesh, it.rows)
      rows = {}
      for shard in batch['inputs'].addressable_shards:
        rows[shard.index[0].start] = np.asarray(shard.data).tolist()
      print(json.dumps({'step': step, 'rows': rows}))
    print(json.dumps({'records_read': it.source.records_read, 'state': it.get_state()}))
''')


@pytest.mark.parametrize('processes,devices', [(2, 2), (4, 1)])
def test_each_process_reads_only_its_rows_of_the_single_process_batch(shards, processes, devices):
  """N processes see the global batches of one process, and each reads about 1/N of the records it reads."""
  outputs = run_processes(PROCESS_ROWS, processes, devices_per_process=devices, extra_env={'LS_SHARDS': str(shards)})
  it = iter(loader.dataset(shards, 32, 8, seed=1))
  expected = [next(it)['inputs'] for _ in range(8)]
  seen = [{} for _ in range(8)]
  read, states = [], []
  for out in outputs:
    for line in out.splitlines():
      record = json.loads(line)
      if 'records_read' in record:
        read.append(record['records_read'])
        states.append(record['state'])
        continue
      for start, rows in record['rows'].items():
        assert int(start) not in seen[record['step']]  # each row lives on exactly one device
        seen[record['step']][int(start)] = rows
  for step in range(8):
    rebuilt = np.concatenate([np.asarray(seen[step][k]) for k in sorted(seen[step])])
    np.testing.assert_array_equal(rebuilt, expected[step])
  assert all(state == it.get_state() for state in states)  # one position in the global stream, on every process
  total = it.source.records_read
  assert sum(read) == total and total >= 8 * 8
  assert all(abs(r - total / processes) <= 0.25 * total / processes for r in read), (read, total)


def _grain_first_fit(shards, seq_len, batch_size, *, seed=0, shuffle=True, repeat=True):
  """The pipeline of earlier versions (grain's first-fit packing over the chunk stream): the reference stream."""
  import grain

  files, _ = prepare_lib.shard_files(shards)
  source = loader.ChunkSource(files, seq_len)
  ds = grain.MapDataset.source(source)
  ds = ds.shuffle(seed=seed) if shuffle else ds
  ds = ds.repeat() if repeat else ds
  packed = grain.experimental.FirstFitPackIterDataset(
    ds.to_iter_dataset(),
    length_struct={k: seq_len for k in ('inputs', 'targets', 'loss_mask')},
    num_packing_bins=batch_size,
    shuffle_bins=False,
  )
  return iter(packed.batch(batch_size, drop_remainder=True))


def _same_batch(old, new):
  names = {
    'inputs': 'inputs',
    'targets': 'targets',
    'loss_mask': 'loss_mask',
    'segment_ids': 'inputs_segment_ids',
    'positions': 'inputs_positions',
  }
  for key, old_key in names.items():
    np.testing.assert_array_equal(np.asarray(old[old_key]).astype(new[key].dtype), new[key], err_msg=key)


def test_the_stream_is_grain_first_fit_and_old_iterator_states_resume_it(shards):
  """The planner packs exactly as grain's first fit did, across epochs and to the end of a finite pass, and a grain
  iterator state saved by earlier versions resumes at the same batch."""
  reference, ours = _grain_first_fit(shards, 4096, 3), iter(loader.dataset(shards, 4096, 3))
  epoch = len(ours.source)
  for step in range(80):
    _same_batch(next(reference), next(ours))
    if step == 10:
      legacy = reference.get_state()
  assert ours.get_state()['next_chunk'] > epoch  # the comparison crossed an epoch: reshuffled the same way
  resumed = iter(loader.dataset(shards, 4096, 3))
  resumed.set_state(json.loads(json.dumps(legacy)))
  assert resumed.get_state() == {'next_chunk': legacy['parent']['next_index'], 'batches': 11}
  reference = _grain_first_fit(shards, 4096, 3)
  for _ in range(11):
    next(reference)
  for _ in range(3):
    _same_batch(next(reference), next(resumed))
  finite = list(loader.dataset(shards, 128, 4, shuffle=False, repeat=False))
  old = list(_grain_first_fit(shards, 128, 4, shuffle=False, repeat=False))
  assert len(finite) == len(old) > 10
  for a, b in zip(old, finite):
    _same_batch(a, b)


def test_threads_read_the_same_batches(shards):
  ours = iter(loader.dataset(shards, 64, 4, seed=2, num_workers=2))
  plain = iter(loader.dataset(shards, 64, 4, seed=2))
  try:
    for _ in range(6):
      a, b = next(ours), next(plain)
      assert all(np.array_equal(a[k], b[k]) for k in a)
    assert ours.get_state() == plain.get_state()
    ours.set_state({'next_chunk': 5, 'batches': 1})
    plain.set_state({'next_chunk': 5, 'batches': 1})
    a, b = next(ours), next(plain)
    assert all(np.array_equal(a[k], b[k]) for k in a)
  finally:
    ours.close()


def test_the_chunk_index_is_written_once_and_memory_mapped(shards, tmp_path, capsys):
  files, _ = prepare_lib.shard_files(shards)
  lengths = np.concatenate([np.load(index_lib.lengths_file(f)) for f in files])
  seq_len = 48
  index = index_lib.ChunkIndex(files, seq_len)
  written = [index_lib.chunks_file(f, seq_len) for f in files]
  assert all(p.is_file() for p in written) and all(isinstance(a, np.memmap) for a in index._first + index._lengths)
  # the index of earlier versions, built in memory: one (record, first pair) entry per chunk
  chunks = -(-np.maximum(lengths - 1, 0) // seq_len)
  record = np.repeat(np.arange(len(lengths)), chunks)
  start = (np.arange(len(record)) - np.repeat(np.cumsum(chunks) - chunks, chunks)) * seq_len
  assert len(index) == len(record)
  for c in range(len(record)):
    assert index.locate(c) == (record[c], start[c], min(seq_len, lengths[record[c]] - 1 - start[c]))
  mtimes = [p.stat().st_mtime_ns for p in written]
  index_lib.ChunkIndex(files, seq_len)
  assert [p.stat().st_mtime_ns for p in written] == mtimes  # opened again: read, not rebuilt
  last = index.locate(len(record) - 1)
  del index
  written[0].unlink()  # not overwritten in place: that would change the pages the index above maps
  written[0].write_bytes(b'damaged')
  assert index_lib.ChunkIndex(files, seq_len).locate(len(record) - 1) == last
  assert 'unreadable chunk index' in capsys.readouterr().err
  assert np.load(written[0]).shape == (prepare_lib.read_manifest(shards)['shards'][0]['documents'] + 1,)  # rebuilt


def test_a_directory_that_cannot_be_written_gets_its_index_in_memory(shards, monkeypatch, capsys):
  files, _ = prepare_lib.shard_files(shards)
  monkeypatch.setattr(index_lib, '_save_atomic', lambda path, array: False)
  index = index_lib.ChunkIndex(files, 40)
  assert not any(index_lib.chunks_file(f, 40).exists() for f in files)
  assert not any(isinstance(a, np.memmap) for a in index._first)
  assert capsys.readouterr().err.count('is not writable: the chunk index is held in memory') == 1
  assert index.locate(len(index) - 1)[2] > 0


def test_a_corpus_smaller_than_one_global_batch_is_refused(shards):
  chunks = len(loader.ChunkSource(prepare_lib.shard_files(shards)[0], 100_000))
  with pytest.raises(
    UsageError,
    match=rf'^{shards}: holds {chunks} chunks of at most 100000 tokens, fewer than one '
    rf'global batch of {chunks + 1} rows; use a larger corpus or a smaller train.batch_size$',
  ):
    loader.dataset(shards, 100_000, chunks + 1)


def test_data_bench_simulates_processes_and_measures_the_index(tmp_path):
  run = lambda *a: subprocess.run(
    [sys.executable, '-m', 'layerskip_jax.data.bench', *a, f'--config.data.cache_dir={tmp_path / "cache"}'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  out = tmp_path / 'bench.json'
  result = run(
    '--batches',
    '3',
    '--processes',
    '4',
    '--train_steps',
    '0',
    '--target',
    'tiny',
    '--workers',
    '0,1',
    '--gpus_per_host',
    '2',
    '--index_tokens',
    '3e7',
    '--index_seq_len',
    '512',
    '--step_tokens_per_sec',
    '1000',
    '--json',
    str(out),
  )
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(out.read_text())
  assert len(report['loader_tokens_per_sec_per_process']) == 4 and report['plan_us_per_chunk'] > 0
  assert report['loader_over_train'] == min(report['loader_tokens_per_sec_per_process']) * 4 / 1000
  assert set(report['target']['by_workers']) == {'0', '1'} and report['target']['need'] == 80_000
  assert 'one host keeps 2 GPUs fed' in result.stdout
  memory = {r['method'].split(' ')[0]: r for r in report['index']}
  assert memory['in_memory']['chunks'] == memory['mapped']['chunks'] > 25_000
  assert memory['mapped']['anon_mib'] < memory['in_memory']['anon_mib']
  bad = run('--processes', '3', '--json', str(tmp_path / 'x.json'))
  assert bad.returncode == 2 and bad.stderr.strip().endswith(
    '--processes=3: must divide train.batch_size=16 (each process reads whole rows)'
  )
  assert not (tmp_path / 'x.json').exists()
  nothing = run('--batches', '0', '--step_tokens_per_sec', '5')  # no loader to compare
  assert nothing.returncode == 2 and 'give --batches of at least 1' in nothing.stderr.strip().splitlines()[-1]
  moved = run('--train_steps', '6')  # the step is timed by train.bench --what input now
  assert moved.returncode == 2 and '--train_steps=6: the train step is timed' in moved.stderr.strip().splitlines()[-1]

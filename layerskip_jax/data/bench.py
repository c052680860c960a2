"""What the loader delivers per process, against what the train step consumes; and what its chunk index costs.

    python -m layerskip_jax.data.bench [--config tiny] [--batches 300] [--processes 4] [--json data_bench.json]
    python -m layerskip_jax.data.bench --step_tokens_per_sec 50000   # against a train step's consumption
    python -m layerskip_jax.data.bench --target llama3_2_1b --gpus_per_host 8 --tokens_per_gpu 40000 --workers 0,1,2
    python -m layerskip_jax.data.bench --index_tokens 1e10 --batches 0

`--processes N` simulates N hosts: each reads only its rows of every global batch (the rows of its devices), as the
trainer's processes do, and the numbers are per process (one process measured at a time: hosts have their own
cores). `--target` measures the loader at another preset's sequence length and global batch (on this config's
data) and reports whether one host keeps `--gpus_per_host` accelerators fed at `--tokens_per_gpu` tokens/s each, and
with how many reader threads (data.num_workers). `--index_tokens` writes a synthetic prepared directory of that many
tokens (lengths sidecars only, documents of about 1,000 tokens) and measures, each in a fresh process, the memory
and time to open it: the in-memory chunk index of earlier versions against the memory-mapped one.

The train step's consumption is passed in (`--step_tokens_per_sec`): data sits below train, so the step is timed
where both are visible, by `python -m layerskip_jax.train.bench --what input` (the loader against the compiled step
of the same config, in one run).
"""

from __future__ import annotations

import json
import multiprocessing
import pathlib
import tempfile
import time

import numpy as np
from absl import flags

from layerskip_jax import cli, outputs
from layerskip_jax import config as config_lib
from layerskip_jax.data import index as index_lib
from layerskip_jax.data import loader
from layerskip_jax.data.throughput import loader_rate
from layerskip_jax.data.cache import ensure_prepared
from layerskip_jax.data.prepare import FORMAT, MANIFEST
from layerskip_jax.errors import UsageError

flags.DEFINE_string('config', 'tiny', 'config whose data, batch and sequence length are measured')
flags.DEFINE_integer('batches', 300, 'global batches each simulated process reads (0: skip the loader)')
flags.DEFINE_integer('processes', 1, 'simulated processes sharing each global batch (must divide the batch size)')
flags.DEFINE_float(
  'step_tokens_per_sec',
  0,
  'tokens/s the train step consumes, to compare the loader with (0: no '
  'comparison; train.bench --what input measures both)',
)
flags.DEFINE_integer('train_steps', 0, 'no longer used here (0 only): the step is timed by train.bench --what input')
flags.DEFINE_string('target', None, 'preset whose seq_len and batch_size the headroom is measured at')
flags.DEFINE_integer('gpus_per_host', 8, 'accelerators one host feeds (with --target)')
flags.DEFINE_float('tokens_per_gpu', 40_000, 'tokens/s each accelerator trains (with --target)')
flags.DEFINE_list('workers', ['0', '1', '2'], 'reader threads (data.num_workers) to try (with --target)')
flags.DEFINE_float('index_tokens', 0, 'tokens of the synthetic corpus whose index is measured (0: skip)')
flags.DEFINE_integer('index_seq_len', 8192, 'sequence length of the measured index')
flags.DEFINE_string('json', None, 'write the results here')

DOCUMENT_TOKENS = 1000  # mean document length of the synthetic corpus
SHARD_TOKENS = 16 << 20  # as prepare writes them


def _plan_cost(directory, seq_len: int, batch_size: int, batches: int, seed: int) -> tuple[float, float]:
  """(microseconds per chunk, chunks per row) of planning global batches: the part of each process's work that
  grows with the global batch, not with its own rows."""
  it = iter(loader.dataset(directory, seq_len, batch_size, seed=seed, rows=loader.Rows(np.arange(1), batch_size)))
  start = position = 0
  begin = time.perf_counter()
  for _ in range(batches):
    position = it.plan(position)[1]
  return (time.perf_counter() - begin) / (position - start) * 1e6, (position - start) / (batches * batch_size)


def _process_rows(process: int, processes: int, batch_size: int) -> loader.Rows:
  per = batch_size // processes
  return loader.Rows(np.arange(process * per, (process + 1) * per), batch_size)


def _write_synthetic(directory: pathlib.Path, tokens: float, seed: int = 0) -> dict:
  """A prepared directory of lengths sidecars only (no records): documents of ~DOCUMENT_TOKENS tokens."""
  rng = np.random.default_rng(seed)
  shards, total, documents = [], 0, 0
  while total < tokens:
    lengths = np.maximum(
      rng.lognormal(np.log(DOCUMENT_TOKENS) - 0.5, 1.0, SHARD_TOKENS // DOCUMENT_TOKENS).astype(np.int64), 2
    )
    name = f'shard-{len(shards):05d}.array_record'
    np.save(index_lib.lengths_file(directory / name), lengths)
    shards.append({'file': name, 'documents': len(lengths), 'tokens': int(lengths.sum())})
    total, documents = total + int(lengths.sum()), documents + len(lengths)
  manifest = {
    'format': FORMAT,
    'source': 'synthetic',
    'tokenizer_sha256': '',
    'tokenizer_vocab_size': 0,
    'documents': documents,
    'tokens': total,
    'skipped_files': 0,
    'shards': shards,
  }
  (directory / MANIFEST).write_text(json.dumps(manifest))
  return manifest


def _memory() -> dict[str, float]:
  """This process's resident memory (MiB): all, anonymous (its own), file-backed (mapped pages), and the peak."""
  fields = {}
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    key, _, value = line.partition(':')
    if key in ('VmRSS', 'RssAnon', 'RssFile', 'VmHWM'):
      fields[key] = int(value.split()[0]) / 1024
  return fields


def _open_index(directory: str, seq_len: int, method: str) -> dict:
  """In a fresh process: open the synthetic directory's chunk index by `method` and locate 10,000 random chunks."""
  files = [
    str(pathlib.Path(directory) / s['file'])
    for s in json.loads((pathlib.Path(directory) / MANIFEST).read_text())['shards']
  ]
  before = _memory()
  start = time.perf_counter()
  if method == 'in_memory':  # the index of earlier versions: two int64 entries per chunk, in every process
    lengths = np.concatenate([np.load(index_lib.lengths_file(f)) for f in files])
    chunks = -(-np.maximum(lengths - 1, 0) // seq_len)
    record = np.repeat(np.arange(len(lengths)), chunks)
    first = (np.arange(len(record)) - np.repeat(np.cumsum(chunks) - chunks, chunks)) * seq_len
    opened = time.perf_counter() - start
    picks = np.random.default_rng(0).integers(0, len(record), 10_000)
    begin = time.perf_counter()
    _ = [(int(record[c]), int(first[c])) for c in picks]
    count = len(record)
  else:
    index = index_lib.ChunkIndex(files, seq_len)
    opened = time.perf_counter() - start
    picks = np.random.default_rng(0).integers(0, len(index), 10_000)
    begin = time.perf_counter()
    _ = [index.locate(int(c)) for c in picks]
    count = len(index)
  locate_us = (time.perf_counter() - begin) / len(picks) * 1e6
  after = _memory()
  return {
    'method': method,
    'chunks': count,
    'open_seconds': opened,
    'locate_us': locate_us,
    'rss_mib': after['VmRSS'] - before['VmRSS'],
    'anon_mib': after['RssAnon'] - before['RssAnon'],
    'file_mib': after['RssFile'] - before['RssFile'],
    'peak_rss_mib': after['VmHWM'],
  }


def _index_report(tokens: float, seq_len: int) -> list[dict]:
  results = []
  with tempfile.TemporaryDirectory(prefix='layerskip_index_') as tmp:
    manifest = _write_synthetic(pathlib.Path(tmp), tokens)
    print(
      f'synthetic corpus: {manifest["tokens"] / 1e9:.1f}B tokens, {manifest["documents"]:,} documents, '
      f'{len(manifest["shards"])} shards'
    )
    context = multiprocessing.get_context('spawn')
    for method in ('in_memory', 'mapped (first open: builds the index files)', 'mapped'):
      with context.Pool(1) as pool:
        result = pool.apply(_open_index, (tmp, seq_len, method.split(' ')[0]))
      result['method'] = method
      results.append(result)
      print(
        f'index {method}: open {result["open_seconds"]:.2f}s, resident +{result["rss_mib"]:,.0f} MiB '
        f'(own {result["anon_mib"]:,.0f}, mapped {result["file_mib"]:,.0f}), peak {result["peak_rss_mib"]:,.0f} '
        f'MiB, {result["locate_us"]:.1f} us per chunk located, {result["chunks"]:,} chunks'
      )
  return results


def main(args: cli.Args) -> None:
  f = flags.FLAGS
  if f.train_steps:
    raise UsageError(
      f'--train_steps={f.train_steps}: the train step is timed where data and train are both visible, '
      'by python -m layerskip_jax.train.bench --what input; give its tokens/s as --step_tokens_per_sec'
    )
  for name, value, least in (
    ('batches', f.batches, 0),
    ('processes', f.processes, 1),
    ('gpus_per_host', f.gpus_per_host, 1),
    ('index_seq_len', f.index_seq_len, 1),
  ):
    if value < least:
      raise UsageError(f'--{name}={value}: must be at least {least}')
  if f.tokens_per_gpu <= 0:
    raise UsageError(f'--tokens_per_gpu={f.tokens_per_gpu:g}: must be positive')
  for name in ('index_tokens', 'step_tokens_per_sec'):
    if f[name].value < 0:
      raise UsageError(f'--{name}={f[name].value:g}: must be positive or 0')
  if f.step_tokens_per_sec and not f.batches:
    raise UsageError(
      f'--step_tokens_per_sec={f.step_tokens_per_sec:g}: compares the loader, which --batches=0 skips; '
      'give --batches of at least 1'
    )
  if not all(w.isdigit() for w in f.workers):
    raise UsageError(f'--workers={",".join(f.workers)}: give thread counts (0 or more), e.g. 0,1,2')
  json_path = outputs.check_file('--json', f.json)  # before the benchmark, not after it
  config = config_lib.load(f.config, args.config_overrides)
  b, t = config.train.batch_size, config.train.seq_len
  if b % f.processes:
    raise UsageError(f'--processes={f.processes}: must divide train.batch_size={b} (each process reads whole rows)')
  target = config_lib.load(f.target, []) if f.target else None
  report: dict = {'config': f.config, 'batch': b, 'seq_len': t, 'processes': f.processes}
  prepared = ensure_prepared(config) if f.batches else None
  if f.batches:
    rates = [
      loader_rate(
        prepared.train, t, b, _process_rows(p, f.processes, b), f.batches, config.train.seed, config.data.num_workers
      )
      for p in range(f.processes)
    ]
    plan_us, chunks_per_row = _plan_cost(prepared.train, t, b, f.batches, config.train.seed)
    report.update(
      loader_tokens_per_sec_per_process=rates,
      loader_tokens_per_sec=min(rates) * f.processes,
      plan_us_per_chunk=plan_us,
      chunks_per_row=chunks_per_row,
    )
    print(
      f'loader: {min(rates):,.0f}-{max(rates):,.0f} tokens/s per process, each reading {b // f.processes} of '
      f'the {b} rows of {f.batches} batches of {b} x {t} ({f.processes} process{"es" * (f.processes > 1)})'
    )
    print(
      f'plan: {plan_us:.1f} us per chunk of the global batch ({chunks_per_row:.2f} chunks per row), on every '
      'process: the one part of its work that grows with the global batch rather than with its rows'
    )
  if f.step_tokens_per_sec and f.batches:
    report['train_step_tokens_per_sec'] = f.step_tokens_per_sec
    report['loader_over_train'] = min(rates) * f.processes / f.step_tokens_per_sec
    print(
      f'train step (given): {f.step_tokens_per_sec:,.0f} tokens/s -> the loader delivers '
      f'{report["loader_over_train"]:,.0f}x that'
    )
  if target is not None:
    tb, tt = target.train.batch_size, target.train.seq_len
    need = f.gpus_per_host * f.tokens_per_gpu
    rows_per_host = f.gpus_per_host * max(1, tb // f.gpus_per_host)  # one host holding the preset's batch
    rows = loader.Rows.all(rows_per_host)
    batches = max(1, min(40, f.batches or 40))
    prepared = prepared or ensure_prepared(config)
    headroom = {}
    for workers in (int(w) for w in f.workers):
      rate = loader_rate(prepared.train, tt, rows.size, rows, batches, config.train.seed, workers)
      headroom[workers] = {'tokens_per_sec': rate, 'headroom': rate / need}
      print(
        f'{f.target} (seq_len {tt}, {rows_per_host} rows per host): {rate:,.0f} tokens/s with {workers} reader '
        f'thread(s) = {rate / need:.1f}x what {f.gpus_per_host} GPUs at {f.tokens_per_gpu:,.0f} tokens/s consume '
        f'({need:,.0f})'
      )
    fed = [w for w, r in headroom.items() if r['headroom'] >= 1]
    report['target'] = {
      'preset': f.target,
      'seq_len': tt,
      'rows_per_host': rows_per_host,
      'gpus_per_host': f.gpus_per_host,
      'tokens_per_gpu': f.tokens_per_gpu,
      'need': need,
      'by_workers': headroom,
      'fed_with_workers': min(fed) if fed else None,
    }
    print(
      f'one host keeps {f.gpus_per_host} GPUs fed: '
      + (f'yes, with {min(fed)} reader thread(s)' if fed else 'no, with any of the thread counts tried')
    )
  if f.index_tokens:
    report['index'] = _index_report(f.index_tokens, f.index_seq_len)
  if json_path:
    outputs.write_text(json_path, json.dumps(report, indent=2))


if __name__ == '__main__':
  cli.run(main)

"""Fault injection (issue 14): what a wrong path, a crash, a full disk or a damaged file does to each command.

Data-harming cases first: an output that is an input, `--overwrite` of something that is not a previous output,
a write that fails halfway. Then crashes and resume (a torn metrics line, a finished run rerun, an interrupted
save, a full disk), then refusals that must change nothing, then damaged inputs. Every refusal is checked for
what it leaves behind, and the command-line ones for the one-line contract (`error: ...`, exit 2, no traceback).
"""

import errno
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, host_devices_env
from flax import nnx

from layerskip_jax import checkpoint_dir, config as config_lib, outputs
from layerskip_jax.convert import export_hf, hf, import_hf
from layerskip_jax.errors import UsageError
from layerskip_jax.model import ModelConfig, create
from layerskip_jax.train import trainer
from layerskip_jax.train.metrics import MetricsWriter

SMALL = [
  '--config.model.hidden_size=64',
  '--config.model.num_hidden_layers=2',
  '--config.model.num_attention_heads=4',
  '--config.model.num_key_value_heads=2',
  '--config.model.intermediate_size=96',
  '--config.train.seq_len=64',
  '--config.train.batch_size=4',
  '--config.train.eval_every=0',
  '--config.logging.progress_bar=false',
]


def _config(*extra):
  return config_lib.load('tiny', [*SMALL, *extra])


def _snapshot(directory: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob('*')) if p.is_file()}


def _leftovers(directory: pathlib.Path) -> list[str]:
  return [p.name for p in directory.iterdir() if p.name.startswith('.') and ('.tmp-' in p.name or '.old-' in p.name)]


def _cli(*args, env=None):
  return subprocess.run(
    [sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env or host_devices_env(1)
  )


def _one_line_error(result, *fragments, status=2):
  assert result.returncode == status, (result.returncode, result.stderr[-2000:])
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-2000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


@pytest.fixture(scope='module')
def made(tmp_path_factory):
  """A converted-style checkpoint of a 2-layer model, and its Hugging Face export (no torch needed)."""
  root = tmp_path_factory.mktemp('faults')
  config = _config()
  params = nnx.to_pure_dict(nnx.state(create(ModelConfig.from_config(config.model), seed=0), nnx.Param))
  checkpoint_dir.write_params_dir(root / 'ckpt', config, params)
  export_hf(root / 'ckpt', root / 'hf')
  return root


@pytest.fixture
def work(made, tmp_path):
  """Private copies of the checkpoint and the export (tests damage them)."""
  shutil.copytree(made / 'ckpt', tmp_path / 'ckpt')
  shutil.copytree(made / 'hf', tmp_path / 'hf')
  return tmp_path


# --- never lose data ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('where', ['same', 'parent', 'inside', 'step_dir'])
def test_export_never_replaces_its_input(work, where):
  ckpt = work / 'ckpt'
  out = {'same': ckpt, 'parent': work, 'inside': ckpt / 'checkpoints', 'step_dir': ckpt / 'checkpoints' / '0'}[where]
  before = _snapshot(work)
  with pytest.raises(UsageError, match='the input --ckpt='):
    export_hf(ckpt, out, overwrite=True)
  with pytest.raises(UsageError, match='the input --ckpt='):  # the checkpoint named by its step directory
    export_hf(ckpt / 'checkpoints' / '0', out, overwrite=True)
  assert _snapshot(work) == before


def test_import_never_replaces_its_input(work):
  (work / 'hf' / 'sub').mkdir()
  before = _snapshot(work / 'hf')
  for out in (work / 'hf', work, work / 'hf' / 'sub'):
    with pytest.raises(UsageError, match='the input --hf_dir='):
      import_hf(work / 'hf', out, overwrite=True)
  link = work / 'link'
  link.symlink_to(work / 'hf')  # the input reached through a symlink is still the input
  with pytest.raises(UsageError, match='the same path as the input'):
    import_hf(work / 'hf', link, overwrite=True)
  assert _snapshot(work / 'hf') == before


def test_the_command_line_refuses_with_one_line_and_exit_2(work):
  ckpt = work / 'ckpt'
  before = _snapshot(ckpt)
  result = _cli('layerskip_jax.convert', 'export_hf', '--ckpt', str(ckpt), '--out', str(ckpt), '--overwrite')
  _one_line_error(result, f'--out={ckpt}', 'the input --ckpt=')
  assert _snapshot(ckpt) == before


def test_overwrite_replaces_only_an_output_of_the_same_kind(work):
  runs = work / 'runs'
  (runs / 'a' / 'checkpoints' / '10').mkdir(parents=True)
  (runs / 'a' / 'metrics.jsonl').write_text('{"step": 1}\n')
  before = _snapshot(runs)
  with pytest.raises(UsageError, match=r"--overwrite replaces only a Hugging Face export .*it holds 'a'"):
    export_hf(work / 'ckpt', runs, overwrite=True)
  with pytest.raises(UsageError, match=r"--overwrite replaces only a converted checkpoint .*it holds 'a'"):
    import_hf(work / 'hf', runs, overwrite=True)
  workdir = runs / 'a'  # a training workdir is not a converted checkpoint: its metrics are not import_hf's
  (workdir / 'layerskip_config.json').write_text('{}')
  with pytest.raises(UsageError, match="it holds 'metrics.jsonl'"):
    import_hf(work / 'hf', workdir, overwrite=True)
  (runs / 'a' / 'layerskip_config.json').unlink()
  assert _snapshot(runs) == before
  with pytest.raises(UsageError, match=r'--out=.*: is a file; give a directory path'):
    export_hf(work / 'ckpt', runs / 'a' / 'metrics.jsonl', overwrite=True)
  download = work / 'download'  # the files of an export, but not written by export_hf: a downloaded model
  shutil.copytree(work / 'hf', download)
  (download / outputs.MARKER).unlink()
  with pytest.raises(UsageError, match='it has no .layerskip_output file naming convert export_hf'):
    export_hf(work / 'ckpt', download, overwrite=True)
  # A previous output of the same kind, and an empty directory, are replaced; beside a checkpoint's files is fine.
  export_hf(work / 'ckpt', work / 'ckpt' / 'hf')
  export_hf(work / 'ckpt', work / 'ckpt' / 'hf', overwrite=True)
  export_hf(work / 'ckpt', work / 'hf', overwrite=True)
  (work / 'empty').mkdir()
  import_hf(work / 'hf', work / 'empty')
  import_hf(work / 'hf', work / 'empty', overwrite=True)
  assert checkpoint_dir.resolve(work / 'empty').step == 0 and not _leftovers(work)


def test_a_write_that_fails_halfway_leaves_the_previous_output(work, monkeypatch):
  previous = _snapshot(work / 'hf')
  stale = work / f'.hf.tmp-{outputs._HOST}-999999999'  # left by a killed export (no such process): removed
  stale.mkdir()
  written = []

  def full_disk(path, tensors):
    written.append(path)
    path.write_bytes(b'x' * 100)
    raise OSError(errno.ENOSPC, 'No space left on device', str(path))

  monkeypatch.setattr(hf, '_write_safetensors', full_disk)
  with pytest.raises(OSError):
    export_hf(work / 'ckpt', work / 'hf', overwrite=True)
  assert written and _snapshot(work / 'hf') == previous and not _leftovers(work)


def test_a_swap_interrupted_between_its_renames_puts_the_old_output_back(tmp_path, monkeypatch):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'old.txt').write_text('old')
  real_rename = pathlib.Path.rename

  def rename(self, target):
    if '.tmp-' in self.name:  # the new output's rename into place: a full disk, or Ctrl-C, right here
      raise KeyboardInterrupt
    return real_rename(self, target)

  monkeypatch.setattr(pathlib.Path, 'rename', rename)
  with pytest.raises(KeyboardInterrupt):
    with outputs.atomic_directory(out) as tmp:
      (tmp / 'new.txt').write_text('new')
  monkeypatch.undo()
  assert (out / 'old.txt').read_text() == 'old' and not _leftovers(tmp_path)
  # kill -9 at the same point leaves the old output renamed aside: the next write of `out` puts it back first.
  host = outputs._HOST
  out.rename(tmp_path / f'.out.old-{host}-999999999')
  (tmp_path / f'.out.tmp-{host}-999999999').mkdir()
  with pytest.raises(RuntimeError):
    with outputs.atomic_directory(out):
      assert (out / 'old.txt').read_text() == 'old'  # recovered before the new write starts
      raise RuntimeError('this write fails too')
  assert (out / 'old.txt').read_text() == 'old' and not _leftovers(tmp_path)


def test_cleanup_touches_only_our_own_dead_temporaries(tmp_path):
  host, mine = outputs._HOST, tmp_path / 'out'
  keep = [
    tmp_path / '.out.tmp-otherhost-999999999',  # another host's writer may be alive
    tmp_path / f'.out.tmp-{host}-{os.getppid()}',  # a live process of this host
    tmp_path / f'.run1.tmp-{host}-999999999',
    tmp_path / '.out.json.tmp-1',  # other outputs, a user's file
    tmp_path / f'.out.tmp-{host}-999999999.bak',
  ]
  for path in keep:
    path.mkdir()
  dead = tmp_path / f'.out.tmp-{host}-999999999'
  dead.mkdir()
  with outputs.atomic_directory(mine):
    pass
  assert not dead.exists() and all(p.exists() for p in keep)
  with outputs.atomic_directory(tmp_path / 'run[1A]'):  # a name with glob characters matches only itself
    pass
  assert all(p.exists() for p in keep)


def test_atomic_files_replace_whole_or_not_at_all(tmp_path):
  target = tmp_path / 'out.json'
  outputs.write_text(target, 'old')
  with pytest.raises(RuntimeError):
    with outputs.atomic_file(target) as tmp:
      tmp.write_text('half')
      raise RuntimeError('killed')
  assert target.read_text() == 'old' and not _leftovers(tmp_path)
  with pytest.raises(UsageError, match='is a directory; give a file path'):
    outputs.check_file('--json', tmp_path)
  with pytest.raises(UsageError, match='is a file, not a directory'):
    outputs.check_file('--json', target / 'x.json')
  assert outputs.check_file('--json', tmp_path / 'new' / 'deeper' / 'x.json') is not None  # parents are created


# --- resume after any crash --------------------------------------------------------------------------------------


def test_a_torn_last_metrics_line_is_dropped_and_a_damaged_one_is_named(tmp_path, capsys):
  path = tmp_path / 'metrics.jsonl'
  rows = [json.dumps({'step': s, 'loss': 1.0}) for s in (1, 2, 3)]
  path.write_text('\n'.join(rows) + '\n{"step": 4, "lo')  # killed mid-write
  logging = _config().logging
  MetricsWriter(tmp_path, logging, resume_step=2, enabled=True).close()
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [1, 2]
  assert 'dropping a torn last line' in capsys.readouterr().err
  path.write_text(rows[0] + '\n{"step": 2, garbage\n' + rows[2] + '\n')
  with pytest.raises(UsageError, match=r'metrics.jsonl:2: not a JSON row'):
    MetricsWriter(tmp_path, logging, resume_step=3, enabled=True)
  assert path.read_text().count('\n') == 3  # left as it was


def _fake_run(workdir: pathlib.Path, config, steps=(2, 4)):
  config_lib.save(config, workdir)
  for step in steps:
    (workdir / 'checkpoints' / str(step)).mkdir(parents=True)
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps({'step': s}) + '\n' for s in range(1, 5)))


def test_rerunning_a_finished_run_appends_nothing(tmp_path, capsys):
  config = _config('--config.train.steps=4')
  _fake_run(tmp_path, config)
  before = _snapshot(tmp_path)
  result = trainer.train(config, tmp_path)
  assert result['step'] == 4 and result['loop']['steps'] == 0
  assert 'already finished at step 4' in capsys.readouterr().out
  assert _snapshot(tmp_path) == before
  assert trainer.validate(config, tmp_path).endswith('nothing to do')


def test_checkpoints_without_their_config_are_refused(tmp_path):
  config = _config('--config.train.steps=8')
  _fake_run(tmp_path, config)
  (tmp_path / 'layerskip_config.json').unlink()
  with pytest.raises(UsageError, match=r'holds checkpoints \(latest step 4\) but no layerskip_config.json'):
    trainer.validate(config, tmp_path)


def test_a_saved_config_binds_the_workdir_only_once_a_checkpoint_exists(tmp_path):
  """A run that failed before its first checkpoint left its config: a retry with another config may start."""
  config_lib.save(_config('--config.model.hidden_size=128'), tmp_path)
  assert trainer.validate(_config(), tmp_path).startswith('would start')
  (tmp_path / 'checkpoints' / '2').mkdir(parents=True)
  with pytest.raises(UsageError, match='was started with model.hidden_size=128, not 64'):
    trainer.validate(_config(), tmp_path)


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_one_line_and_the_run_resumes(tmp_path):
  """A file-size limit (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC; no root needed) during the second save:
  one line naming the step, the errno and the last good checkpoint, exit 1, step 2 intact. The next run removes
  the unfinished save (and says so) and resumes from step 2."""
  workdir, cache = tmp_path / 'run', tmp_path / 'cache'
  command = [
    'layerskip_jax.train',
    '--config',
    'tiny',
    '--workdir',
    str(workdir),
    f'--config.data.cache_dir={cache}',
    *SMALL,
    '--config.checkpoint.every_steps=2',
    '--config.checkpoint.async_save=true',
  ]
  first = _cli(*command, '--config.train.steps=2')
  assert first.returncode == 0, first.stderr[-2000:]
  step_2 = _snapshot(workdir / 'checkpoints' / '2')

  def small_files():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

  full = subprocess.run(
    [sys.executable, '-m', *command, '--config.train.steps=4'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=host_devices_env(1),
    preexec_fn=small_files,
  )
  line = _one_line_error(
    full,
    'checkpoint step 4 could not be written',
    'File too large (EFBIG)',
    'the last good checkpoint is step 2',
    status=1,
  )
  assert str(workdir / 'checkpoints' / '4') in line
  assert _snapshot(workdir / 'checkpoints' / '2') == step_2
  assert checkpoint_dir.steps(workdir) == [2] and list((workdir / 'checkpoints').glob('4.orbax-checkpoint-tmp*'))
  resumed = _cli(*command, '--config.train.steps=4')
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'removing 1 unfinished checkpoint(s) left by an interrupted save' in resumed.stderr
  assert 'resumed from' in resumed.stdout and checkpoint_dir.steps(workdir) == [2, 4]
  assert not list((workdir / 'checkpoints').glob('*orbax-checkpoint-tmp*'))
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if 'split' not in r] == [1, 2, 3, 4]  # the failed run's rows 3-4 replaced


# --- a refused command changes nothing ---------------------------------------------------------------------------


def test_a_rejected_init_from_writes_nothing_and_the_retry_runs(made, tmp_path):
  workdir = tmp_path / 'run'
  bad = _cli(
    'layerskip_jax.train',
    '--config',
    'tiny',
    '--workdir',
    str(workdir),
    *SMALL,
    f'--config.train.init_from={made / "ckpt"}',
    '--config.model.intermediate_size=128',
  )
  _one_line_error(bad, 'train.init_from=', 'model.intermediate_size=96 differs')
  assert not workdir.exists() or not any(workdir.iterdir())
  missing = _cli(
    'layerskip_jax.train',
    '--config',
    'tiny',
    '--workdir',
    str(workdir),
    *SMALL,
    '--dry_run',
    f'--config.train.init_from={tmp_path / "nowhere"}',
  )
  _one_line_error(missing, f'train.init_from={tmp_path / "nowhere"}: no such directory')
  retry = _cli(
    'layerskip_jax.train',
    '--config',
    'tiny',
    '--workdir',
    str(workdir),
    *SMALL,
    '--dry_run',
    f'--config.train.init_from={made / "ckpt"}',
  )
  assert retry.returncode == 0 and retry.stdout.startswith('ok: would start'), retry.stderr
  assert not workdir.exists() or not any(workdir.iterdir())  # a dry run writes nothing either


def test_an_init_from_that_cannot_be_read_writes_nothing(made, tmp_path):
  damaged = tmp_path / 'damaged'
  shutil.copytree(made / 'ckpt', damaged)
  biggest = max((p for p in (damaged / 'checkpoints').rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:100])
  workdir = tmp_path / 'run'
  result = _cli(
    'layerskip_jax.train',
    '--config',
    'tiny',
    '--workdir',
    str(workdir),
    *SMALL,
    f'--config.data.cache_dir={tmp_path / "cache"}',
    f'--config.train.init_from={damaged}',
  )
  _one_line_error(result, f'train.init_from={damaged / "checkpoints" / "0"}', 'cannot be read: it is truncated')
  assert not workdir.exists()


def test_a_refused_resume_writes_nothing(tmp_path):
  config = _config('--config.train.steps=8')
  _fake_run(tmp_path, config)
  before = _snapshot(tmp_path)
  with pytest.raises(UsageError, match='was started with model.num_hidden_layers=2, not 4'):
    trainer.train(_config('--config.train.steps=8', '--config.model.num_hidden_layers=4'), tmp_path)
  assert _snapshot(tmp_path) == before


def test_dry_run_validates_the_whole_config(tmp_path):
  for args, fragment in (
    (['--config', 'tinyy'], '--config=tinyy: no such config file'),
    (['--config', 'tiny', '--config.train.steps=-1'], 'train.steps'),
    (['--config', 'tiny', '--config.train.nosuchkey=1'], 'train.nosuchkey'),
  ):
    _one_line_error(_cli('layerskip_jax.train', *args, '--workdir', str(tmp_path / 'w'), '--dry_run'), fragment)
  (tmp_path / 'file').write_text('x')
  _one_line_error(
    _cli('layerskip_jax.train', '--config', 'tiny', '--workdir', str(tmp_path / 'file'), '--dry_run'),
    'is a file; give a directory',
  )
  assert sorted(p.name for p in tmp_path.iterdir()) == ['file']


# --- damaged inputs are one line naming the file -----------------------------------------------------------------


def test_a_truncated_checkpoint_tensor_is_one_line(work):
  ckpt = work / 'ckpt'
  biggest = max((p for p in (ckpt / 'checkpoints' / '0').rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  biggest.write_bytes(biggest.read_bytes()[:100])
  with pytest.raises(UsageError) as raised:
    checkpoint_dir.restore_params(ckpt, flag='--compare')
  message = str(raised.value)
  assert message.startswith(f'--compare={ckpt}: {ckpt / "checkpoints" / "0"} cannot be read') and len(message) < 600
  result = _cli('layerskip_jax.convert', 'export_hf', '--ckpt', str(ckpt), '--out', str(work / 'out'))
  _one_line_error(result, 'cannot be read: it is truncated or damaged')
  assert not (work / 'out').exists() and not _leftovers(work)


@pytest.mark.parametrize(
  'damage,message',
  [
    (lambda b: b[: len(b) // 2], 'is truncated: download or copy it again'),
    (lambda b: b[:5], 'not a complete safetensors file (5 bytes'),
    (lambda b: (10**9).to_bytes(8, 'little') + b[8:], 'not a complete safetensors file'),
    (lambda b: b[:8] + b'\xff' * 20 + b[28:], 'its header is not JSON'),
  ],
)
def test_a_damaged_safetensors_file_is_one_line(work, damage, message):
  path = work / 'hf' / 'model.safetensors'
  path.write_bytes(damage(path.read_bytes()))
  with pytest.raises(UsageError, match=message.replace('(', r'\(')) as raised:
    import_hf(work / 'hf', work / 'out')
  assert str(raised.value).startswith(f'{path}: ') and not (work / 'out').exists()


def test_a_damaged_saved_config_names_the_file(work):
  path = work / 'ckpt' / 'layerskip_config.json'
  for text, fragment in (
    ('{"model": {"hidden_', 'not a readable layerskip config'),
    ('[1, 2]', 'a JSON list, not a layerskip config object'),
    (b'\xff\xfe'.decode('latin-1'), 'not a readable layerskip config'),
  ):
    path.write_text(text)
    with pytest.raises(UsageError, match=fragment) as raised:
      checkpoint_dir.restore_params(work / 'ckpt')
    assert str(raised.value).startswith(f'--ckpt={work / "ckpt"}: layerskip_config.json: ')


def test_unwritable_places_are_refused_before_any_work(tmp_path, monkeypatch):
  """As root every path is writable, so permission is simulated: os.access answers as for another user."""
  import os

  locked = tmp_path / 'locked'
  locked.mkdir()
  real_access = os.access
  monkeypatch.setattr(os, 'access', lambda p, mode: False if pathlib.Path(p) == locked else real_access(p, mode))
  with pytest.raises(UsageError, match='permission denied'):
    outputs.check_file('--json', locked / 'x.json')
  with pytest.raises(UsageError, match='permission denied'):
    outputs.check_dir('--out', locked / 'out', kind=outputs.HF_EXPORT)
  with pytest.raises(UsageError, match=r'--workdir=.*permission denied'):
    trainer.validate(_config(), locked / 'run')
  assert np.all([not p.exists() for p in (locked / 'x.json', locked / 'out', locked / 'run')])


ABANDONED_TASK = """
import asyncio, gc
from layerskip_jax import cli
from layerskip_jax.errors import UsageError

def main(args):  # what a failed Orbax read leaves: a task whose exception nobody retrieves, collected at exit
  async def read():
    raise Exception('Encountered error while reading array index:\\n  a TensorStore spec\\n  of many lines')
  async def start():
    task = asyncio.ensure_future(read())
    await asyncio.sleep(0.01)
    return task
  loop = asyncio.new_event_loop()
  task = loop.run_until_complete(start())
  loop.close()
  del task
  gc.collect()
  raise UsageError(MESSAGE)

cli.run(main)
"""


@pytest.mark.parametrize('message,status', [('OSError("a lost mount, no errno")', 1), ("'the one line'", 2)])
def test_any_failure_is_one_line(message, status):
  script = ABANDONED_TASK.replace(
    'raise UsageError(MESSAGE)', f'raise {message}' if status == 1 else f'raise UsageError({message})'
  )
  result = subprocess.run(
    [sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=120, env=host_devices_env(1)
  )
  _one_line_error(result, 'OSError: a lost mount, no errno' if status == 1 else 'the one line', status=status)

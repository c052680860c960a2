"""The checkpoint-directory resolver (interfaces.md): DIR -> latest step, DIR/checkpoints/<step> -> that step."""

import pytest

from layerskip_jax import checkpoint_dir, config as config_lib
from layerskip_jax.errors import UsageError


def _workdir(tmp_path, steps=(0, 100, 20)):
  config_lib.save(config_lib.load('tiny'), tmp_path)
  for step in steps:
    (tmp_path / 'checkpoints' / str(step)).mkdir(parents=True)
  (tmp_path / 'checkpoints' / '300.orbax-checkpoint-tmp-12').mkdir(parents=True)  # an unfinished save is not a step
  return tmp_path


def test_resolves_latest_and_explicit_steps(tmp_path):
  root = _workdir(tmp_path)
  latest = checkpoint_dir.resolve(root)
  assert (latest.root, latest.step) == (root, 100)
  assert latest.step_dir == root / 'checkpoints' / '100'
  assert latest.config_path.is_file() and latest.tokenizer_path is None
  explicit = checkpoint_dir.resolve(root / 'checkpoints' / '20')
  assert (explicit.root, explicit.step) == (root, 20)
  (root / 'tokenizer.json').write_text('{}')
  assert checkpoint_dir.resolve(root).tokenizer_path == root / 'tokenizer.json'


def test_relative_paths_resolve_to_absolute_ones(tmp_path, monkeypatch):
  root = _workdir(tmp_path / 'run')
  monkeypatch.chdir(tmp_path)
  resolved = checkpoint_dir.resolve('run')  # Orbax refuses relative paths: the resolver hands out absolute ones
  assert resolved.root == root and resolved.root.is_absolute()


def test_errors(tmp_path):
  with pytest.raises(UsageError, match='no such directory'):
    checkpoint_dir.resolve(tmp_path / 'missing')
  with pytest.raises(UsageError, match='not a layerskip_jax checkpoint directory'):
    checkpoint_dir.resolve(tmp_path)
  root = _workdir(tmp_path / 'run', steps=())
  with pytest.raises(UsageError, match='holds no finished checkpoint step'):
    checkpoint_dir.resolve(root)
  (root / 'checkpoints' / '5').mkdir()
  with pytest.raises(UsageError, match=r'step 7 is not a finished checkpoint; available steps: \[5\]'):
    checkpoint_dir.resolve(root / 'checkpoints' / '7')

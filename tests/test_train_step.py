"""The train step: gradient accumulation, AdamW without decay on norms, the learning-rate schedule; the one compile
path (state.compile_steps) and its eval microbatches; checkpoints of the TrainState (old dict-layout ones too) and
the prefetching feed's exact data position; the profile_steps setting."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from layerskip_jax import config as config_lib, sharding
from layerskip_jax.checkpoint_dir import CHECKPOINTS_SUBDIR, DATA_ITER_ITEM, META_ITEM, STATE_ITEM
from layerskip_jax.config import ConfigError
from layerskip_jax.data import loader
from layerskip_jax.model import create
from layerskip_jax.objective import ObjectiveConfig
from layerskip_jax.objective.loss import exit_statistics
from layerskip_jax.train.checkpointing import Checkpointer
from layerskip_jax.train.optimizer import learning_rate_schedule, make_optimizer
from layerskip_jax.train.state import CompiledSteps, TrainState, compile_steps, init_state
from layerskip_jax.train.step import make_train_step, synthetic_batch


def _setup(small_config, grad_accum, objective, **train):
  config = config_lib.load('tiny', {f'train.{k}': v for k, v in train.items()})
  graphdef, params_state = nnx.split(create(small_config, seed=0))
  tx = make_optimizer(config.train, params_state)
  params = nnx.to_pure_dict(params_state)
  step = jax.jit(make_train_step(graphdef, tx, objective, grad_accum))
  return step, TrainState(params=params, opt_state=tx.init(params))


def _batch(mask=1.0):
  tokens = np.random.RandomState(0).randint(0, 128, (4, 17))
  return {
    'inputs': jnp.asarray(tokens[:, :-1]),
    'targets': jnp.asarray(tokens[:, 1:]),
    'loss_mask': jnp.full((4, 16), mask, jnp.float32),
  }


def test_gradient_accumulation_equals_the_full_batch(small_config):
  objective = ObjectiveConfig(total_steps=10, p_max=0.0, curriculum='none')
  one, state1 = _setup(small_config, 1, objective)
  two, state2 = _setup(small_config, 2, objective)
  new1, m1 = one(state1, _batch(), jnp.int32(3))
  new2, m2 = two(state2, _batch(), jnp.int32(3))
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-6)
  np.testing.assert_allclose(m1['grad_norm'], m2['grad_norm'], rtol=1e-5)
  assert float(m1['tokens']) == float(m2['tokens']) == 64
  for a, b in zip(jax.tree.leaves(new1.params), jax.tree.leaves(new2.params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_weight_decay_spares_norm_scales(small_config):
  objective = ObjectiveConfig(total_steps=10, p_max=0.0, e_scale=0.0)
  step, state = _setup(small_config, 1, objective, weight_decay=0.5, learning_rate=0.1, warmup_steps=0)
  new, metrics = step(state, _batch(mask=0.0), jnp.int32(0))  # no tokens: zero gradient, decay alone
  assert float(metrics['grad_norm']) == 0
  p0, p1 = state.params, new.params
  np.testing.assert_array_equal(p0['norm']['scale'], p1['norm']['scale'])
  np.testing.assert_array_equal(p0['layers']['input_layernorm']['scale'], p1['layers']['input_layernorm']['scale'])
  np.testing.assert_allclose(p1['lm_head'], p0['lm_head'] * (1 - 0.1 * 0.5), rtol=1e-6)


def test_learning_rate_schedule():
  train = config_lib.load(
    'tiny', {'train.steps': 100, 'train.warmup_steps': 10, 'train.learning_rate': 1e-3, 'train.min_lr_ratio': 0.1}
  ).train
  lr = learning_rate_schedule(train)
  assert float(lr(0)) == 0 and abs(float(lr(5)) - 5e-4) < 1e-9 and abs(float(lr(10)) - 1e-3) < 1e-9
  assert abs(float(lr(100)) - 1e-4) < 1e-9 and float(lr(55)) < 1e-3


SMALL_OVERRIDES = {
  'model.hidden_size': 64,
  'model.num_hidden_layers': 2,
  'model.intermediate_size': 96,
  'model.vocab_size': 128,
  'train.seq_len': 16,
  'train.batch_size': 4,
  'train.grad_accum_steps': 2,
}


@pytest.fixture(scope='module')
def compiled():
  config = config_lib.load('tiny', SMALL_OVERRIDES)
  return config, compile_steps(config, sharding.single_device_mesh())


def test_compile_steps_compiles_train_and_microbatch_eval_from_shapes(compiled):
  config, steps = compiled
  assert isinstance(steps, CompiledSteps) and isinstance(steps.abstract_state, TrainState)
  assert all(
    isinstance(a, jax.ShapeDtypeStruct) and a.sharding is not None for a in jax.tree.leaves(steps.abstract_state)
  )
  assert steps.train_seconds > 0 and steps.eval_seconds > 0
  assert steps.eval.memory_analysis() is not None
  state = init_state(config, steps)
  batch = synthetic_batch(128, 4, 16)
  params = jax.tree.map(np.asarray, state.params)  # the step donates the state
  new, metrics = steps.train(state, batch, jnp.int32(0))
  assert isinstance(new, TrainState) and np.isfinite(float(metrics['loss'])) and float(metrics['tokens']) == 64
  # evaluation runs in microbatches of the train step's (4 / 2 rows): their sums are the whole batch's
  halves = [steps.eval(params, {k: v[i : i + 2] for k, v in batch.items()}) for i in (0, 2)]
  whole = exit_statistics(nnx.merge(steps.graphdef, params), batch, config.layerskip.ce_chunk_len)
  for key in ('ce', 'correct', 'agree_final', 'tokens'):
    np.testing.assert_allclose(halves[0][key] + halves[1][key], whole[key], rtol=1e-5)
  with pytest.raises(Exception):
    steps.eval(params, batch)  # compiled for the microbatch only


def _iterator():
  return iter(grain.MapDataset.range(100).map(lambda i: {'inputs': np.full((2, 3), i, np.int32)}).to_iter_dataset())


def _values(state):
  return [np.asarray(a) for a in jax.tree.leaves(state)]


def test_checkpoints_of_the_old_dict_layout_restore_as_train_state(tmp_path, compiled):
  """Checkpoints written before TrainState (the `state` item a dict, the iterator saved by grain's handler from
  the iterator itself) restore through the Checkpointer; new ones keep that layout."""
  config, steps = compiled
  state = init_state(config, steps)
  old_iterator = _iterator()
  for _ in range(3):
    next(old_iterator)
  handlers = {
    STATE_ITEM: ocp.StandardCheckpointHandler(),
    META_ITEM: ocp.JsonCheckpointHandler(),
    DATA_ITER_ITEM: grain.checkpoint.CheckpointHandler(),
  }
  with ocp.CheckpointManager(tmp_path / CHECKPOINTS_SUBDIR, item_handlers=handlers) as manager:
    manager.save(
      5,
      args=ocp.args.Composite(
        **{
          STATE_ITEM: ocp.args.StandardSave({'params': state.params, 'opt_state': state.opt_state}),
          DATA_ITER_ITEM: grain.checkpoint.CheckpointSave(old_iterator),
          META_ITEM: ocp.args.JsonSave({'step': 5}),
        }
      ),
    )
    manager.wait_until_finished()

  checkpointer = Checkpointer(tmp_path, keep=3, async_save=False)
  iterator = _iterator()
  restored, meta = checkpointer.restore(5, steps.abstract_state, iterator)
  assert isinstance(restored, TrainState) and meta == {'step': 5}
  for a, b in zip(_values(restored), _values(state)):
    np.testing.assert_array_equal(a, b)
  assert int(next(iterator)['inputs'][0, 0]) == 3

  # a new checkpoint: the data position is a recorded state (here after 4 batches), not the iterator's own
  recorded = iterator.get_state()
  for _ in range(5):
    next(iterator)  # read ahead, as the prefetcher does
  checkpointer.save(6, restored, recorded, {'step': 6})
  checkpointer.wait()
  checkpointer.close()
  with ocp.CheckpointManager(tmp_path / CHECKPOINTS_SUBDIR, item_handlers=handlers) as manager:
    raw = manager.restore(
      6, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(steps.abstract_state.to_tree())})
    )
  assert set(raw[STATE_ITEM]) == {'params', 'opt_state'}  # the dict layout on disk
  again, checkpointer = _iterator(), Checkpointer(tmp_path, keep=3)
  checkpointer.restore(6, steps.abstract_state, again)
  checkpointer.close()
  assert int(next(again)['inputs'][0, 0]) == 4


@pytest.mark.parametrize('depth', [0, 2])
def test_prefetcher_keeps_order_and_the_position_of_the_last_batch_handed_out(depth):
  mesh = sharding.single_device_mesh()
  feed = loader.Prefetcher(_iterator(), mesh, depth=depth)
  reference = _iterator()
  try:
    assert feed.iterator_state() == reference.get_state()
    for _ in range(4):
      batch = feed.next()
      assert isinstance(batch['inputs'], jax.Array)
      np.testing.assert_array_equal(batch['inputs'], next(reference)['inputs'])
      assert feed.iterator_state() == reference.get_state()
  finally:
    feed.close()


def test_prefetcher_raises_the_iterators_error_where_its_batch_was_wanted():
  def broken(i):
    if i == 2:
      raise ValueError('corrupt record')
    return {'inputs': np.zeros((2, 3), np.int32)}

  feed = loader.Prefetcher(
    iter(grain.MapDataset.range(5).map(broken).to_iter_dataset()), sharding.single_device_mesh(), depth=2
  )
  try:
    feed.next(), feed.next()
    with pytest.raises(ValueError, match='corrupt record'):
      feed.next()
  finally:
    feed.close()


@pytest.mark.parametrize('value', ['10', '15,10', '0,3', 'a,b', '1,2,3'])
def test_profile_steps_is_validated(value):
  with pytest.raises(ConfigError, match=r'^logging\.profile_steps='):
    config_lib.load('tiny', {'logging.profile_steps': value})
  assert config_lib.parse_profile_steps('10,15') == (10, 15) and config_lib.parse_profile_steps('') is None

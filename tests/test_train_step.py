"""The train step: gradient accumulation, AdamW without decay on norms, the learning-rate schedule."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerskip_jax import config as config_lib
from layerskip_jax.model import create
from layerskip_jax.objective import ObjectiveConfig
from layerskip_jax.train.optimizer import learning_rate_schedule, make_optimizer
from layerskip_jax.train.step import make_train_step


def _setup(small_config, grad_accum, objective, **train):
  config = config_lib.load('tiny', {f'train.{k}': v for k, v in train.items()})
  graphdef, params_state = nnx.split(create(small_config, seed=0))
  tx = make_optimizer(config.train, params_state)
  params = nnx.to_pure_dict(params_state)
  step = jax.jit(make_train_step(graphdef, tx, objective, grad_accum))
  return step, {'params': params, 'opt_state': tx.init(params)}


def _batch(mask=1.0):
  tokens = np.random.RandomState(0).randint(0, 128, (4, 17))
  return {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:]),
          'loss_mask': jnp.full((4, 16), mask, jnp.float32)}


def test_gradient_accumulation_equals_the_full_batch(small_config):
  objective = ObjectiveConfig(total_steps=10, p_max=0.0, curriculum='none')
  one, state1 = _setup(small_config, 1, objective)
  two, state2 = _setup(small_config, 2, objective)
  new1, m1 = one(state1, _batch(), jnp.int32(3))
  new2, m2 = two(state2, _batch(), jnp.int32(3))
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-6)
  np.testing.assert_allclose(m1['grad_norm'], m2['grad_norm'], rtol=1e-5)
  assert float(m1['tokens']) == float(m2['tokens']) == 64
  for a, b in zip(jax.tree.leaves(new1['params']), jax.tree.leaves(new2['params'])):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_weight_decay_spares_norm_scales(small_config):
  objective = ObjectiveConfig(total_steps=10, p_max=0.0, e_scale=0.0)
  step, state = _setup(small_config, 1, objective, weight_decay=0.5, learning_rate=0.1, warmup_steps=0)
  new, metrics = step(state, _batch(mask=0.0), jnp.int32(0))  # no tokens: zero gradient, decay alone
  assert float(metrics['grad_norm']) == 0
  p0, p1 = state['params'], new['params']
  np.testing.assert_array_equal(p0['norm']['scale'], p1['norm']['scale'])
  np.testing.assert_array_equal(p0['layers']['input_layernorm']['scale'], p1['layers']['input_layernorm']['scale'])
  np.testing.assert_allclose(p1['lm_head'], p0['lm_head'] * (1 - 0.1 * 0.5), rtol=1e-6)


def test_learning_rate_schedule():
  train = config_lib.load('tiny', {'train.steps': 100, 'train.warmup_steps': 10, 'train.learning_rate': 1e-3,
                                   'train.min_lr_ratio': 0.1}).train
  lr = learning_rate_schedule(train)
  assert float(lr(0)) == 0 and abs(float(lr(5)) - 5e-4) < 1e-9 and abs(float(lr(10)) - 1e-3) < 1e-9
  assert abs(float(lr(100)) - 1e-4) < 1e-9 and float(lr(55)) < 1e-3

"""The LayerSkip objective: schedules against the spec's formulas, curricula, masks, the early-exit loss."""

import math
import pathlib
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import run_on_host_devices

from layerskip_jax import objective
from layerskip_jax.model import create
from layerskip_jax.objective import ObjectiveConfig, layerskip_loss

ROOT = pathlib.Path(__file__).resolve().parent.parent


# --- schedules: hand-computed formulas (spec section 1) ------------------------------------------------------


def _depth(name, l, num_layers):
  x = l / (num_layers - 1)
  return {
    'exp': 2**x - 1,
    'uniform': 1.0,
    'linear': x,
    'log': math.log(l + 1) / math.log(num_layers),
    'sin': math.sin(math.pi * l / (2 * (num_layers - 1))),
    'sigmoid': 1 / (1 + math.exp(-10 * (x - 0.5))),
  }[name]


@pytest.mark.parametrize('num_layers', [2, 5, 8, 32])
@pytest.mark.parametrize('depth', ['exp', 'uniform', 'linear', 'log', 'sin', 'sigmoid'])
@pytest.mark.parametrize('time', ['constant', 'exp'])
def test_layer_dropout_probs_match_the_formulas(num_layers, depth, time):
  total = 1000
  for p_max in (0.1, 0.5):
    for step in (0, 1, 250, 999):
      got = np.asarray(objective.layer_dropout_probs(num_layers, p_max, step, total, depth, time))
      s = 1.0 if time == 'constant' else 2 ** (step / total) - 1
      want = [s * _depth(depth, l, num_layers) * p_max for l in range(num_layers)]
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
      assert got.shape == (num_layers,) and np.all(got >= 0) and np.all(got <= p_max + 1e-7)
  d = np.asarray(objective.depth_scale(num_layers, 'exp'))
  assert d[0] == 0 and abs(d[-1] - 1) < 1e-6


def test_schedules_are_pure_functions_of_a_traced_step():
  jitted = jax.jit(
    lambda t: (
      objective.layer_dropout_probs(8, 0.2, t, 100, 'exp', 'exp'),
      objective.early_exit_weights(8, t, 100, 'gradual', 4, 1.0),
    )
  )
  for step in (0, 17, 60, 99):
    probs, weights = jitted(jnp.int32(step))
    np.testing.assert_allclose(probs, objective.layer_dropout_probs(8, 0.2, step, 100, 'exp', 'exp'), rtol=1e-6)
    np.testing.assert_allclose(weights, objective.early_exit_weights(8, step, 100, 'gradual', 4, 1.0), rtol=1e-6)


@pytest.mark.parametrize('num_layers', [2, 4, 8, 24])
@pytest.mark.parametrize('e_scale', [0.0, 0.5, 1.0, 2.0])
def test_early_exit_scales(num_layers, e_scale):
  got = np.asarray(objective.early_exit_scales(num_layers, e_scale))
  want = [e_scale * sum(range(l + 1)) for l in range(num_layers - 1)]
  want.append((num_layers - 1) + e_scale * sum(range(num_layers - 1)))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0] == 0  # the paper's e(0) = 0: exit 1 is never trained


def test_rotational_active_sets():
  for step in range(24):
    active = set(np.flatnonzero(np.asarray(objective.curriculum_mask(8, step, 100, 'rotational', 4))))
    assert active == {l for l in range(8) if l % 4 == step % 4} | {7}
    weights = np.asarray(objective.early_exit_weights(8, step, 100, 'rotational', 4, 1.0))
    assert set(np.flatnonzero(weights)) == active - {0}  # e(0) = 0
    assert abs(weights.sum() - 1) < 1e-6 and weights[7] > 0


def test_draft_exit_is_supervised_every_step():
  """layerskip.draft_exit E adds exit E to every step's supervised set (weights renormalised); the rest of the
  curriculum is unchanged, and the static bound grows by the one exit."""
  for step in range(8):
    plain = np.asarray(objective.early_exit_weights(8, step, 100, 'rotational', 2, 1.0))
    w = np.asarray(objective.early_exit_weights(8, step, 100, 'rotational', 2, 1.0, draft_exit=4))
    assert set(np.flatnonzero(w)) == set(np.flatnonzero(plain)) | {3}
    assert abs(w.sum() - 1) < 1e-6
    if plain[3] > 0:
      np.testing.assert_allclose(w, plain, rtol=1e-6)
  assert objective.max_supervised_exits(8, 100, 'rotational', 2, 1.0) == 4
  assert objective.max_supervised_exits(8, 100, 'rotational', 2, 1.0, 4) == 5
  from layerskip_jax import config as config_lib

  with pytest.raises(config_lib.ConfigError, match=r'layerskip\.draft_exit=8: must be an early exit, 1\.\.7'):
    config_lib.load('tiny', {'layerskip.draft_exit': 8})


def test_gradual_active_sets():
  # L=4, T=16: layer l switches on at t >= (3 - l) * 16 / 8 = 6, 4, 2, 0
  expected_first = {3: 0, 2: 2, 1: 4, 0: 6}
  for step in range(16):
    active = set(np.flatnonzero(np.asarray(objective.curriculum_mask(4, step, 16, 'gradual'))))
    assert active == {l for l, first in expected_first.items() if step >= first}
  # fractional thresholds: L=3, T=10 -> (2 - l) * 10 / 6 = 3.33.., 1.66.., 0
  for step, want in [(0, {2}), (1, {2}), (2, {1, 2}), (3, {1, 2}), (4, {0, 1, 2})]:
    assert set(np.flatnonzero(np.asarray(objective.curriculum_mask(3, step, 10, 'gradual')))) == want
  assert np.all(np.asarray(objective.curriculum_mask(6, 0, 10, 'none')))


def test_weights_normalised_and_static_bound():
  for curriculum in ('rotational', 'gradual', 'none'):
    bound = objective.max_supervised_exits(8, 100, curriculum, 4, 1.0)
    for step in range(100):
      w = np.asarray(objective.early_exit_weights(8, step, 100, curriculum, 4, 1.0))
      assert abs(w.sum() - 1) < 1e-6 and np.all(w >= 0) and w[-1] > 0
      assert np.count_nonzero(w) <= bound
  assert objective.max_supervised_exits(8, 100, 'rotational', 4, 1.0) == 3
  assert objective.max_supervised_exits(8, 100, 'none', 4, 0.0) == 1  # e_scale=0: the last exit alone
  np.testing.assert_array_equal(objective.early_exit_weights(8, 3, 100, 'none', 4, 0.0), [0] * 7 + [1])


# --- layer-dropout masks -------------------------------------------------------------------------------------


def _masks(step, microbatch=0, batch=64, mode='per_sample', p_max=0.5, time='constant', seed=0):
  return objective.keep_masks(
    8,
    batch,
    step,
    microbatch,
    seed=seed,
    p_max=p_max,
    total_steps=1000,
    depth_schedule='exp',
    time_schedule=time,
    mode=mode,
  )


def test_empirical_drop_rates_match_the_probabilities():
  draws = jax.jit(jax.vmap(lambda t: _masks(t, batch=64)[1]))(jnp.arange(400))  # [400, L, 64]
  rates = 1 - np.asarray(draws).mean(axis=(0, 2))
  probs = np.asarray(objective.layer_dropout_probs(8, 0.5, 0, 1000, 'exp', 'constant'))
  sigma = np.sqrt(probs * (1 - probs) / (400 * 64))
  assert np.all(np.abs(rates - probs) <= 4 * sigma + 1e-9), (rates, probs)
  batch_draws = jax.jit(jax.vmap(lambda t: _masks(t, mode='per_batch')[0]))(jnp.arange(4000))
  rates = 1 - np.asarray(batch_draws).mean(axis=0)
  assert np.all(np.abs(rates - probs) <= 4 * np.sqrt(probs * (1 - probs) / 4000) + 1e-9)
  # the exp time schedule drops almost nothing early in training
  early = 1 - np.asarray(jax.jit(jax.vmap(lambda t: _masks(t, time='exp')[1]))(jnp.arange(10))).mean()
  assert early < 0.01


def test_masks_are_a_pure_function_of_seed_step_microbatch():
  a = _masks(123, microbatch=1)[1]
  b = jax.jit(lambda: _masks(123, microbatch=1)[1])()
  np.testing.assert_array_equal(a, b)  # a "restarted" program draws the same masks
  assert not np.array_equal(a, _masks(123, microbatch=0)[1])
  assert not np.array_equal(a, _masks(124, microbatch=1)[1])
  assert not np.array_equal(a, _masks(123, microbatch=1, seed=1)[1])
  assert _masks(5, p_max=0.0) == (None, None)


MASKS_ON_8_DEVICES = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from ml_collections import config_dict
    from layerskip_jax import sharding
    from layerskip_jax.objective import keep_masks
    mesh = sharding.make_mesh(config_dict.ConfigDict(dict(data=2, fsdp=4, tensor=1, dcn_data=1, dcn_fsdp=1,
                                                          dcn_tensor=1)))
    draw = lambda t: keep_masks(8, 64, t, 3, seed=7, p_max=0.5, total_steps=1000)[1]
    with jax.set_mesh(mesh):
      masks = jax.jit(draw, out_shardings=jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(None, sharding.BATCH)))(jnp.int32(42))
    assert len(masks.addressable_shards) == 8
    print('MASKS', ''.join('1' if v else '0' for v in np.asarray(masks).ravel()))
''')


def test_masks_on_8_devices_equal_one_device():
  bits = run_on_host_devices(MASKS_ON_8_DEVICES).split('MASKS ')[1].strip()
  sharded = np.array([c == '1' for c in bits]).reshape(8, 64)
  single = objective.keep_masks(8, 64, 42, 3, seed=7, p_max=0.5, total_steps=1000)[1]
  np.testing.assert_array_equal(sharded, np.asarray(single))


# --- the loss ------------------------------------------------------------------------------------------------


def _batch(vocab=128, batch=2, seq=24, seed=0):
  tokens = np.random.RandomState(seed).randint(0, vocab, (batch, seq + 1))
  return {
    'inputs': jnp.asarray(tokens[:, :-1], jnp.int32),
    'targets': jnp.asarray(tokens[:, 1:], jnp.int32),
    'loss_mask': jnp.ones((batch, seq), jnp.float32),
  }


def _reference_ce(logits, targets, mask):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(ce * mask) / jnp.sum(mask)


BASELINE = ObjectiveConfig(total_steps=100, p_max=0.0, e_scale=0.0, ce_chunk_len=7)  # 7 does not divide 24


def test_baseline_is_a_plain_language_model_loss(small_model):
  batch = _batch()

  def objective_loss(model):
    return layerskip_loss(model, batch, 3, 0, BASELINE)[0]

  def same_path_without_exit_terms(model):  # the code path of the last exit alone
    x = model.run_span(model.embed(batch['inputs']), jnp.broadcast_to(jnp.arange(24), (2, 24)))
    return objective.cross_entropy_sum(model, x, batch['targets'], batch['loss_mask'], 7) / 48.0

  def unchunked(model):
    return _reference_ce(model(batch['inputs']), batch['targets'], batch['loss_mask'])

  (loss, g), (loss_same, g_same), (loss_ref, g_ref) = (
    nnx.jit(nnx.value_and_grad(f))(small_model) for f in (objective_loss, same_path_without_exit_terms, unchunked)
  )
  assert float(loss) == float(loss_same)  # bit-exact
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_same)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(b))) + 1e-9)
  _, metrics = layerskip_loss(small_model, batch, 3, 0, BASELINE)
  assert np.isnan(np.asarray(metrics['exit_ce'][:-1])).all() and float(metrics['ce_last']) == float(loss)


def test_baseline_draws_no_masks_and_computes_one_exit(small_model):
  text = nnx.jit(lambda m: layerskip_loss(m, _batch(), 3, 0, BASELINE)[0]).lower(small_model).as_text()
  assert 'threefry' not in text and 'rng_bit_generator' not in text
  layerskip = nnx.jit(lambda m: layerskip_loss(m, _batch(), 3, 0, ObjectiveConfig(total_steps=100))[0])
  assert 'threefry' in layerskip.lower(small_model).as_text()


@pytest.mark.parametrize('curriculum', ['rotational', 'gradual', 'none'])
def test_each_exit_is_the_output_of_its_layers(small_model, curriculum):
  """exit_ce[l] is CE(g(x_{l+1})): the output of layer l, the same as model(exit_layer=l+1) (spec section 3)."""
  batch = _batch()
  cfg = ObjectiveConfig(
    total_steps=40, p_max=0.0, e_scale=1.0, curriculum=curriculum, rotation_period=2, ce_chunk_len=10
  )
  step = 25
  loss, metrics = nnx.jit(lambda m: layerskip_loss(m, batch, step, 0, cfg))(small_model)
  weights = np.asarray(objective.early_exit_weights(4, step, 40, curriculum, 2, 1.0))
  want = [
    float(_reference_ce(small_model(batch['inputs'], exit_layer=l + 1), batch['targets'], batch['loss_mask']))
    for l in range(4)
  ]
  exit_ce = np.asarray(metrics['exit_ce'])
  for l in range(4):
    if weights[l] > 0:
      assert abs(exit_ce[l] - want[l]) < 1e-5, (l, exit_ce, want)
    else:
      assert np.isnan(exit_ce[l])
  assert abs(float(loss) - sum(w * c for w, c in zip(weights, want))) < 1e-5
  assert abs(float(metrics['ce_last']) - want[-1]) < 1e-5


def test_padding_is_masked(small_model):
  batch = _batch()
  batch['loss_mask'] = batch['loss_mask'].at[:, 18:].set(0)
  changed = dict(batch, targets=batch['targets'].at[:, 18:].set(5), inputs=batch['inputs'])
  cfg = ObjectiveConfig(total_steps=10, p_max=0.0, curriculum='none', ce_chunk_len=8)
  a = layerskip_loss(small_model, batch, 1, 0, cfg)
  b = layerskip_loss(small_model, changed, 1, 0, cfg)
  assert float(a[0]) == float(b[0]) and float(a[1]['tokens']) == 36


def test_exit_token_fraction_is_an_unbiased_subsample(small_model):
  batch = _batch(seq=32)
  full_cfg = ObjectiveConfig(total_steps=1000, p_max=0.0, curriculum='none', ce_chunk_len=16)
  part_cfg = ObjectiveConfig(total_steps=1000, p_max=0.0, curriculum='none', ce_chunk_len=16, exit_token_fraction=0.25)
  full = np.asarray(layerskip_loss(small_model, batch, 0, 0, full_cfg)[1]['exit_ce'])
  run = jax.jit(jax.vmap(lambda t: layerskip_loss(small_model, batch, t, 0, part_cfg)[1]['exit_ce']))
  samples = np.asarray(run(jnp.arange(300)))  # [300, L]
  assert samples[0, -1] == pytest.approx(full[-1], abs=1e-6)  # the last exit always sees every token
  assert not np.allclose(samples[0, 1], full[1])  # early exits see a quarter of the positions
  spread = samples[:, 1:-1].std(axis=0) / np.sqrt(300)
  np.testing.assert_array_less(np.abs(samples[:, 1:-1].mean(axis=0) - full[1:-1]), 4 * spread + 1e-4)


def _lowered_has_conditional_layer(small_model, mode):
  cfg = ObjectiveConfig(total_steps=10, p_max=0.5, e_scale=0.0, dropout_mode=mode)
  text = nnx.jit(nnx.grad(lambda m: layerskip_loss(m, _batch(), 3, 0, cfg)[0])).lower(small_model).as_text()
  return bool(re.search(r'stablehlo\.(case|if)', text))


def test_per_batch_dropout_skips_layers_with_a_conditional(small_model):
  assert _lowered_has_conditional_layer(small_model, 'per_batch')
  assert not _lowered_has_conditional_layer(small_model, 'per_sample')  # a select, not a skip


def test_dropout_changes_the_loss_only_in_training(small_model):
  batch = _batch()
  cfg = ObjectiveConfig(total_steps=10, p_max=1.0, time_schedule='constant', e_scale=0.0)
  train = float(layerskip_loss(small_model, batch, 3, 0, cfg)[0])
  evaluation = float(layerskip_loss(small_model, batch, 3, 0, cfg, train=False)[0])
  plain = float(_reference_ce(small_model(batch['inputs']), batch['targets'], batch['loss_mask']))
  assert abs(evaluation - plain) < 1e-5 and abs(train - plain) > 1e-3


def test_layerskip_gradients_flow_to_early_layers_through_the_exits():
  from conftest import SMALL

  model = create(SMALL, seed=0)
  batch = _batch()
  cfg = ObjectiveConfig(total_steps=10, p_max=0.0, curriculum='none', e_scale=1.0)
  grads = nnx.grad(lambda m: layerskip_loss(m, batch, 0, 0, cfg)[0])(model)
  assert float(jnp.abs(grads.layers.mlp.down_proj[...][0]).sum()) > 0
  assert np.isfinite(np.asarray(jax.tree.leaves(grads)[0])).all()


def test_exit_statistics_chunked_equal_a_full_logits_reference(small_model):
  """Every exit, the last included, is evaluated chunk by chunk (odd chunk length, a padded last chunk): the sums
  equal those from full [B, T, V] logits, and the program holds no [B, T, V] array."""
  from layerskip_jax.objective.loss import exit_statistics

  batch = _batch(batch=4)  # 96 tokens: more rows than the head's kernel has (64), so the shape check can tell
  batch['loss_mask'] = batch['loss_mask'].at[0, :3].set(0.0)
  stats = jax.jit(lambda b: exit_statistics(small_model, b, chunk_len=5))(batch)
  logits = small_model.head(small_model.hidden_states(batch['inputs']))  # [L, B, T, V]
  mask = np.asarray(batch['loss_mask'])
  top1 = np.asarray(jnp.argmax(logits, axis=-1))
  targets = np.asarray(batch['targets'])
  ce = np.asarray(
    jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch['targets'][None, ..., None], -1)[..., 0]
  )
  np.testing.assert_allclose(stats['ce'], (ce * mask).sum((1, 2)), rtol=1e-5)
  np.testing.assert_allclose(stats['correct'], ((top1 == targets) * mask).sum((1, 2)))
  np.testing.assert_allclose(stats['agree_final'], ((top1 == top1[-1]) * mask).sum((1, 2)))
  assert float(stats['agree_final'][-1]) == float(stats['tokens']) == mask.sum()
  import math
  import re

  text = str(jax.make_jaxpr(lambda b: exit_statistics(small_model, b, 5))(batch))  # nested scans included
  shapes = [tuple(map(int, m.split(','))) for m in re.findall(r'f32\[([\d,]+)\]', text)]
  vocab, tokens = small_model.config.vocab_size, batch['inputs'].size
  assert [s for s in shapes if s[-1] == vocab], 'the negative control: chunk logits are there'
  assert not [s for s in shapes if s[-1] == vocab and math.prod(s[:-1]) >= tokens], 'whole-sequence logits'


# --- self-distillation (spec section 1.5) ------------------------------------------------------------------------


def _reference_distillation(logits, teacher, targets, mask, kind, tau):
  """The spec's D over the whole sequence at once: KL(p_L || p_l) tau^2 at temperature tau, or CE with argmax z_L."""
  if kind == 'hard':
    d = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.argmax(teacher, -1))
  else:
    p = jax.nn.softmax(teacher / tau, -1)
    d = jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(logits / tau, -1)), -1) * tau**2
  return jnp.sum(d * mask) / jnp.sum(mask)


@pytest.mark.parametrize('kind,tau', [('soft', 1.0), ('soft', 2.0), ('hard', 1.0)])
def test_distillation_matches_an_unchunked_reference(small_model, kind, tau):
  """Each early exit's term is (1 - lambda) CE + lambda D(last || exit), computed chunk by chunk (7 does not
  divide 24) against the whole-sequence formula; the logged exit cross-entropies stay plain CE."""
  batch = _batch()
  batch['loss_mask'] = batch['loss_mask'].at[0, 20:].set(0)
  lam = 0.3
  cfg = ObjectiveConfig(
    total_steps=10,
    p_max=0.0,
    curriculum='none',
    ce_chunk_len=7,
    distill_weight=lam,
    distill=kind,
    distill_temperature=tau,
  )
  loss, metrics = nnx.jit(lambda m: layerskip_loss(m, batch, 1, 0, cfg))(small_model)
  weights = np.asarray(objective.early_exit_weights(4, 1, 10, 'none', 4, 1.0))
  teacher = small_model(batch['inputs'])
  want = 0.0
  for l in range(4):
    logits = small_model(batch['inputs'], exit_layer=l + 1)
    ce = float(_reference_ce(logits, batch['targets'], batch['loss_mask']))
    if weights[l] == 0:  # exit 1: e(0) = 0, never supervised
      assert np.isnan(float(metrics['exit_ce'][l]))
      continue
    assert abs(float(metrics['exit_ce'][l]) - ce) < 1e-5
    if l < 3:
      d = float(_reference_distillation(logits, teacher, batch['targets'], batch['loss_mask'], kind, tau))
      want += weights[l] * ((1 - lam) * ce + lam * d)
    else:
      want += weights[l] * ce  # the last exit's own term: no distillation
  assert abs(float(loss) - want) < 1e-5, (float(loss), want)


def test_no_gradient_reaches_the_last_exit_through_distillation(small_model):
  """D is taken against the last exit held fixed: its gradient with respect to the teacher's hidden state is zero,
  while the student's is not."""
  batch = _batch()
  x0 = small_model.embed(batch['inputs'])
  positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
  student = small_model.run_span(x0, positions, stop=1)
  teacher = small_model.run_span(x0, positions)

  def distilled(student, teacher):
    return objective.distillation_sums(small_model, student, teacher, batch['targets'], batch['loss_mask'], 7)[1]

  g_student, g_teacher = jax.grad(distilled, argnums=(0, 1))(student, teacher)
  assert float(jnp.max(jnp.abs(g_teacher))) == 0.0 and float(jnp.max(jnp.abs(g_student))) > 0


def test_distillation_config_is_checked():
  from layerskip_jax import config as config_lib

  for override, message in (
    ('layerskip.distill=kl', "layerskip.distill='kl'"),
    ('layerskip.distill_weight=1.5', 'layerskip.distill_weight=1.5'),
    ('layerskip.distill_temperature=0', 'layerskip.distill_temperature=0'),
  ):
    key, value = override.split('=')
    with pytest.raises(config_lib.ConfigError, match=message.replace('.', r'\.').replace('(', r'\(')):
      config_lib.load(
        'tiny',
        {
          key: type(config_lib.load('tiny')[key.split('.')[0]][key.split('.')[1]])(value)
          if key != 'layerskip.distill'
          else value
        },
      )


def test_distillation_lambda_warms_up(small_model):
  """With distill_warmup w, lambda ramps linearly from 0 to distill_weight over the first w x T steps: at step 0 the
  loss is the paper's, halfway through the ramp it is the loss at lambda / 2."""
  batch = _batch()
  common = dict(total_steps=100, p_max=0.0, curriculum='none', ce_chunk_len=8)
  loss = lambda cfg, step: float(layerskip_loss(small_model, batch, step, 0, ObjectiveConfig(**common, **cfg))[0])
  warm = dict(distill_weight=0.6, distill_warmup=0.5)
  assert loss(warm, 0) == pytest.approx(loss({}, 0), abs=1e-6)
  assert loss(warm, 25) == pytest.approx(loss(dict(distill_weight=0.3), 25), abs=1e-5)
  assert loss(warm, 80) == pytest.approx(loss(dict(distill_weight=0.6), 80), abs=1e-5)
  assert loss(warm, 80) != pytest.approx(loss({}, 80), abs=1e-4)

"""The NNX Llama model: shapes, dtypes, causality, GQA, scan, layer ranges, packing, keep-masks, remat, compile size."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerskip_jax.model import Transformer, create
from layerskip_jax.model.transformer import default_positions


def _tokens(batch=2, seq=12, vocab=128, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, (batch, seq)), jnp.int32)


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=tol)


def _layer(model: Transformer, l: int):
  """Layer l of the stack as its own module (a test-side reference for the scan)."""
  graphdef, state = nnx.split(model.layers)
  return nnx.merge(graphdef, jax.tree.map(lambda a: a[l], state))


def _unrolled_hidden(model: Transformer, tokens):
  """x_1..x_L with a plain Python loop over layers: the reference the scan must match."""
  positions = default_positions(tokens)
  from layerskip_jax.model.rope import rope_tables

  cos, sin = rope_tables(positions, model.config)
  x, outs = model.embed(tokens), []
  for l in range(model.config.num_hidden_layers):
    x = _layer(model, l)(x, cos, sin, None)
    outs.append(x)
  return jnp.stack(outs)


def test_shapes_and_dtypes(small_model, small_config):
  tokens = _tokens()
  logits = small_model(tokens)
  assert logits.shape == (2, 12, small_config.vocab_size) and logits.dtype == jnp.float32
  hidden = small_model.hidden_states(tokens)
  assert hidden.shape == (small_config.num_hidden_layers, 2, 12, small_config.hidden_size)
  state = nnx.state(small_model, nnx.Param)
  assert state['layers']['self_attn']['q_proj'][...].shape == (4, 64, 64)
  assert state['layers']['self_attn']['k_proj'][...].shape == (4, 64, 32)
  assert state['layers']['mlp']['down_proj'][...].shape == (4, 96, 64)
  assert state['layers']['mlp']['down_proj'].get_metadata()['logical_axes'] == ('layers', 'mlp', 'embed')


def test_mixed_precision_dtypes(small_config):
  cfg = small_config.replace(dtype='bfloat16', param_dtype='bfloat16')
  model = create(cfg, seed=0)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  tokens = _tokens()
  assert model.embed(tokens).dtype == jnp.bfloat16
  assert model.hidden_states(tokens).dtype == jnp.bfloat16
  logits = model(tokens)
  assert logits.dtype == jnp.float32  # the head's output (and so the loss) is float32
  # bf16 compute agrees with float32 compute on the same (bf16-representable) weights to bf16 precision
  f32 = create(small_config, seed=0)
  nnx.update(f32, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(model)))
  ref = f32(tokens)
  assert float(jnp.max(jnp.abs(logits - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))
  f32_params_bf16_compute = create(small_config.replace(dtype='bfloat16'), seed=0)
  assert jax.tree.leaves(nnx.state(f32_params_bf16_compute))[0].dtype == jnp.float32


def test_bf16_logits_are_float32_products_of_bf16_operands(small_config):
  """The head accumulates and returns float32 (preferred_element_type): a bf16 model's logits are not rounded to
  bf16 (which ties and flips argmaxes of a large vocabulary)."""
  model = create(small_config.replace(dtype='bfloat16', param_dtype='bfloat16'), seed=0)
  x = model.hidden_states(_tokens())[-1]
  logits = np.asarray(model.head(x))
  h = np.asarray(model.norm(x, jnp.bfloat16), np.float32)  # the bf16 operands, exactly, in float32
  reference = h @ np.asarray(model.lm_head[...], np.float32)
  np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)
  rounded = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
  assert np.mean(logits != rounded) > 0.5  # most logits carry bits a bf16 cannot hold


def test_causality(small_model):
  tokens = _tokens(seq=16)
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 128)
  a, b = small_model(tokens), small_model(changed)
  _close(a[:, :10], b[:, :10], 0)
  assert float(jnp.max(jnp.abs(a[:, 10:] - b[:, 10:]))) > 1e-3


def test_gqa_equals_mha_with_repeated_kv_heads(small_model, small_config):
  groups = small_config.num_attention_heads // small_config.num_key_value_heads
  mha = create(small_config.replace(num_key_value_heads=small_config.num_attention_heads), seed=1)
  state = nnx.state(small_model)
  hd = small_config.head_dim

  def repeat_heads(kernel):  # [L, D, kv*hd] -> [L, D, kv*groups*hd], kv head j serves query heads j*groups..
    layers, d, _ = kernel.shape
    k = kernel.reshape(layers, d, -1, 1, hd)
    return jnp.broadcast_to(k, (layers, d, k.shape[2], groups, hd)).reshape(layers, d, -1)

  attn = state['layers']['self_attn']
  attn['k_proj'] = attn['k_proj'].replace(repeat_heads(attn['k_proj'][...]))
  attn['v_proj'] = attn['v_proj'].replace(repeat_heads(attn['v_proj'][...]))
  nnx.update(mha, state)
  tokens = _tokens()
  _close(small_model(tokens), mha(tokens), 1e-5)


def test_scan_equals_unrolled_loop(small_model, small_config):
  tokens = _tokens()
  reference = _unrolled_hidden(small_model, tokens)
  _close(small_model.hidden_states(tokens), reference, 1e-5)
  unrolled = create(small_config.replace(scan_unroll=small_config.num_hidden_layers), seed=0)
  _close(unrolled.hidden_states(tokens), reference, 1e-5)
  # the last exit sees x_L, the last layer's output (never a layer's input: spec section 3)
  _close(small_model(tokens), small_model.head(reference[-1]), 1e-5)


def test_layer_ranges_compose(small_model, small_config):
  tokens = _tokens()
  positions = default_positions(tokens)
  x0 = small_model.embed(tokens)
  full = small_model.run_span(x0, positions)
  hidden = _unrolled_hidden(small_model, tokens)
  for exit_layer in range(1, small_config.num_hidden_layers):
    x_e = small_model.run_span(x0, positions, stop=exit_layer)
    _close(x_e, hidden[exit_layer - 1], 1e-5)
    x_l = small_model.run_span(x_e, positions, start=exit_layer)
    _close(x_l, full, 1e-5)


def test_traced_exit_layer_one_compile(small_model, small_config):
  tokens = _tokens()
  hidden = _unrolled_hidden(small_model, tokens)

  traces = []

  @nnx.jit
  def split_run(model, tokens, exit_layer):
    traces.append(exit_layer)
    positions = default_positions(tokens)
    x_e = model.run_span(model.embed(tokens), positions, stop=exit_layer)
    x_l = model.run_span(x_e, positions, start=exit_layer)
    return model.head(x_e), x_l

  for exit_layer in range(1, small_config.num_hidden_layers + 1):
    early, last = split_run(small_model, tokens, jnp.int32(exit_layer))
    _close(early, small_model.head(hidden[exit_layer - 1]), 1e-5)
    _close(last, hidden[-1], 1e-5)
  assert len(traces) == 1  # traced (so compiled) once: one program serves every exit


def test_packed_sequences_equal_separate_documents(small_model):
  doc_a, doc_b = _tokens(1, 7, seed=1), _tokens(1, 5, seed=2)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  segment_ids = jnp.asarray([[1] * 7 + [2] * 5])
  positions = jnp.asarray([list(range(7)) + list(range(5))])
  logits = small_model(packed, positions, segment_ids)
  _close(logits[:, :7], small_model(doc_a), 1e-5)
  _close(logits[:, 7:], small_model(doc_b), 1e-5)


def test_sample_keep_skips_layer_for_that_sequence_only(small_model, small_config):
  tokens = _tokens()
  positions = default_positions(tokens)
  x0 = small_model.embed(tokens)
  keep = jnp.ones((small_config.num_hidden_layers, 2), bool).at[2, 0].set(False)
  every = jnp.arange(small_config.num_hidden_layers, dtype=jnp.int32)
  _, hidden = small_model.run_train(x0, positions, sample_keep=keep, collect_layers=every)
  reference = _unrolled_hidden(small_model, tokens)
  _close(hidden[:, 1], reference[:, 1], 1e-5)  # row 1 keeps every layer
  _close(hidden[2, 0], hidden[1, 0], 0)  # row 0 passes layer 2 unchanged
  x2 = small_model.run_span(x0[:1], positions[:1], stop=2)
  x_ref = small_model.run_span(x2, positions[:1], start=3)
  _close(hidden[-1, :1], x_ref, 1e-5)


def test_collect_layers_returns_those_layers_outputs(small_model, small_config):
  """The training step's exit buffer: the outputs of the chosen layers only (any order), under dropout masks too."""
  tokens = _tokens()
  positions = default_positions(tokens)
  x0 = small_model.embed(tokens)
  keep = jnp.ones((small_config.num_hidden_layers, 2), bool).at[1, 0].set(False)
  all_layers = jnp.arange(small_config.num_hidden_layers, dtype=jnp.int32)
  x_all, every = small_model.run_train(x0, positions, sample_keep=keep, collect_layers=all_layers)
  chosen = jnp.asarray([2, 0], jnp.int32)
  x_some, some = jax.jit(lambda x, c: small_model.run_train(x, positions, sample_keep=keep, collect_layers=c))(
    x0, chosen
  )
  assert some.shape == (2, *x0.shape)
  _close(some, every[np.asarray(chosen)], 1e-6)
  _close(x_some, x_all, 1e-6)


def test_layer_keep_skips_with_a_conditional(small_model, small_config):
  tokens = _tokens()
  positions = default_positions(tokens)
  keep = jnp.asarray([True, False, True, True])

  def run(model, x0, keep):
    return model.run_train(x0, positions, layer_keep=keep)[0]

  x0 = small_model.embed(tokens)
  out = nnx.jit(run)(small_model, x0, keep)
  x1 = small_model.run_span(x0, positions, stop=1)
  ref = small_model.run_span(x1, positions, start=2)
  _close(out, ref, 1e-5)
  text = nnx.jit(run).lower(small_model, x0, keep).as_text()
  assert re.search(r'stablehlo\.case|stablehlo\.if', text), 'a skipped layer must be a conditional, not a multiply'


@pytest.mark.parametrize('policy', ['full', 'save_dots', 'save_proj'])
def test_remat_policies_give_the_same_gradients(small_model, small_config, policy):
  tokens = _tokens()

  def loss(model):
    return jnp.mean(model.head(model.hidden_states(tokens)[-1]) ** 2)

  remat = create(small_config.replace(remat_policy=policy), seed=0)
  g_ref = nnx.grad(loss)(small_model)
  g = nnx.grad(loss)(remat)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g)):
    _close(a, b, 1e-6)


def test_lowered_program_does_not_grow_with_depth(small_config):
  def lowered_ops(num_layers):
    model = nnx.eval_shape(lambda: create(small_config.replace(num_hidden_layers=num_layers)))
    text = nnx.jit(lambda m, t: m(t)).lower(model, jax.ShapeDtypeStruct((2, 8), jnp.int32)).as_text()
    return len(re.findall(r'stablehlo\.dot_general', text)), len(text.splitlines())

  dots_2, lines_2 = lowered_ops(2)
  dots_16, lines_16 = lowered_ops(16)
  assert dots_2 == dots_16 and lines_2 == lines_16


def test_the_runners_earlier_names_still_work(small_model, small_config):
  """run_layers and run_layers_cached (the names before one runner per purpose) dispatch to the new runners."""
  tokens = _tokens()
  positions = default_positions(tokens)
  x0 = small_model.embed(tokens)
  with pytest.warns(DeprecationWarning, match='run_span, run_train or hidden_states'):
    x2, none = small_model.run_layers(x0, positions, stop=2)
  assert none is None
  _close(x2, small_model.run_span(x0, positions, stop=2), 0)
  keep = jnp.ones((small_config.num_hidden_layers, 2), bool).at[1, 0].set(False)
  with pytest.warns(DeprecationWarning):
    x_l, hidden = small_model.run_layers(x0, positions, sample_keep=keep, collect=True)
  every = jnp.arange(small_config.num_hidden_layers, dtype=jnp.int32)
  ref_l, ref_hidden = small_model.run_train(x0, positions, sample_keep=keep, collect_layers=every)
  _close(x_l, ref_l, 0)
  _close(hidden, ref_hidden, 0)
  from layerskip_jax.inference.cache import init_cache

  cache_k, cache_v = init_cache(small_config, tokens.shape[0], 32)
  with pytest.warns(DeprecationWarning, match='run_cached or run_cached_unstacked'):
    old = small_model.run_layers_cached(x0, positions, cache_k, cache_v, stop=2)
  new = small_model.run_cached(x0, positions, cache_k, cache_v, stop=2)
  for a, b in zip(old, new):
    _close(a, b, 0)

"""Compiled decoding: prefill, then one lax.while_loop per call for autoregressive, early-exit or self-speculative
generation (spec section 2.2, step by step). Batched: every row has its own position, accepts its own number of
drafts and stops on its own (EOS ids or max_new_tokens). Exit E, d and the sampling settings are traced values, so
sweeping them does not recompile; d is bounded by the static d_max.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from layerskip_jax.inference.cache import init_cache
from layerskip_jax.inference.sampling import probabilities, sample
from layerskip_jax.model import Transformer

STRATEGIES = ('autoregressive', 'early_exit', 'self_speculative')


class Sampling(NamedTuple):
  temperature: jax.Array  # float32; ignored when greedy
  top_k: jax.Array  # int32, 0 = off
  top_p: jax.Array  # float32, 1.0 = off


class DecodeState(NamedTuple):
  cache_k: jax.Array
  cache_v: jax.Array
  y0: jax.Array  # [B] the next token: chosen, emitted, not yet run through any layer
  pos: jax.Array  # [B] its position
  out: jax.Array  # [B, max_new + d_max + 1] generated ids
  n_out: jax.Array  # [B] how many are valid
  done: jax.Array  # [B]
  key: jax.Array
  drafted: jax.Array  # [B]
  accepted: jax.Array  # [B]
  layer_rows: jax.Array  # [L] token rows each layer processed after prefill (meaningful rows only)


def _choose(key, logits, greedy: bool, sampling: Sampling):
  """(token [B], the distribution it came from [B, V] or None when greedy)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
  probs = probabilities(logits, sampling.temperature, sampling.top_k, sampling.top_p)
  return sample(key, probs), probs


def _emit(state: DecodeState, tokens: jax.Array, counts: jax.Array, eos_ids: tuple[int, ...], max_new: int):
  """Appends the first counts[b] of tokens[b] to each active row, stopping at an EOS (kept) or max_new."""
  active = ~state.done
  width = tokens.shape[1]
  is_eos = jnp.zeros(tokens.shape, bool)
  for eos in eos_ids:
    is_eos |= tokens == eos
  first_eos = jnp.argmax(is_eos & (jnp.arange(width) < counts[:, None]), axis=1)
  has_eos = jnp.any(is_eos & (jnp.arange(width) < counts[:, None]), axis=1)
  counts = jnp.where(has_eos, jnp.minimum(counts, first_eos + 1), counts)
  counts = jnp.where(active, jnp.minimum(counts, max_new - state.n_out), 0)
  write = jax.vmap(lambda row, new, start: jax.lax.dynamic_update_slice_in_dim(row, new, start, axis=0))
  out = jnp.where(active[:, None], write(state.out, tokens, state.n_out), state.out)
  n_out = state.n_out + counts
  done = state.done | (active & has_eos) | (n_out >= max_new)
  return out, n_out, done


def _prefill(model: Transformer, layer_params, tokens, lengths, cache_k, cache_v, exit_layer):
  """All layers over the (right-padded) prompts; returns the logits of exit E and of the last exit at each row's
  last prompt position, and the filled cache."""
  batch, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  x_e, cache_k, cache_v, _ = model.run_layers_cached(model.embed(tokens), positions, cache_k, cache_v,
                                                     stop=exit_layer, layer_params=layer_params)
  x_l, cache_k, cache_v, _ = model.run_layers_cached(x_e, positions, cache_k, cache_v, start=exit_layer,
                                                     layer_params=layer_params)
  last = (lengths - 1)[:, None, None]
  pick = lambda x: jnp.take_along_axis(x, last, axis=1)[:, 0]
  return model.head(pick(x_e)), model.head(pick(x_l)), cache_k, cache_v


def _one_token_step(model, layer_params, state: DecodeState, exit_layer, greedy, sampling, eos_ids, max_new):
  """Autoregressive (exit_layer = L) or early-exit decoding of one token per row."""
  active = ~state.done
  x, cache_k, cache_v, ran = model.run_layers_cached(model.embed(state.y0[:, None]), state.pos[:, None],
                                                     state.cache_k, state.cache_v, stop=exit_layer,
                                                     layer_params=layer_params)
  key, sub = jax.random.split(state.key)
  token, _ = _choose(sub, model.head(x[:, 0]), greedy, sampling)
  out, n_out, done = _emit(state, token[:, None], jnp.ones_like(state.n_out), eos_ids, max_new)
  return state._replace(cache_k=cache_k, cache_v=cache_v, y0=jnp.where(active, token, state.y0),
                        pos=state.pos + active, out=out, n_out=n_out, done=done, key=key,
                        layer_rows=state.layer_rows + ran * jnp.sum(active))


def _speculative_round(model, layer_params, state: DecodeState, exit_layer, num_speculations, d_max, greedy,
                       sampling, eos_ids, max_new):
  """One round: draft d tokens with layers [0, E), run y_d through them too, verify the d + 1 positions with
  layers [E, L) from the saved x_E, accept, emit, roll back (spec section 2.2)."""
  batch = state.y0.shape[0]
  vocab = model.config.vocab_size
  active = ~state.done
  n_active = jnp.sum(active)
  d = num_speculations

  def through_early_layers(carry, token, offset):
    cache_k, cache_v, xq, rows = carry
    x, cache_k, cache_v, ran = model.run_layers_cached(model.embed(token[:, None]), (state.pos + offset)[:, None],
                                                       cache_k, cache_v, stop=exit_layer,
                                                       layer_params=layer_params)
    xq = jax.lax.dynamic_update_slice_in_dim(xq, x, offset, axis=1)  # save x_E (the "Q" of the KVQ cache)
    return (cache_k, cache_v, xq, rows + ran * n_active), x[:, 0]

  def draft(k, carry):
    inner, token, drafts, draft_probs, key = carry
    inner, x_e = through_early_layers(inner, token, k)
    key, sub = jax.random.split(key)
    y, q = _choose(sub, model.head(x_e), greedy, sampling)
    drafts = jax.lax.dynamic_update_slice_in_dim(drafts, y[:, None], k, axis=1)
    if q is not None:
      draft_probs = jax.lax.dynamic_update_slice_in_dim(draft_probs, q[:, None], k, axis=1)
    return inner, y, drafts, draft_probs, key

  xq = jnp.zeros((batch, d_max + 1, model.config.hidden_size), model.config.compute_dtype)
  drafts = jnp.zeros((batch, d_max), jnp.int32)
  draft_probs = None if greedy else jnp.zeros((batch, d_max, vocab), jnp.float32)
  inner = (state.cache_k, state.cache_v, xq, state.layer_rows)
  inner, y_d, drafts, draft_probs, key = jax.lax.fori_loop(0, d, draft, (inner, state.y0, drafts, draft_probs,
                                                                         state.key))
  (cache_k, cache_v, xq, rows), _ = through_early_layers(inner, y_d, d)  # y_d: x_E known for p..p+d

  verify_pos = state.pos[:, None] + jnp.arange(d_max + 1)
  x_l, cache_k, cache_v, ran = model.run_layers_cached(xq, verify_pos, cache_k, cache_v, start=exit_layer,
                                                       layer_params=layer_params)
  rows = rows + ran * n_active * (d + 1)  # meaningful rows; the block is static (d_max + 1)
  logits = model.head(x_l)  # row j judges draft j+1; row a gives the correction or the bonus token

  index = jnp.arange(d_max)
  key, accept_key, next_key = jax.random.split(key, 3)
  if greedy:
    target = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    accepted_each = drafts == target[:, :d_max]
  else:
    p = probabilities(logits, sampling.temperature, sampling.top_k, sampling.top_p)  # [B, d_max + 1, V]
    p_draft = jnp.take_along_axis(p[:, :d_max], drafts[..., None], axis=-1)[..., 0]
    q_draft = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(accept_key, (batch, d_max))
    accepted_each = u * q_draft < p_draft  # u < min(1, p/q)
  a = jnp.sum(jnp.cumprod(accepted_each & (index < d), axis=1), axis=1).astype(jnp.int32)
  if greedy:
    next_token = jnp.take_along_axis(target, a[:, None], axis=1)[:, 0]
  else:
    p_a = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]
    q_a = jnp.take_along_axis(jnp.concatenate([draft_probs, jnp.zeros_like(p[:, :1])], axis=1), a[:, None, None],
                              axis=1)[:, 0]
    residual = jnp.maximum(p_a - q_a, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    rejected = (a < d)[:, None]
    dist = jnp.where(rejected & (mass > 0), residual / jnp.maximum(mass, 1e-30), p_a)
    next_token = sample(next_key, dist)

  tokens = jnp.where(jnp.arange(d_max + 1) < a[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), next_token[:, None])
  out, n_out, done = _emit(state, tokens, a + 1, eos_ids, max_new)
  return state._replace(
      cache_k=cache_k, cache_v=cache_v, y0=jnp.where(active, next_token, state.y0),
      pos=jnp.where(active, state.pos + a + 1, state.pos), out=out, n_out=n_out, done=done, key=key,
      drafted=state.drafted + jnp.where(active, d, 0), accepted=state.accepted + jnp.where(active, a, 0),
      layer_rows=rows)


@functools.partial(jax.jit, static_argnames=('graphdef', 'strategy', 'max_new', 'd_max', 'cache_len', 'greedy',
                                             'eos_ids'))
def prefill(graphdef, params, layer_params, tokens, lengths, exit_layer, sampling: Sampling, key, *, strategy: str,
            max_new: int, d_max: int, cache_len: int, greedy: bool, eos_ids: tuple[int, ...]) -> DecodeState:
  """Runs the right-padded prompts tokens [B, P] (lengths [B]) through every layer into a fresh cache and emits
  the first token (from exit E for early_exit, else from the last exit)."""
  model = nnx.merge(graphdef, params)
  num_layers = model.config.num_hidden_layers
  batch = tokens.shape[0]
  cache_k, cache_v = init_cache(model.config, batch, cache_len)
  exit_layer = jnp.asarray(exit_layer, jnp.int32) if strategy != 'autoregressive' else jnp.int32(num_layers)
  logits_e, logits_l, cache_k, cache_v = _prefill(model, layer_params, tokens, lengths, cache_k, cache_v, exit_layer)
  key, sub = jax.random.split(key)
  first, _ = _choose(sub, logits_e if strategy == 'early_exit' else logits_l, greedy, sampling)
  state = DecodeState(cache_k=cache_k, cache_v=cache_v, y0=first, pos=lengths.astype(jnp.int32),
                      out=jnp.zeros((batch, max_new + d_max + 1), jnp.int32), n_out=jnp.zeros((batch,), jnp.int32),
                      done=jnp.zeros((batch,), bool), key=key, drafted=jnp.zeros((batch,), jnp.int32),
                      accepted=jnp.zeros((batch,), jnp.int32), layer_rows=jnp.zeros((num_layers,), jnp.int32))
  out, n_out, done = _emit(state, first[:, None], jnp.ones((batch,), jnp.int32), eos_ids, max_new)
  return state._replace(out=out, n_out=n_out, done=done)


@functools.partial(jax.jit, static_argnames=('graphdef', 'strategy', 'max_new', 'd_max', 'greedy', 'eos_ids'),
                   donate_argnums=(3,))
def decode_loop(graphdef, params, layer_params, state: DecodeState, exit_layer, num_speculations,
                sampling: Sampling, *,
                strategy: str, max_new: int, d_max: int, greedy: bool, eos_ids: tuple[int, ...]) -> DecodeState:
  """Generates until every row is done, in one lax.while_loop (no per-token dispatch or host transfer)."""
  model = nnx.merge(graphdef, params)
  exit_layer = jnp.asarray(exit_layer, jnp.int32)
  if strategy == 'self_speculative':
    step = lambda s: _speculative_round(model, layer_params, s, exit_layer, jnp.asarray(num_speculations, jnp.int32),
                                        d_max, greedy, sampling, eos_ids, max_new)
  else:
    step_exit = exit_layer if strategy == 'early_exit' else jnp.int32(model.config.num_hidden_layers)
    step = lambda s: _one_token_step(model, layer_params, s, step_exit, greedy, sampling, eos_ids, max_new)
  return jax.lax.while_loop(lambda s: ~jnp.all(s.done), step, state)

"""Compiled decoding: prefill, then one lax.while_loop per call for autoregressive, early-exit or self-speculative
generation (spec section 2.2, step by step). Batched: every row has its own position, accepts its own number of
drafts, stops drafting on its own (a confidence threshold, or the tokens it may still emit) and stops on its own (EOS
ids or max_new_tokens).

What is compiled once and what is a runtime value:
- d, the sampling settings and the drafting threshold are runtime values; the verify block is static: d_max + 1
  rows, d_max the "d bucket" (generate() makes it d itself unless told otherwise: every verified row costs, so one
  program per d is the fastest; a shared bucket serves every d up to it).
- E is a runtime value in the unstacked layout (the CPU's: float32 layers, a lax.cond per layer: one program for
  every exit) and static in the stacked one (GPU/TPU: loops over exactly the layers a phase runs, no conditional per
  layer; one program per exit); inference/layout.py decides which.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from layerskip_jax.inference.cache import init_cache
from layerskip_jax.inference.layout import run_cached
from layerskip_jax.inference.sampling import probabilities, sample
from layerskip_jax.model import Transformer

STRATEGIES = ('autoregressive', 'early_exit', 'self_speculative')


class Sampling(NamedTuple):
  temperature: jax.Array  # float32; ignored when greedy
  top_k: jax.Array  # int32, 0 = off
  top_p: jax.Array  # float32, 1.0 = off


class Drafting(NamedTuple):
  """When a self-speculative row stops drafting early (spec section 2.5); runtime values, like E and d."""

  threshold: jax.Array  # float32: stop after a draft whose top probability is below it (0 = off; the start value
  #                       of every row's threshold when adapting)
  adapt: jax.Array  # bool: move each row's threshold by ADAPT_STEP per round from its acceptance


ADAPT_STEP = 0.05  # per round: up after a rejected draft, down after a row stopped by confidence had all accepted


class DecodeState(NamedTuple):
  cache_k: jax.Array
  cache_v: jax.Array
  y0: jax.Array  # [B] the next token: chosen, emitted, not yet run through any layer
  pos: jax.Array  # [B] its position
  out: jax.Array  # [B, max_new + d_max + 1] generated ids
  n_out: jax.Array  # [B] how many are valid
  done: jax.Array  # [B]
  key: jax.Array
  drafted: jax.Array  # [B] drafts made (only drafts that could have been emitted: never past max_new)
  accepted: jax.Array  # [B]
  rounds: jax.Array  # [B] self-speculative rounds each row took part in
  threshold: jax.Array  # [B] float32: each row's draft-confidence threshold (Drafting)
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
  x_e, cache_k, cache_v, _ = run_cached(
    model, layer_params, model.embed(tokens), positions, cache_k, cache_v, stop=exit_layer
  )
  x_l = x_e
  if not isinstance(exit_layer, int) or exit_layer < model.config.num_hidden_layers:
    x_l, cache_k, cache_v, _ = run_cached(model, layer_params, x_e, positions, cache_k, cache_v, start=exit_layer)
  last = (lengths - 1)[:, None, None]
  pick = lambda x: jnp.take_along_axis(x, last, axis=1)[:, 0]
  return model.head(pick(x_e)), model.head(pick(x_l)), cache_k, cache_v


def _one_token_step(model, layer_params, state: DecodeState, exit_layer, greedy, sampling, eos_ids, max_new):
  """Autoregressive (exit_layer = L) or early-exit decoding of one token per row."""
  active = ~state.done
  x, cache_k, cache_v, ran = run_cached(
    model,
    layer_params,
    model.embed(state.y0[:, None]),
    state.pos[:, None],
    state.cache_k,
    state.cache_v,
    stop=exit_layer,
  )
  key, sub = jax.random.split(state.key)
  token, _ = _choose(sub, model.head(x[:, 0]), greedy, sampling)
  out, n_out, done = _emit(state, token[:, None], jnp.ones_like(state.n_out), eos_ids, max_new)
  return state._replace(
    cache_k=cache_k,
    cache_v=cache_v,
    y0=jnp.where(active, token, state.y0),
    pos=state.pos + active,
    out=out,
    n_out=n_out,
    done=done,
    key=key,
    layer_rows=state.layer_rows + ran * jnp.sum(active),
  )


def _top_probability(logits: jax.Array, probs: jax.Array | None) -> jax.Array:
  """[B] the early exit's probability of its most likely token: the draft's confidence."""
  if probs is not None:
    return jnp.max(probs, axis=-1)
  return 1.0 / jnp.sum(jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)), axis=-1)


def _speculative_round(
  model,
  layer_params,
  state: DecodeState,
  exit_layer,
  num_speculations,
  d_max,
  greedy,
  sampling,
  drafting: Drafting,
  eos_ids,
  max_new,
):
  """One round: draft up to d tokens with layers [0, E), run the last draft through them too, verify the drafted
  positions with layers [E, L) from the saved x_E, accept, emit, roll back (spec section 2.2).

  A row drafts no more tokens than it could emit (the round emits accepted + 1 <= the tokens it may still add), and
  stops after a draft whose top probability is below its threshold (the low-confidence draft is still verified).
  The draft loop runs while any row drafts; rows that stopped ride along in the batch and what they compute past
  their last draft is never used (their verify rows past it are not compared, and the cache slots it writes lie
  past the row's valid length: masked, then overwritten)."""
  batch = state.y0.shape[0]
  vocab = model.config.vocab_size
  active = ~state.done
  limit = jnp.where(active, jnp.minimum(num_speculations, max_new - state.n_out - 1), 0)
  use_confidence = drafting.adapt | (drafting.threshold > 0)

  def through_early_layers(cache_k, cache_v, xq, token, offset):
    x, cache_k, cache_v, ran = run_cached(
      model, layer_params, model.embed(token[:, None]), (state.pos + offset)[:, None], cache_k, cache_v, stop=exit_layer
    )
    xq = jax.lax.dynamic_update_slice_in_dim(xq, x, offset, axis=1)  # save x_E (the "Q" of the KVQ cache)
    return cache_k, cache_v, xq, x[:, 0], ran

  def draft(carry):
    k, cache_k, cache_v, xq, token, drafts, draft_probs, n_drafts, going, key = carry
    cache_k, cache_v, xq, x_e, _ = through_early_layers(cache_k, cache_v, xq, token, k)
    key, sub = jax.random.split(key)
    logits = model.head(x_e)
    y, q = _choose(sub, logits, greedy, sampling)
    # computed always (a softmax's max over the vocabulary: small beside the head's matmul), not under a
    # conditional: on a GPU a conditional's predicate is read by the host
    top = jnp.where(use_confidence, _top_probability(logits, q), 1.0)
    drafts = jax.lax.dynamic_update_slice_in_dim(drafts, y[:, None], k, axis=1)
    if q is not None:
      draft_probs = jax.lax.dynamic_update_slice_in_dim(draft_probs, q[:, None], k, axis=1)
    n_drafts = n_drafts + going
    going = going & (k + 1 < limit) & (top >= state.threshold)
    return k + 1, cache_k, cache_v, xq, y, drafts, draft_probs, n_drafts, going, key

  xq = jnp.zeros((batch, d_max + 1, model.config.hidden_size), model.config.compute_dtype)
  drafts = jnp.zeros((batch, d_max), jnp.int32)
  draft_probs = None if greedy else jnp.zeros((batch, d_max, vocab), jnp.float32)
  zeros = jnp.zeros((batch,), jnp.int32)
  carry = (jnp.int32(0), state.cache_k, state.cache_v, xq, state.y0, drafts, draft_probs, zeros, limit > 0, state.key)
  k, cache_k, cache_v, xq, y_last, drafts, draft_probs, n_drafts, _, key = jax.lax.while_loop(
    lambda carry: (carry[0] < num_speculations) & jnp.any(carry[-2]), draft, carry
  )
  cache_k, cache_v, xq, _, ran_early = through_early_layers(cache_k, cache_v, xq, y_last, k)  # x_E of p..p+k known

  verify_pos = state.pos[:, None] + jnp.arange(d_max + 1)
  x_l, cache_k, cache_v, ran_late = run_cached(model, layer_params, xq, verify_pos, cache_k, cache_v, start=exit_layer)
  # meaningful rows: each active row's drafts and the token before them, through every layer once (KVQ reuse)
  rows = state.layer_rows + (ran_early | ran_late) * jnp.sum(jnp.where(active, n_drafts + 1, 0))
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
  a = jnp.sum(jnp.cumprod(accepted_each & (index < n_drafts[:, None]), axis=1), axis=1).astype(jnp.int32)
  if greedy:
    next_token = jnp.take_along_axis(target, a[:, None], axis=1)[:, 0]
  else:
    p_a = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]
    q_a = jnp.take_along_axis(
      jnp.concatenate([draft_probs, jnp.zeros_like(p[:, :1])], axis=1), a[:, None, None], axis=1
    )[:, 0]
    residual = jnp.maximum(p_a - q_a, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    rejected = (a < n_drafts)[:, None]
    dist = jnp.where(rejected & (mass > 0), residual / jnp.maximum(mass, 1e-30), p_a)
    next_token = sample(next_key, dist)

  # Adapting the threshold (Draft & Verify's rule, per round): a rejected draft means the row drafted one too many:
  # raise it; every draft accepted after confidence (not the limit) stopped the row: lower it.
  stopped_early = n_drafts < limit
  step = jnp.where(a < n_drafts, ADAPT_STEP, jnp.where(stopped_early, -ADAPT_STEP, 0.0))
  threshold = jnp.where(drafting.adapt & active, jnp.clip(state.threshold + step, 0.0, 1.0), state.threshold)

  tokens = jnp.where(jnp.arange(d_max + 1) < a[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), next_token[:, None])
  out, n_out, done = _emit(state, tokens, a + 1, eos_ids, max_new)
  return state._replace(
    cache_k=cache_k,
    cache_v=cache_v,
    y0=jnp.where(active, next_token, state.y0),
    pos=jnp.where(active, state.pos + a + 1, state.pos),
    out=out,
    n_out=n_out,
    done=done,
    key=key,
    drafted=state.drafted + n_drafts,
    accepted=state.accepted + jnp.where(active, a, 0),
    rounds=state.rounds + active,
    threshold=threshold,
    layer_rows=rows,
  )


def _exits(model, strategy: str, exit_layer, static_exit: int | None):
  """(E for the draft/early exit, the layer count L): Python ints where the exit is static (the stacked-weights
  program), else E a traced int32 (one program for every exit)."""
  num_layers = model.config.num_hidden_layers
  if strategy == 'autoregressive':
    return num_layers, num_layers
  return (static_exit if static_exit is not None else jnp.asarray(exit_layer, jnp.int32)), num_layers


@functools.partial(
  jax.jit, static_argnames=('graphdef', 'strategy', 'max_new', 'd_max', 'cache_len', 'greedy', 'eos_ids', 'static_exit')
)
def prefill(
  graphdef,
  params,
  layer_params,
  tokens,
  lengths,
  exit_layer,
  sampling: Sampling,
  drafting: Drafting,
  key,
  *,
  strategy: str,
  max_new: int,
  d_max: int,
  cache_len: int,
  greedy: bool,
  eos_ids: tuple[int, ...],
  static_exit: int | None = None,
) -> DecodeState:
  """Runs the right-padded prompts tokens [B, P] (lengths [B]) through every layer into a fresh cache and emits
  the first token (from exit E for early_exit, else from the last exit). static_exit: E as a Python int (the
  stacked-weights program, one per exit), else exit_layer is a runtime value."""
  model = nnx.merge(graphdef, params)
  exit_layer, num_layers = _exits(model, strategy, exit_layer, static_exit)
  batch = tokens.shape[0]
  cache_k, cache_v = init_cache(model.config, batch, cache_len)
  logits_e, logits_l, cache_k, cache_v = _prefill(model, layer_params, tokens, lengths, cache_k, cache_v, exit_layer)
  key, sub = jax.random.split(key)
  first, _ = _choose(sub, logits_e if strategy == 'early_exit' else logits_l, greedy, sampling)
  zeros = jnp.zeros((batch,), jnp.int32)
  state = DecodeState(
    cache_k=cache_k,
    cache_v=cache_v,
    y0=first,
    pos=lengths.astype(jnp.int32),
    out=jnp.zeros((batch, max_new + d_max + 1), jnp.int32),
    n_out=zeros,
    done=jnp.zeros((batch,), bool),
    key=key,
    drafted=zeros,
    accepted=zeros,
    rounds=zeros,
    threshold=jnp.full((batch,), drafting.threshold, jnp.float32),
    layer_rows=jnp.zeros((num_layers,), jnp.int32),
  )
  out, n_out, done = _emit(state, first[:, None], jnp.ones((batch,), jnp.int32), eos_ids, max_new)
  return state._replace(out=out, n_out=n_out, done=done)


@functools.partial(
  jax.jit,
  static_argnames=('graphdef', 'strategy', 'max_new', 'd_max', 'greedy', 'eos_ids', 'static_exit'),
  donate_argnums=(3,),
)
def decode_loop(
  graphdef,
  params,
  layer_params,
  state: DecodeState,
  exit_layer,
  num_speculations,
  sampling: Sampling,
  drafting: Drafting,
  *,
  strategy: str,
  max_new: int,
  d_max: int,
  greedy: bool,
  eos_ids: tuple[int, ...],
  static_exit: int | None = None,
) -> DecodeState:
  """Generates until every row is done, in one lax.while_loop (no per-token dispatch or host transfer)."""
  model = nnx.merge(graphdef, params)
  exit_layer, num_layers = _exits(model, strategy, exit_layer, static_exit)
  if strategy == 'self_speculative':
    step = lambda s: _speculative_round(
      model,
      layer_params,
      s,
      exit_layer,
      jnp.asarray(num_speculations, jnp.int32),
      d_max,
      greedy,
      sampling,
      drafting,
      eos_ids,
      max_new,
    )
  else:
    step_exit = exit_layer if strategy == 'early_exit' else num_layers
    step = lambda s: _one_token_step(model, layer_params, s, step_exit, greedy, sampling, eos_ids, max_new)
  return jax.lax.while_loop(lambda s: ~jnp.all(s.done), step, state)

"""Turning logits into tokens: greedy argmax, or sampling after temperature, top-k and top-p (all traced values,
so changing them does not recompile).

`check_parameters` is the one place the three values are checked: inside the compiled loop a negative top_k or a
top_p of 0 would not fail, it would silently sample from nothing or from everything. generate() calls it with the
argument names, the `generate` command with its flag names (prefix='--'), so both say the same thing.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from layerskip_jax.errors import UsageError


def _real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _show(value) -> str:
  return str(value) if isinstance(value, numbers.Number) else repr(value)


def check_parameters(temperature, top_k, top_p, *, prefix: str = '') -> None:
  """Raises UsageError naming the one rule that a sampling value breaks: temperature a finite number >= 0 (0 =
  greedy), top_k an integer >= 0 (0 = all tokens), top_p in (0, 1] (1 = all tokens). `prefix` goes before each
  name ('--' for command-line flags)."""
  if not _real(temperature) or not math.isfinite(temperature):
    raise UsageError(f'{prefix}temperature={_show(temperature)}: must be a finite number (0 = greedy)')
  if temperature < 0:
    raise UsageError(f'{prefix}temperature={_show(temperature)}: must be >= 0 (0 = greedy)')
  if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool):
    raise UsageError(f'{prefix}top_k={_show(top_k)}: must be an integer (0 = all tokens)')
  if top_k < 0:
    raise UsageError(f'{prefix}top_k={_show(top_k)}: must be >= 0 (0 = all tokens)')
  if not _real(top_p) or not 0 < top_p <= 1:  # also refuses nan, which fails every comparison
    raise UsageError(f'{prefix}top_p={_show(top_p)}: must be in (0, 1] (1 = all tokens)')


def probabilities(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """float32 [..., V]: softmax(logits / temperature) restricted to the top_k most likely tokens (0 = all) and to
  the smallest set whose probability reaches top_p (1.0 = all), renormalised; tokens tied with the last one kept
  are kept.

  With both filters off nothing is sorted (a runtime branch: the values are traced); with either on, one sort of
  the vocabulary finds both cut-offs (the k-th largest logit, and the smallest logit inside the top-p mass)."""
  logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)

  def truncate(logits):
    vocab = logits.shape[-1]
    descending = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(descending, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None], axis=-1)
    in_top_k = descending >= kth
    probs = jax.nn.softmax(jnp.where(in_top_k, descending, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = in_top_k & (before < top_p)  # always keeps the most likely token
    threshold = jnp.min(jnp.where(keep, descending, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)

  filtered = (top_k > 0) | (top_p < 1.0)
  return jax.nn.softmax(jax.lax.cond(filtered, truncate, lambda logits: logits, logits), axis=-1)


def sample(key: jax.Array, probs: jax.Array) -> jax.Array:
  """One token per row from probs [B, V]."""
  return jax.random.categorical(
    key, jnp.log(jnp.maximum(probs, 1e-30)) + jnp.where(probs > 0, 0.0, -jnp.inf), axis=-1
  ).astype(jnp.int32)

"""Turning logits into tokens: greedy argmax, or sampling after temperature, top-k and top-p (all traced values,
so changing them does not recompile)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def probabilities(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """float32 [..., V]: softmax(logits / temperature) restricted to the top_k most likely tokens (0 = all) and to
  the smallest set whose probability reaches top_p (1.0 = all), renormalised."""
  logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  vocab = logits.shape[-1]
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jnp.take_along_axis(sorted_logits, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None], axis=-1)
  logits = jnp.where(logits >= kth, logits, -jnp.inf)
  sorted_probs = jax.nn.softmax(jnp.sort(logits, axis=-1)[..., ::-1], axis=-1)
  before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the strictly more likely tokens
  keep_sorted = before < top_p  # always keeps the most likely token
  threshold = jnp.min(jnp.where(keep_sorted, jnp.sort(logits, axis=-1)[..., ::-1], jnp.inf), axis=-1,
                      keepdims=True)
  logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.nn.softmax(logits, axis=-1)


def sample(key: jax.Array, probs: jax.Array) -> jax.Array:
  """One token per row from probs [B, V]."""
  return jax.random.categorical(key, jnp.log(jnp.maximum(probs, 1e-30)) + jnp.where(probs > 0, 0.0, -jnp.inf),
                                axis=-1).astype(jnp.int32)

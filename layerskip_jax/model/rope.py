"""Rotary position embeddings in the Hugging Face "rotate_half" convention, with Llama 3.1 ("llama3") scaling.

Converted Llama weights need no permutation of the q/k projections (style.md). Frequencies follow transformers'
`_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters` and `_compute_llama3_parameters`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from layerskip_jax.model.model_config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
  """float32 [head_dim // 2]: the rotation speed of each channel pair (a compile-time constant)."""
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  inv_freq = inv_freq.astype(np.float32)
  scaling = config.rope_scaling
  if scaling.rope_type == 'linear':
    return (inv_freq / scaling.factor).astype(np.float32)
  if scaling.rope_type == 'llama3':
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  return inv_freq


def rope_tables(positions: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """cos and sin, float32 [batch, seq, head_dim], for integer positions [batch, seq]."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies(config))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [batch, seq, heads, head_dim] rotated by the tables of rope_tables; computed in float32."""
  half = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)

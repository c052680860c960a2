"""One Llama decoder layer: RMSNorm, grouped-query attention with rotary embeddings, SwiGLU MLP.

Parameter names follow Hugging Face's (`self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...); kernels are
stored [in, out] (Hugging Face stores [out, in]: conversion is a transpose). Every parameter carries logical axis
names (`logical_axes` metadata) that sharding.LOGICAL_AXIS_RULES maps to the mesh.

Numerics: parameters are stored in `param_dtype`; matmuls run in `dtype`; RMSNorm, rotary embeddings and the
attention softmax run in float32. Projections act on [batch * seq, features] matrices: XLA's CPU backward pass is
much slower on 3-D operands (spec section 1.4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from layerskip_jax.errors import UsageError
from layerskip_jax.model.attention import attention, resolve_impl
from layerskip_jax.model.model_config import ModelConfig
from layerskip_jax.model.rope import apply_rope
from layerskip_jax.sharding import ACT_BTD, ACT_BTF, ACT_BTHE, ACT_BTKE, constrain


def param(
  rngs: nnx.Rngs, shape: tuple[int, ...], logical_axes: tuple[str, ...], config: ModelConfig, init: str = 'normal'
) -> nnx.Param:
  """A parameter initialised like transformers' Llama (normal(0, initializer_range); norms to one)."""
  if init == 'ones':
    value = jnp.ones(shape, config.weight_dtype)
  else:
    value = (config.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(
      config.weight_dtype
    )
  return nnx.Param(value, logical_axes=logical_axes)


def dense(x: jax.Array, kernel: nnx.Param, dtype: jnp.dtype) -> jax.Array:
  """x [..., in] @ kernel [in, out] in `dtype`, as one 2-D matmul."""
  lead = x.shape[:-1]
  y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(dtype), kernel[...].astype(dtype))
  return y.reshape(*lead, y.shape[-1])


class RMSNorm(nnx.Module):
  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.eps = config.rms_norm_eps
    self.scale = param(rngs, (config.hidden_size,), ('norm',), config, init='ones')

  def __call__(self, x: jax.Array, dtype: jnp.dtype | None = None) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return (xf * self.scale[...].astype(jnp.float32)).astype(dtype or x.dtype)


class Attention(nnx.Module):
  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.q_proj = param(rngs, (c.hidden_size, c.num_attention_heads * c.head_dim), ('embed', 'q_heads'), c)
    self.k_proj = param(rngs, (c.hidden_size, c.num_key_value_heads * c.head_dim), ('embed', 'kv_heads'), c)
    self.v_proj = param(rngs, (c.hidden_size, c.num_key_value_heads * c.head_dim), ('embed', 'kv_heads'), c)
    self.o_proj = param(rngs, (c.num_attention_heads * c.head_dim, c.hidden_size), ('q_heads', 'embed'), c)

  def project_qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rotated queries [B, T, heads, head_dim] and keys, and values [B, T, kv_heads, head_dim]."""
    c = self.config
    batch, seq = x.shape[:2]
    dt = c.compute_dtype
    q = dense(x, self.q_proj, dt).reshape(batch, seq, c.num_attention_heads, c.head_dim)
    k = dense(x, self.k_proj, dt).reshape(batch, seq, c.num_key_value_heads, c.head_dim)
    v = dense(x, self.v_proj, dt).reshape(batch, seq, c.num_key_value_heads, c.head_dim)
    q = constrain(checkpoint_name(apply_rope(q, cos, sin), 'qkv_proj'), ACT_BTHE)
    k = constrain(checkpoint_name(apply_rope(k, cos, sin), 'qkv_proj'), ACT_BTKE)
    v = constrain(checkpoint_name(v, 'qkv_proj'), ACT_BTKE)
    return q, k, v

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """Causal grouped-query attention within each packed document (segment_ids None: one document per row), by
    model.attention_impl ('auto': the memory-efficient kernel of the backend; model/attention.py)."""
    c = self.config
    try:
      impl = resolve_impl(c.attention_impl, jax.default_backend(), c.compute_dtype)
    except ValueError as e:  # a kernel on the wrong backend: one line naming the key
      raise UsageError(str(e)) from None
    return attention(q, k, v, segment_ids, impl=impl, block_q=c.attention_block, block_k=c.attention_block)

  def output(self, attn: jax.Array) -> jax.Array:
    batch, seq = attn.shape[:2]
    out = dense(attn.reshape(batch, seq, -1), self.o_proj, self.config.compute_dtype)
    return checkpoint_name(out, 'attn_out')

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    q, k, v = self.project_qkv(x, cos, sin)
    return self.output(self.attend(q, k, v, segment_ids))


class MLP(nnx.Module):
  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = config
    self.dtype = c.compute_dtype
    self.gate_proj = param(rngs, (c.hidden_size, c.intermediate_size), ('embed', 'mlp'), c)
    self.up_proj = param(rngs, (c.hidden_size, c.intermediate_size), ('embed', 'mlp'), c)
    self.down_proj = param(rngs, (c.intermediate_size, c.hidden_size), ('mlp', 'embed'), c)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = jax.nn.silu(dense(x, self.gate_proj, self.dtype)) * dense(x, self.up_proj, self.dtype)
    hidden = constrain(hidden, ACT_BTF)
    return checkpoint_name(dense(hidden, self.down_proj, self.dtype), 'mlp_out')


class DecoderLayer(nnx.Module):
  """x -> h = x + attn(norm(x)); out = h + mlp(norm(h)). In LayerSkip terms f_l(x) = out - x."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(config, rngs=rngs)
    self.self_attn = Attention(config, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config, rngs=rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    with jax.named_scope('attention'):
      h = x + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids).astype(x.dtype)
    with jax.named_scope('mlp'):
      out = h + self.mlp(self.post_attention_layernorm(h)).astype(x.dtype)
    return constrain(out, ACT_BTD)

  def decode(
    self,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    positions: jax.Array,
    cache_k: jax.Array,
    cache_v: jax.Array,
    layer: int | jax.Array,
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The layer (index `layer` of the stack) on x [B, T, D] at `positions` [B, T] (consecutive per row), with the
    fixed-size KV cache of every layer [L, B, kv_heads, S, head_dim] whose slot index is the position. Stores the
    block's K/V in place first, then attends over the layer's slice, and returns (output, cache_k, cache_v):
    written before it is read, the cache needs no protective copy (reading it first made XLA copy all of it for
    every token). Attention is causal by position: slots past a query's position (stale drafts, padding) are
    masked, so a roll-back needs no cache update."""
    attn = self.self_attn
    q, k, v = attn.project_qkv(self.input_layernorm(x), cos, sin)
    k = k.astype(cache_k.dtype).transpose(0, 2, 1, 3)[None]  # [1, B, K, T, D]: the cache's layout
    v = v.astype(cache_v.dtype).transpose(0, 2, 1, 3)[None]
    batch, t = positions.shape
    if batch <= _UNROLLED_ROW_WRITES:  # a dynamic_update_slice per row (its own position): in place on a CPU
      for b in range(batch):
        corner = (layer, b, 0, positions[b, 0], 0)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k[:, b : b + 1], corner)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v[:, b : b + 1], corner)
    else:  # large batches: one scatter (a program that does not grow with the batch)
      rows, heads = jnp.arange(batch)[:, None, None], jnp.arange(k.shape[2])[None, :, None]
      slots = positions[:, None, :]
      cache_k = cache_k.at[layer, rows, heads, slots].set(k[0])
      cache_v = cache_v.at[layer, rows, heads, slots].set(v[0])
    keys, values = cache_k[layer].astype(q.dtype), cache_v[layer].astype(q.dtype)
    h = x + attn.output(_cached_attention(q, keys, values, positions)).astype(x.dtype)
    return h + self.mlp(self.post_attention_layernorm(h)).astype(x.dtype), cache_k, cache_v


_UNROLLED_ROW_WRITES = 16  # batches up to this size store their K/V rows with one dynamic_update_slice each


def _cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, positions: jax.Array) -> jax.Array:
  """Decode attention of a few queries [B, T, H, D] over a cache [B, K, S, D], causal by position, query heads
  grouped over their K/V head. Two einsums whose cache operand is read in place: with the cache laid out
  [B, K, S, D] neither needs a transpose (as [B, S, K, D] XLA copied every layer's K and V slice for each token);
  for T of 1..9 rows this is also cheaper than jax.nn.dot_product_attention's general path on a CPU. Softmax and
  the probability-weighted sum in float32: bf16-rounded probabilities moved a bf16 model's logits by ~1% between
  a one-row and a nine-row pass, enough to make self-speculative and autoregressive greedy outputs part."""
  batch, t, heads, dim = q.shape
  kv_heads = keys.shape[1]
  grouped = q.reshape(batch, t, kv_heads, heads // kv_heads, dim)
  scores = jnp.einsum('btkgd,bksd->bkgts', grouped, keys, preferred_element_type=jnp.float32) / np.sqrt(dim)
  visible = jnp.arange(keys.shape[2])[None, None, None, None, :] <= positions[:, None, None, :, None]
  probs = jax.nn.softmax(jnp.where(visible, scores, -1e30), axis=-1)
  out = jnp.einsum('bkgts,bksd->btkgd', probs, values.astype(jnp.float32))
  return out.astype(q.dtype).reshape(batch, t, heads, dim)

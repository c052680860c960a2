"""Causal, packed-document, grouped-query attention that never materialises [T, T] scores, on every backend.

Why: jax.nn.dot_product_attention's XLA path with a dense [B, 1, T, T] document mask builds [heads, T, T] float32
scores per layer (52 GiB of temporaries for Llama 3.2 1B at 8192 tokens). `attention` picks, per
`model.attention_impl`, one of:

  'xla'        the dense reference (jax.nn.dot_product_attention, boolean mask from `dense_mask`, or is_causal=True
               when there are no segment ids). Every other implementation is tested against it.
  'blockwise'  flash attention in plain JAX (jax.custom_vjp): the CPU path and the portable fallback. Forward: a
               scan over query blocks, an inner loop over the key blocks at or below the diagonal (causal costs about
               half) with an online softmax; the causal + same-segment mask is built per (query block, key block)
               pair. Residuals: q, k, v, out and the float32 logsumexp. Backward (FlashAttention-2): delta =
               rowsum(dO * O); one scan over key blocks, an inner loop over the query blocks at or below the
               diagonal that recomputes the probabilities, accumulates dK/dV of the key block and adds into dQ.
               Peak temporaries are O(B * H * block_q * block_k). GQA: query heads are grouped over their K/V head
               ([B, K, block, H/K, D] operands), never repeated.
  'cudnn'      jax.nn.dot_product_attention(implementation='cudnn'), GPU, bfloat16/float16 only, native GQA. Without
               segment ids: is_causal=True (cuDNN skips the blocks above the diagonal). WITH segment ids it falls back
               to 'blockwise': in jax 0.10.2 the public API has no segment input (query_seq_lengths /
               key_value_seq_lengths describe right padding of one sequence per row, not packed documents), and a
               `mask=` is turned into a dense [B, 1, T, T] additive bias (fused_attention_stablehlo.
               combine_bias_and_mask), i.e. the memory this module exists to avoid. cuDNN's packed layout
               (q_offsets/kv_offsets) exists only in the private jax._src.cudnn.fused_attention_stablehlo
               .dot_product_attention (Hopper or newer, a static maximum number of segments per row; the public
               arguments are jax PR #29731, unmerged); it is not used here, untested. Attending across documents
               silently (maxtext issue #4476) is the failure this fallback prevents.
  'pallas_gpu' jax.experimental.pallas.ops.gpu.attention.mha (Triton), GPU: takes segment ids [B, T] natively
               (equality mask, like `dense_mask`) and causal=True. It has no GQA (its K/V BlockSpecs index the query
               head), so K/V heads are repeated for this path only. Sequence lengths are padded to a multiple of its
               tiles (powers of two, at least 16; forward 128 x 128 and backward 32 x 32 at most).
  'splash'     jax.experimental.pallas.ops.tpu.splash_attention, TPU: make_splash_mha with a CausalMask per head
               and SegmentIds, vmapped over the batch; native GQA (query head h reads K/V head h // (H/K)). Splash
               does not scale q, so q is multiplied by 1/sqrt(D) first. Tiles are multiples of 128; T is padded.
               A pallas_call has no automatic partitioning: under a multi-device mesh, wrap the call in shard_map
               (as MaxText does).

Every implementation uses the scale 1/sqrt(D), a float32 softmax, and returns q.dtype. Padding (T not a multiple of
a tile) appends positions after every real query, so the causal mask hides them from real queries, and slices the
padded queries off. Both Pallas kernels run on a CPU with interpret=True (`pallas_gpu_attention(...,
interpret=True)`, `splash_attention(..., interpret=True)`), which is how tests/test_attention.py checks them
against the dense reference, forward and gradients. Not run on accelerators by that file: cuDNN (it has no CPU
interpretation), Triton compilation of the GPU kernel, Mosaic compilation of splash.

On a CPU 'blockwise' is as fast as the dense path when T <= block and faster beyond; smaller tiles are faster
there (the [B, H, block_q, block_k] scores stay in cache). The timings are in docs/results/measurements.md.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

IMPLS = ('auto', 'blockwise', 'xla', 'cudnn', 'pallas_gpu', 'splash')

_GPU_BACKENDS = ('gpu', 'cuda', 'rocm')
_M_INIT = -1e30  # the running max starts large, negative and finite: a fully masked row gives 0, never NaN


def resolve_impl(impl: str, backend: str, dtype) -> str:
  """'auto' -> the memory-efficient choice for backend: gpu -> 'cudnn' for bf16/fp16 (else 'blockwise'), tpu ->
  'splash', cpu -> 'blockwise'. Raises ValueError with ONE line naming `model.attention_impl=...` and what would be
  right for a bad combination (cudnn with float32, cudnn/pallas_gpu off GPU, splash off TPU)."""
  backend = 'gpu' if backend in _GPU_BACKENDS else backend
  dtype = jnp.dtype(dtype)
  half = dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  auto = {'gpu': 'cudnn' if half else 'blockwise', 'tpu': 'splash'}.get(backend, 'blockwise')
  if impl not in IMPLS:
    raise ValueError(f"model.attention_impl={impl!r}: must be one of {', '.join(IMPLS)}")
  if impl == 'auto':
    return auto
  if impl in ('cudnn', 'pallas_gpu') and backend != 'gpu':
    raise ValueError(
      f'model.attention_impl={impl!r} needs a GPU, but the backend is {backend}: '
      f'use model.attention_impl=auto (here {auto!r})'
    )
  if impl == 'cudnn' and not half:
    raise ValueError(
      f"model.attention_impl='cudnn' needs bfloat16 or float16 activations, not {dtype.name}: "
      "set model.dtype=bfloat16, or use model.attention_impl=blockwise or pallas_gpu"
    )
  if impl == 'splash' and backend != 'tpu':
    raise ValueError(
      f"model.attention_impl='splash' needs a TPU, but the backend is {backend}: "
      f'use model.attention_impl=auto (here {auto!r})'
    )
  return impl


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  segment_ids: jax.Array | None = None,
  *,
  impl: str = 'blockwise',
  block_q: int = 512,
  block_k: int = 512,
) -> jax.Array:
  """q [B, T, H, D], k/v [B, T, K, D] (GQA: H a multiple of K, query heads grouped over their K/V head, never
  repeated in memory if avoidable), causal by index; segment_ids [B, T] int (None: one document per row) restricts
  attention to the same segment (packed documents). Returns [B, T, H, D] in q.dtype. Softmax in float32.

  impl: one of IMPLS ('auto' resolves for jax.default_backend(); see resolve_impl). 'cudnn' with segment_ids falls
  back to 'blockwise' (cuDNN's public path cannot take packed documents without a dense mask). block_q/block_k
  tile 'blockwise' (each capped at T) and cap the Pallas kernels' tiles."""
  _check_shapes(q, k, v, segment_ids)
  impl = resolve_impl(impl, jax.default_backend(), q.dtype)
  if impl == 'xla':
    return dense_attention(q, k, v, segment_ids)
  if impl == 'blockwise':
    return blockwise_attention(q, k, v, segment_ids, block_q=block_q, block_k=block_k)
  if impl == 'cudnn':
    return cudnn_attention(q, k, v, segment_ids, block_q=block_q, block_k=block_k)
  if impl == 'pallas_gpu':
    return pallas_gpu_attention(q, k, v, segment_ids, block_q=block_q, block_k=block_k)
  return splash_attention(q, k, v, segment_ids, block_q=block_q, block_k=block_k)


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> None:
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f'attention: q [B, T, H, D] and k, v [B, T, K, D], got {q.shape}, {k.shape}, {v.shape}')
  (b, t, h, d), (bk, tk, kv, dk) = q.shape, k.shape
  if (b, t, d) != (bk, tk, dk) or h % kv:
    raise ValueError(f'attention: q {q.shape} and k/v {k.shape} need the same B, T, D and H a multiple of K')
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f'attention: segment_ids {segment_ids.shape} must be [B, T] = {(b, t)}')


# ----------------------------------------------------------------------------------------------------- dense ('xla')


def dense_mask(segment_ids: jax.Array | None, seq_len: int) -> jax.Array | None:
  """[batch, 1, seq, seq] boolean mask: causal, and within one document when sequences are packed (None without
  segment ids: the caller uses is_causal). The dense reference's mask; memory O(T^2)."""
  if segment_ids is None:
    return None
  causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))
  same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same_doc & causal)[:, None]


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
  """The reference: jax.nn.dot_product_attention's XLA path with a dense mask ([heads, T, T] float32 scores)."""
  mask = dense_mask(segment_ids, q.shape[1])
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None, implementation='xla')


# ------------------------------------------------------------------------------------------------------- blockwise


def blockwise_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  segment_ids: jax.Array | None = None,
  *,
  block_q: int = 512,
  block_k: int = 512,
) -> jax.Array:
  """Flash attention in plain JAX (see the module docstring); block sizes are capped at T."""
  t = q.shape[1]
  bq, bk = max(1, min(block_q, t)), max(1, min(block_k, t))
  return _flash(q, k, v, segment_ids, bq, bk)


def _ceil(a: int, b: int) -> int:
  return -(-a // b)


def _pad_seq(x: jax.Array, length: int, value=0) -> jax.Array:
  """x [B, T, ...] padded at the end of axis 1 to `length`."""
  pad = length - x.shape[1]
  if pad == 0:
    return x
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _q_blocks(x: jax.Array, block: int, kv_heads: int) -> jax.Array:
  """[B, T, H, ...] -> [n, B, K, block, H/K, ...] (T padded to n * block), query heads grouped by K/V head."""
  b, t, h = x.shape[:3]
  n = _ceil(t, block)
  x = _pad_seq(x, n * block).reshape(b, n, block, kv_heads, h // kv_heads, *x.shape[3:])
  return jnp.moveaxis(x, (1, 3), (0, 2))


def _from_q_blocks(x: jax.Array, t: int) -> jax.Array:
  """Inverse of _q_blocks: [n, B, K, block, G, ...] -> [B, T, H, ...]."""
  n, b, kv, block, g = x.shape[:5]
  x = jnp.moveaxis(x, (0, 2), (1, 3)).reshape(b, n * block, kv * g, *x.shape[5:])
  return x[:, :t]


def _kv_blocks(x: jax.Array, block: int) -> jax.Array:
  """[B, T, K, D] -> [n, B, K, block, D] (T padded to n * block)."""
  b, t, kv, d = x.shape
  n = _ceil(t, block)
  x = _pad_seq(x, n * block).reshape(b, n, block, kv, d)
  return jnp.moveaxis(x, (1, 3), (0, 2))


def _seg_blocks(segment_ids: jax.Array | None, block: int) -> jax.Array | None:
  """[B, T] -> [n, B, block] (padded with -1: padded positions only ever meet real ones above the diagonal)."""
  if segment_ids is None:
    return None
  b, t = segment_ids.shape
  n = _ceil(t, block)
  return _pad_seq(segment_ids, n * block, -1).reshape(b, n, block).transpose(1, 0, 2)


def _block_mask(i, j, bq: int, bk: int, seg_q: jax.Array | None, seg_k: jax.Array | None) -> jax.Array:
  """Visibility of key block j from query block i, shaped to broadcast over scores [B, K, bq, G, bk]."""
  q_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)
  k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)
  visible = (q_pos[:, None] >= k_pos[None, :])[None]  # [1, bq, bk]
  if seg_q is not None:
    visible = visible & (seg_q[:, :, None] == seg_k[:, None, :])  # [B, bq, bk]
  return visible[:, None, :, None, :]


def _scores(qi: jax.Array, kj: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
  """float32 scaled scores [B, K, bq, G, bk], -inf where masked."""
  s = jnp.einsum('bkqgd,bksd->bkqgs', qi, kj, preferred_element_type=jnp.float32) * scale
  return jnp.where(mask, s, -jnp.inf)


def _first_key_block_past(i, bq: int, bk: int, nk: int):
  """Key blocks [0, this) hold a key at or before some query of query block i (causal: the rest are skipped)."""
  return jnp.minimum(((i + 1) * bq + bk - 1) // bk, nk)


def _first_query_block_at(j, bq: int, bk: int):
  """Query blocks [this, nq) hold a query at or after some key of key block j."""
  return (j * bk) // bq


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, segment_ids, bq: int, bk: int):
  return _flash_forward(q, k, v, segment_ids, bq, bk)[0]


def _flash_forward(q, k, v, segment_ids, bq: int, bk: int):
  """(out [B, T, H, D] in q.dtype, logsumexp [n_q, B, K, bq, G] float32)."""
  t, kv_heads, d = q.shape[1], k.shape[2], q.shape[3]
  scale = 1.0 / math.sqrt(d)
  nq, nk = _ceil(t, bq), _ceil(t, bk)
  qb, kb, vb = _q_blocks(q, bq, kv_heads), _kv_blocks(k, bk), _kv_blocks(v, bk)
  sq, sk = _seg_blocks(segment_ids, bq), _seg_blocks(segment_ids, bk)
  row_shape = qb.shape[1:-1]  # [B, K, bq, G]

  def query_block(_, xs):
    qi, seg_qi, i = xs

    def key_block(j, carry):
      m, l, acc = carry
      mask = _block_mask(i, j, bq, bk, None if sq is None else seg_qi, None if sk is None else sk[j])
      s = _scores(qi, kb[j], mask, scale)
      m_new = jnp.maximum(m, s.max(axis=-1))
      p = jnp.exp(s - m_new[..., None])
      correction = jnp.exp(m - m_new)
      l = l * correction + p.sum(axis=-1)
      pv = jnp.einsum('bkqgs,bksd->bkqgd', p.astype(v.dtype), vb[j], preferred_element_type=jnp.float32)
      return m_new, l, acc * correction[..., None] + pv

    init = (
      jnp.full(row_shape, _M_INIT, jnp.float32),
      jnp.zeros(row_shape, jnp.float32),
      jnp.zeros((*row_shape, d), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(0, _first_key_block_past(i, bq, bk, nk), key_block, init)
    l_safe = jnp.where(l > 0, l, 1.0)
    return None, ((acc / l_safe[..., None]).astype(q.dtype), m + jnp.log(l_safe))

  segs = jnp.zeros((nq,), jnp.int32) if sq is None else sq  # without segment ids: a placeholder the mask ignores
  _, (out, lse) = jax.lax.scan(query_block, None, (qb, segs, jnp.arange(nq)))
  return _from_q_blocks(out, t), lse


def _flash_fwd(q, k, v, segment_ids, bq: int, bk: int):
  out, lse = _flash_forward(q, k, v, segment_ids, bq, bk)
  return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(bq: int, bk: int, residuals, d_out):
  q, k, v, segment_ids, out, lse = residuals
  t, kv_heads, d = q.shape[1], k.shape[2], q.shape[3]
  scale = 1.0 / math.sqrt(d)
  nq, nk = _ceil(t, bq), _ceil(t, bk)
  qb, kb, vb = _q_blocks(q, bq, kv_heads), _kv_blocks(k, bk), _kv_blocks(v, bk)
  dob = _q_blocks(d_out.astype(q.dtype), bq, kv_heads)
  delta = _q_blocks(jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), bq, kv_heads)
  sq, sk = _seg_blocks(segment_ids, bq), _seg_blocks(segment_ids, bk)

  def key_block(dq, xs):
    kj, vj, seg_kj, j = xs

    def query_block(i, carry):
      dk, dv, dq = carry
      qi, doi = qb[i], dob[i]
      mask = _block_mask(i, j, bq, bk, None if sq is None else sq[i], None if sk is None else seg_kj)
      p = jnp.exp(_scores(qi, kj, mask, scale) - lse[i][..., None])  # [B, K, bq, G, bk]
      dv = dv + jnp.einsum('bkqgs,bkqgd->bksd', p.astype(v.dtype), doi, preferred_element_type=jnp.float32)
      dp = jnp.einsum('bkqgd,bksd->bkqgs', doi, vj, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta[i][..., None]) * scale).astype(q.dtype)
      dk = dk + jnp.einsum('bkqgs,bkqgd->bksd', ds, qi, preferred_element_type=jnp.float32)
      dqi = jax.lax.dynamic_index_in_dim(dq, i, keepdims=False)
      dqi = dqi + jnp.einsum('bkqgs,bksd->bkqgd', ds, kj, preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_index_in_dim(dq, dqi, i, 0)  # in place (a scatter-add is slow on a CPU)
      return dk, dv, dq

    zeros = jnp.zeros(kj.shape, jnp.float32)
    dk, dv, dq = jax.lax.fori_loop(_first_query_block_at(j, bq, bk), nq, query_block, (zeros, zeros, dq))
    return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

  dq0 = jnp.zeros(qb.shape, jnp.float32)
  segs = jnp.zeros((nk,), jnp.int32) if sk is None else sk
  dq, (dkb, dvb) = jax.lax.scan(key_block, dq0, (kb, vb, segs, jnp.arange(nk)))
  dq = _from_q_blocks(dq, t).astype(q.dtype)
  dk = jnp.moveaxis(dkb, (0, 2), (1, 3)).reshape(k.shape[0], nk * bk, kv_heads, d)[:, :t]
  dv = jnp.moveaxis(dvb, (0, 2), (1, 3)).reshape(v.shape[0], nk * bk, kv_heads, d)[:, :t]
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------------------------ cudnn


def cudnn_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  segment_ids: jax.Array | None = None,
  *,
  block_q: int = 512,
  block_k: int = 512,
) -> jax.Array:
  """cuDNN flash attention (GPU, bf16/fp16, native GQA), causal. With segment ids: 'blockwise' (module docstring:
  the public cuDNN path cannot restrict attention to a document without a dense [T, T] bias)."""
  if segment_ids is not None:
    return blockwise_attention(q, k, v, segment_ids, block_q=block_q, block_k=block_k)
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')


# ------------------------------------------------------------------------------------------------------- pallas_gpu

_PALLAS_GPU_FWD_TILE = 128  # the kernel's default forward tiles (BlockSizes.get_default)
_PALLAS_GPU_BWD_TILE = 32  # ... and backward tiles


def _pow2_tile(block: int, cap: int, t: int) -> int:
  """min(block, cap), shrunk to the next power of two at or above T (at least 16) for short sequences."""
  return min(block, cap, max(16, 1 << max(0, (t - 1).bit_length())))


def pallas_gpu_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  segment_ids: jax.Array | None = None,
  *,
  block_q: int = 512,
  block_k: int = 512,
  interpret: bool = False,
) -> jax.Array:
  """jax.experimental.pallas.ops.gpu.attention.mha (Triton flash attention with segment ids), causal. K/V heads
  are repeated to H (the kernel has no GQA). Tiles: powers of two >= 16, at most block_q/block_k and the kernel's
  defaults (forward 128, backward 32); T is padded to a multiple of the tiles. interpret=True runs it on a CPU."""
  from jax.experimental.pallas.ops.gpu import attention as gpu_attention

  t, h, d = q.shape[1:]
  for name, block in (('block_q', block_q), ('block_k', block_k)):
    if block < 16 or block & (block - 1):
      raise ValueError(f'pallas_gpu attention needs {name} a power of two >= 16 (Triton tiles), got {block}')
  if d < 16:
    raise ValueError(f'pallas_gpu attention needs head_dim >= 16 (Triton dot operands), got {d}')
  fq, fk = _pow2_tile(block_q, _PALLAS_GPU_FWD_TILE, t), _pow2_tile(block_k, _PALLAS_GPU_FWD_TILE, t)
  bwd = _pow2_tile(min(block_q, block_k), _PALLAS_GPU_BWD_TILE, t)
  padded = _ceil(t, max(fq, fk, bwd)) * max(fq, fk, bwd)
  group = h // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  if segment_ids is not None:
    segment_ids = _pad_seq(segment_ids.astype(jnp.int32), padded, -1)
  sizes = gpu_attention.BlockSizes(
    block_q=fq, block_k=fk, block_q_dkv=bwd, block_kv_dkv=bwd, block_q_dq=bwd, block_kv_dq=bwd
  )
  out = gpu_attention.mha(
    _pad_seq(q, padded),
    _pad_seq(k, padded),
    _pad_seq(v, padded),
    segment_ids,
    sm_scale=1.0 / math.sqrt(d),
    causal=True,
    block_sizes=sizes,
    interpret=interpret,
  )
  return out[:, :t].astype(q.dtype)


# ----------------------------------------------------------------------------------------------------------- splash

_SPLASH_LANES = 128  # splash's kv compute tile must be a multiple of the TPU lane count


def _splash_kernel(heads: int, seq: int, bq: int, bkv: int, interpret: bool):
  """The causal splash kernel of `heads` query heads over [seq, seq]. Built at every trace (it holds arrays, which
  must not outlive the trace); splash caches the NumPy mask processing itself (mask_info._process_mask)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  mask = splash.MultiHeadMask([splash.CausalMask((seq, seq)) for _ in range(heads)])
  sizes = splash.BlockSizes(
    block_q=bq,
    block_kv=bkv,
    block_kv_compute=bkv,
    block_q_dkv=bq,
    block_kv_dkv=bkv,
    block_kv_dkv_compute=bkv,
    block_q_dq=bq,
    block_kv_dq=bkv,
  )
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  segment_ids: jax.Array | None = None,
  *,
  block_q: int = 512,
  block_k: int = 512,
  interpret: bool = False,
) -> jax.Array:
  """TPU splash attention (causal mask, SegmentIds, native GQA), vmapped over the batch. q is scaled by 1/sqrt(D)
  here (splash does not). Tiles: multiples of 128, at most block_q/block_k (capped at T rounded up to 128); T is
  padded to a multiple of both. interpret=True runs it on a CPU."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  t, h, d = q.shape[1:]
  for name, block in (('block_q', block_q), ('block_k', block_k)):
    if block % _SPLASH_LANES:
      raise ValueError(f'splash attention needs {name} a multiple of {_SPLASH_LANES}, got {block}')
  cap = _ceil(t, _SPLASH_LANES) * _SPLASH_LANES
  bq, bkv = min(block_q, cap), min(block_k, cap)
  tile = math.lcm(bq, bkv)
  padded = _ceil(t, tile) * tile
  kernel = _splash_kernel(h, padded, bq, bkv, interpret)
  qs = (q.astype(jnp.float32) * (1.0 / math.sqrt(d))).astype(q.dtype)
  qs, ks, vs = (jnp.swapaxes(_pad_seq(x, padded), 1, 2) for x in (qs, k, v))  # [B, heads, T, D]
  if segment_ids is None:
    out = jax.vmap(kernel)(qs, ks, vs)
  else:
    seg = _pad_seq(segment_ids.astype(jnp.int32), padded, -1)
    out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=splash.SegmentIds(q=s, kv=s)))(qs, ks, vs, seg)
  return jnp.swapaxes(out, 1, 2)[:, :t].astype(q.dtype)

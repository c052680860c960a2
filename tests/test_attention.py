"""model/attention.py: every memory-efficient implementation equals the dense reference ('xla'), forward and
gradients, on causal + packed-document masks with GQA and lengths that are not a multiple of the block; 'blockwise'
never builds a [T, T] array; resolve_impl picks per backend and rejects bad combinations in one line. The Pallas
kernels run on the CPU in interpret mode (the GPU Triton kernel and TPU splash alike)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from layerskip_jax.model import attention as attn


def packed_segments(rng: np.random.Generator, batch: int, seq: int, restart: bool = False) -> np.ndarray:
  """[batch, seq] int32: each row several documents of random lengths with ids 1, 2, ... (as grain packs them),
  padding id 0 at the end of some rows; restart=True reuses ids within a row (0, 1, 0, 1, ...: equal ids are one
  document, as in the dense mask)."""
  rows = []
  for _ in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, seq), size=min(3, seq - 1), replace=False))
    ids = np.searchsorted(cuts, np.arange(seq), side='right')
    rows.append(ids % 2 if restart else ids + 1)
  out = np.stack(rows).astype(np.int32)
  if not restart and batch > 1:
    out[-1, -max(1, seq // 5) :] = 0  # trailing padding
  return out


def make_inputs(seed: int, batch: int, seq: int, heads: int, kv_heads: int, dim: int, dtype=jnp.float32):
  """q, k, v and w (a random linear functional of the output), from NumPy: no compile per shape."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape, np.float32)
  q, k, v = normal(batch, seq, heads, dim), normal(batch, seq, kv_heads, dim), normal(batch, seq, kv_heads, dim)
  return (*(jnp.asarray(x, dtype) for x in (q, k, v)), jnp.asarray(normal(batch, seq, heads, dim)))


def value_and_grads(fn, q, k, v, w):
  """fn's output, and the gradient of sum(output * w) w.r.t. q, k, v (one compiled program)."""
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
  return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


def assert_matches_dense(fn, q, k, v, w, segment_ids, tol: float):
  out, grads = value_and_grads(fn, q, k, v, w)
  ref, ref_grads = value_and_grads(lambda q, k, v: attn.dense_attention(q, k, v, segment_ids), q, k, v, w)
  assert out.shape == q.shape and out.dtype == q.dtype
  f32 = lambda x: np.asarray(x.astype(jnp.float32))
  np.testing.assert_allclose(f32(out), f32(ref), atol=tol, rtol=tol, err_msg='output')
  for name, g, r in zip('qkv', grads, ref_grads):
    assert g.dtype == r.dtype
    np.testing.assert_allclose(f32(g), f32(r), atol=tol, rtol=tol, err_msg=f'd{name}')


# ------------------------------------------------------------------------------------------------------- blockwise

CASES = [  # seq, heads, kv_heads, block_q, block_k, segments
  (37, 4, 2, 16, 16, 'packed'),  # T not a multiple of the block (padded queries and keys)
  (64, 4, 2, 16, 16, 'packed'),
  (64, 4, 4, 16, 16, 'restart'),  # H == K; equal ids further apart are one document
  (12, 4, 2, 16, 16, 'packed'),  # T smaller than the block
  (37, 4, 2, 16, 8, 'packed'),  # unequal blocks: query blocks straddle key blocks
  (37, 2, 1, 8, 24, 'restart'),  # key block larger than query block, T % block_k != 0; MQA
  (48, 4, 2, 16, 16, None),  # no segment ids: causal only
]


@pytest.mark.parametrize('seq,heads,kv_heads,block_q,block_k,segments', CASES)
def test_blockwise_matches_dense_float32(seq, heads, kv_heads, block_q, block_k, segments):
  q, k, v, w = make_inputs(seq + block_q, 2, seq, heads, kv_heads, 16)
  seg = (
    None
    if segments is None
    else jnp.asarray(packed_segments(np.random.default_rng(seq), 2, seq, restart=segments == 'restart'))
  )
  fn = lambda q, k, v: attn.blockwise_attention(q, k, v, seg, block_q=block_q, block_k=block_k)
  assert_matches_dense(fn, q, k, v, w, seg, tol=1e-5)


@pytest.mark.parametrize('seq,kv_heads', [(40, 2), (64, 4)])
def test_blockwise_matches_dense_bfloat16(seq, kv_heads):
  q, k, v, w = make_inputs(seq, 2, seq, 4, kv_heads, 32, jnp.bfloat16)
  seg = jnp.asarray(packed_segments(np.random.default_rng(seq), 2, seq))
  fn = lambda q, k, v: attn.blockwise_attention(q, k, v, seg, block_q=16, block_k=16)
  assert_matches_dense(fn, q, k, v, w, seg, tol=2e-2)


def test_attention_dispatch_on_cpu():
  """attention(): 'auto' is 'blockwise' on the CPU, 'xla' is the reference, a GPU-only choice raises."""
  q, k, v, _ = make_inputs(0, 2, 24, 4, 2, 8)
  seg = jnp.asarray(packed_segments(np.random.default_rng(0), 2, 24))
  ref = jax.jit(attn.dense_attention)(q, k, v, seg)
  run = lambda impl: jax.jit(functools.partial(attn.attention, impl=impl, block_q=8, block_k=8))(q, k, v, seg)
  np.testing.assert_array_equal(run('xla'), ref)
  for impl in ('auto', 'blockwise'):
    np.testing.assert_allclose(run(impl), ref, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match=r"model\.attention_impl='cudnn'"):
    attn.attention(q, k, v, seg, impl='cudnn')


def test_cudnn_with_segment_ids_falls_back_to_blockwise():
  """cuDNN's public path takes no segment ids: with them, 'cudnn' must not attend across documents (it runs the
  blockwise kernel, which needs no GPU, so this runs here)."""
  q, k, v, w = make_inputs(3, 2, 40, 4, 2, 16)
  seg = jnp.asarray(packed_segments(np.random.default_rng(3), 2, 40))
  fn = lambda q, k, v: attn.cudnn_attention(q, k, v, seg, block_q=16, block_k=16)
  assert_matches_dense(fn, q, k, v, w, seg, tol=1e-5)


def test_dense_mask():
  seg = jnp.asarray([[1, 1, 2, 2, 0]])
  mask = np.asarray(attn.dense_mask(seg, 5))[0, 0]
  expected = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(mask, expected)
  assert attn.dense_mask(None, 5) is None


# -------------------------------------------------------------------------------------------------------- memory


def _avals(jaxpr):
  """Every abstract value of a jaxpr, its sub-jaxprs (scan, while, cond, custom_vjp, pjit) included."""
  for var in list(jaxpr.invars) + list(jaxpr.constvars):
    yield var.aval
  for eqn in jaxpr.eqns:
    for var in list(eqn.invars) + list(eqn.outvars):
      if hasattr(var, 'aval'):
        yield var.aval
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        sub = getattr(sub, 'jaxpr', sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, 'eqns'):
          yield from _avals(sub)


def _square_sizes(fn, seq: int) -> set[int]:
  """n for every [..., n, n] value in the jaxpr of value_and_grad of fn at length seq."""
  q, k, v, w = make_inputs(0, 1, seq, 2, 1, 8)
  seg = jnp.zeros((1, seq), jnp.int32)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, seg) * w)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
  shapes = [getattr(a, 'shape', ()) for a in _avals(jaxpr)]
  return {s[-1] for s in shapes if len(s) >= 2 and s[-1] == s[-2]}


def test_blockwise_builds_no_square_array():
  seq = 1024
  blockwise = functools.partial(attn.blockwise_attention, block_q=128, block_k=128)
  sizes = _square_sizes(blockwise, seq)
  assert seq not in sizes
  assert 128 in sizes  # the walk reaches the loop bodies: each block pair's [.., 128, 128] mask
  assert seq in _square_sizes(attn.dense_attention, seq)  # negative control: the dense [B, 1, T, T] mask, scores


# ------------------------------------------------------------------------------------------- pallas (interpreted)


def test_pallas_gpu_kernel_interpreted_matches_dense():
  """The Triton kernel (jax.experimental.pallas.ops.gpu.attention.mha) in interpret mode: segment ids, GQA by
  repeating K/V, T padded to its tiles; forward and its own backward kernel."""
  q, k, v, w = make_inputs(1, 2, 40, 4, 2, 16)
  seg = jnp.asarray(packed_segments(np.random.default_rng(1), 2, 40))
  fn = lambda q, k, v: attn.pallas_gpu_attention(q, k, v, seg, block_q=16, block_k=16, interpret=True)
  assert_matches_dense(fn, q, k, v, w, seg, tol=1e-5)


def test_splash_kernel_interpreted_matches_dense():
  """TPU splash attention in interpret mode: causal mask, SegmentIds, native GQA, q scaled here, T padded to 128."""
  q, k, v, w = make_inputs(2, 2, 100, 4, 2, 32)
  seg = jnp.asarray(packed_segments(np.random.default_rng(2), 2, 100))
  fn = lambda q, k, v: attn.splash_attention(q, k, v, seg, block_q=128, block_k=128, interpret=True)
  assert_matches_dense(fn, q, k, v, w, seg, tol=1e-5)
  causal = lambda q, k, v: attn.splash_attention(q, k, v, None, interpret=True)
  assert_matches_dense(causal, q, k, v, w, None, tol=1e-5)


def test_kernel_shape_errors():
  q, k, v, _ = make_inputs(0, 1, 32, 2, 1, 8)
  with pytest.raises(ValueError, match='power of two'):
    attn.pallas_gpu_attention(q, k, v, block_q=24, interpret=True)
  with pytest.raises(ValueError, match='multiple of 128'):
    attn.splash_attention(q, k, v, block_k=100, interpret=True)


# ---------------------------------------------------------------------------------------------------- resolve_impl


@pytest.mark.parametrize(
  'backend,dtype,expected',
  [
    ('gpu', jnp.bfloat16, 'cudnn'),
    ('gpu', jnp.float16, 'cudnn'),
    ('cuda', 'bfloat16', 'cudnn'),
    ('gpu', jnp.float32, 'blockwise'),
    ('tpu', jnp.bfloat16, 'splash'),
    ('tpu', jnp.float32, 'splash'),
    ('cpu', jnp.float32, 'blockwise'),
    ('cpu', jnp.bfloat16, 'blockwise'),
  ],
)
def test_resolve_auto(backend, dtype, expected):
  assert attn.resolve_impl('auto', backend, dtype) == expected


@pytest.mark.parametrize(
  'impl,backend,dtype',
  [
    ('xla', 'cpu', jnp.float32),
    ('blockwise', 'tpu', jnp.bfloat16),
    ('cudnn', 'gpu', jnp.bfloat16),
    ('pallas_gpu', 'gpu', jnp.float32),
    ('splash', 'tpu', jnp.float32),
  ],
)
def test_resolve_valid(impl, backend, dtype):
  assert attn.resolve_impl(impl, backend, dtype) == impl


@pytest.mark.parametrize(
  'impl,backend,dtype,hint',
  [
    ('cudnn', 'gpu', jnp.float32, 'bfloat16'),
    ('cudnn', 'cpu', jnp.bfloat16, 'needs a GPU'),
    ('cudnn', 'tpu', jnp.bfloat16, 'needs a GPU'),
    ('pallas_gpu', 'cpu', jnp.float32, 'needs a GPU'),
    ('pallas_gpu', 'tpu', jnp.bfloat16, 'needs a GPU'),
    ('splash', 'cpu', jnp.float32, 'needs a TPU'),
    ('splash', 'gpu', jnp.bfloat16, 'needs a TPU'),
    ('flash', 'gpu', jnp.bfloat16, 'must be one of'),
  ],
)
def test_resolve_rejects(impl, backend, dtype, hint):
  with pytest.raises(ValueError) as info:
    attn.resolve_impl(impl, backend, dtype)
  message = str(info.value)
  assert '\n' not in message
  assert message.startswith(f'model.attention_impl={impl!r}') and hint in message

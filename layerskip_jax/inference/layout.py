"""The decode layout: how a compiled decode program reads the layer weights. Decided here and nowhere else.

- stacked (GPU/TPU): the model's own stacked layers, run by Transformer.run_cached: a loop over exactly the layers
  a phase runs, no conditional per layer; E is static (one compiled program per exit).
- unstacked (CPU): every layer's weights as separate float32 arrays, run by Transformer.run_cached_unstacked, and
  the embedding, final norm and head in float32 (cpu_decode_model); E is a runtime value (one program for every
  exit). On a CPU, XLA copies a slice of stacked weights before each matmul, and bfloat16 arithmetic is slower
  than float32 (docs/results/measurements.md).

decode_weights() picks the layout for the backend (or as asked) and makes the weights once; the decode programs
(inference/decode.py) run layers through run_cached() below, which follows what the weights say.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from layerskip_jax.model import Transformer


def uses_unstacked_layers() -> bool:
  """Whether decoding runs on separately stored layer weights by default: on a CPU backend."""
  return jax.default_backend() == 'cpu'


def wants_unstacked(unstack: bool | None = None) -> bool:
  """The layout a request asks for: `unstack` when given, else the backend's default (uses_unstacked_layers)."""
  return uses_unstacked_layers() if unstack is None else bool(unstack)


def cpu_decode_model(model: Transformer) -> Transformer:
  """The model the unstacked layout runs: itself when it computes in float32, else the same model with a float32
  config whose embedding, final norm and head are float32 copies (same values); its stacked layers are left as they
  are (no copy): the layout reads `unstacked_layers(jnp.float32)`, one float32 copy of every layer.

  On a CPU, bfloat16 arithmetic is slower than float32 (no native bf16 matmul), and its rounding makes a (d + 1)-row
  verify and a one-row step part at near-ties (a 0.6% top-2 margin in the bf16 test model): in float32
  self-speculative and autoregressive decoding choose the same tokens. A bf16 model's float32 layers take twice its
  memory."""
  if model.config.compute_dtype == jnp.float32 and model.config.weight_dtype == jnp.float32:
    return model
  config = model.config.replace(dtype='float32', param_dtype='float32')
  graphdef, state = nnx.split(model)
  target, _ = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  keys = lambda path: tuple(getattr(k, 'key', getattr(k, 'name', k)) for k in path)
  cast = lambda path, a: a if path and path[0] == 'layers' else a.astype(jnp.float32)
  return nnx.merge(target, jax.tree_util.tree_map_with_path(lambda p, a: cast(keys(p), a), state))


@dataclasses.dataclass(frozen=True)
class DecodeWeights:
  """What a decode program runs: `model` and, in the unstacked layout, `layer_params` (None: stacked)."""

  model: Transformer
  layer_params: tuple[nnx.State, ...] | None = None

  @property
  def runtime_exit(self) -> bool:
    """Whether E is a runtime value of the compiled programs (unstacked) rather than static (one per exit)."""
    return self.layer_params is not None


def decode_weights(model: Transformer, unstack: bool | None = None) -> DecodeWeights:
  """The weights to decode `model` with: unstacked float32 copies when `unstack` (None: on a CPU backend), made
  here (once per loaded model: api caches them); else the model as it is."""
  if not wants_unstacked(unstack):
    return DecodeWeights(model)
  model = cpu_decode_model(model)
  return DecodeWeights(model, model.unstacked_layers(jnp.float32))


def run_cached(
  model: Transformer,
  layer_params: tuple[nnx.State, ...] | None,
  x: jax.Array,
  positions: jax.Array,
  cache_k: jax.Array,
  cache_v: jax.Array,
  *,
  start: int | jax.Array = 0,
  stop: int | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Layers [start, stop) with the KV cache, in the layout `layer_params` says: (x, cache_k, cache_v, ran [L])."""
  if layer_params is None:
    return model.run_cached(x, positions, cache_k, cache_v, start=start, stop=stop)
  return model.run_cached_unstacked(x, positions, cache_k, cache_v, layer_params, start=start, stop=stop)

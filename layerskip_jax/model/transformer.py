"""The Llama decoder with one shared exit head: embedding, L stacked layers applied by a scan, g = norm + LM head.

Exit E (1..L) is g(x_E), the head applied to the output of the first E layers (interfaces.md). The pieces are
public so that the objective and the samplers compose them; each layer runner has one job:

    x0 = model.embed(tokens)
    xE = model.run_span(x0, positions, stop=E)                # layers [0, E); E may be a traced value
    xL = model.run_span(xE, positions, start=E)               # layers [E, L), continuing from x_E
    logits = model.head(xL)                                   # the shared exit head g
    xL, exits = model.run_train(x0, positions, sample_keep=M, collect_layers=c)  # training: dropout, exits
    hidden = model.hidden_states(tokens)                      # hidden[l] = x_{l+1}, the output of layer l
    x, k, v, ran = model.run_cached(x, positions, k, v, start=s, stop=e)         # decoding with the KV cache

The layers' parameters are stacked on a leading `layers` axis (nnx.vmap at creation) and applied with
jax.lax.scan, so compile time does not grow with depth.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from layerskip_jax.model.layers import DecoderLayer, RMSNorm, param
from layerskip_jax.model.model_config import REMAT_POLICIES, ModelConfig
from layerskip_jax.model.rope import rope_tables
from layerskip_jax.sharding import ACT_BTD, ACT_BTV, constrain, param_shardings


def default_positions(tokens: jax.Array) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


class Transformer(nnx.Module):
  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    self.embed_tokens = param(rngs, (c.vocab_size, c.hidden_size), ('vocab', 'embed'), c)

    @nnx.split_rngs(splits=c.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked_layers(rngs):
      return DecoderLayer(c, rngs=rngs)

    self.layers = stacked_layers(rngs)
    for _, variable in nnx.iter_graph(self.layers):
      if isinstance(variable, nnx.Variable):
        variable.set_metadata(logical_axes=('layers', *variable.get_metadata()['logical_axes']))
    self.norm = RMSNorm(c, rngs=rngs)
    if not c.tie_word_embeddings:
      self.lm_head = param(rngs, (c.hidden_size, c.vocab_size), ('embed', 'vocab'), c)

  # --- pieces -----------------------------------------------------------------------------------------------

  def embed(self, tokens: jax.Array) -> jax.Array:
    """x_0 [batch, seq, hidden] in the compute dtype."""
    x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.config.compute_dtype)
    return constrain(x, ACT_BTD)

  def head(self, x: jax.Array) -> jax.Array:
    """The shared exit head g(x) = LM head(final RMSNorm(x)): float32 logits [..., vocab] for any layer's output."""
    dt = self.config.compute_dtype
    with jax.named_scope('head'):
      h = self.norm(x, dt).reshape(-1, x.shape[-1])
      kernel = self.embed_tokens[...].T if self.config.tie_word_embeddings else self.lm_head[...]
      # float32 accumulation and output: a bf16 model's loss, exit statistics and greedy choices are computed on
      # unrounded logits (bf16 logits of a 128k vocabulary tie and flip argmaxes).
      logits = jnp.dot(h, kernel.astype(dt), preferred_element_type=jnp.float32).reshape(*x.shape[:-1], -1)
    return constrain(logits, ACT_BTV) if logits.ndim == 3 else logits

  # --- layer runners: one per purpose ---------------------------------------------------------------------------
  # run_span (a span of layers: exits, the model's forward), run_train (every layer under layer-dropout masks,
  # collecting the supervised exits), hidden_states (every layer's output: evaluation), run_cached and
  # run_cached_unstacked (decoding with the KV cache, on stacked or separately stored weights; which one a decode
  # program uses is decided in inference/layout.py). The first three scan the stacked layers (_scanned_layer).

  def _scanned_layer(self, positions: jax.Array, segment_ids: jax.Array | None):
    """(apply, state): apply(layer_state, x) runs one decoder layer on x under the config's remat policy; state is
    every layer's parameters stacked on a leading axis, what the scan iterates over."""
    c = self.config
    graphdef, state = nnx.split(self.layers)
    cos, sin = rope_tables(positions, c)

    def apply(layer_state, x):
      return nnx.merge(graphdef, layer_state)(x, cos, sin, segment_ids)

    if c.remat_policy != 'none':
      apply = jax.checkpoint(apply, policy=REMAT_POLICIES[c.remat_policy], prevent_cse=False)
    return apply, state

  def _span(self, start: int | jax.Array, stop: int | jax.Array | None) -> tuple[Any, Any, bool]:
    """(start, stop, static): stop None is L; a static (Python int) range is checked here."""
    num_layers = self.config.num_hidden_layers
    stop = num_layers if stop is None else stop
    static = isinstance(start, int) and isinstance(stop, int)
    if static and not 0 <= start < stop <= num_layers:
      raise ValueError(f'layer range [{start}, {stop}) is not within [0, {num_layers}]')
    return start, stop, static

  def run_span(
    self,
    x: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    start: int | jax.Array = 0,
    stop: int | jax.Array | None = None,
  ) -> jax.Array:
    """x_stop: layers [start, stop) applied to x = x_start (the output of layer start-1, or x_0); stop None is L.

    Python ints scan only those layers; traced values scan all L and skip the others with lax.cond, so one
    compiled program serves every exit (api.logits, calibration)."""
    apply, state = self._scanned_layer(positions, segment_ids)
    start, stop, static = self._span(start, stop)
    if static:
      x, _ = jax.lax.scan(
        lambda x, layer_state: (apply(layer_state, x), None),
        x,
        jax.tree.map(lambda a: a[start:stop], state),
        unroll=self.config.scan_unroll,
      )
      return x

    def body(x, xs):
      layer_state, l = xs
      return jax.lax.cond((l >= start) & (l < stop), apply, lambda _, x: x, layer_state, x), None

    index = jnp.arange(self.config.num_hidden_layers, dtype=jnp.int32)
    x, _ = jax.lax.scan(body, x, (state, index), unroll=self.config.scan_unroll)
    return x

  def run_train(
    self,
    x: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    layer_keep: jax.Array | None = None,
    sample_keep: jax.Array | None = None,
    collect_layers: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array | None]:
    """The training pass: all L layers on x_0 under the layer-dropout masks (objective/dropout.py); returns
    (x_L, exits), exits the outputs of the layers the step supervises (None without collect_layers).

    layer_keep: bool [L]; a False layer is skipped with lax.cond (per-batch layer dropout: really saves compute).
    sample_keep: bool [L, batch]; where False the sequence passes the layer unchanged (per-sample layer dropout:
      x_{l+1} = x_l + M_l f_l(x_l) with M_l in {0, 1}, no rescaling).
    collect_layers: int [n] distinct layer indices (traced: the early exits this step supervises); exits
      [n, batch, seq, hidden] holds in entry i the output of layer collect_layers[i]. They are written into a
      buffer carried by the scan, so training keeps n of them, not all L: the whole [L, B, T, D] stack would sit
      beside the scan's own per-layer residuals (docs/results/measurements.md).
    """
    apply, state = self._scanned_layer(positions, segment_ids)
    index = jnp.arange(self.config.num_hidden_layers, dtype=jnp.int32)

    def body(carry, xs):
      x, buffer = carry
      layer_state, l, keep_layer, keep_sample = xs
      if keep_layer is None:
        y = apply(layer_state, x)
      else:
        y = jax.lax.cond(keep_layer, apply, lambda _, x: x, layer_state, x)
      if keep_sample is not None:
        y = jnp.where(keep_sample[:, None, None], y, x)
      if buffer is not None:  # one slot written (or rewritten with itself): no pass over the whole buffer
        hit = collect_layers == l
        slot = jnp.argmax(hit)
        old = jax.lax.dynamic_index_in_dim(buffer, slot, keepdims=False)
        buffer = jax.lax.dynamic_update_index_in_dim(buffer, jnp.where(jnp.any(hit), y, old), slot, 0)
      return (y, buffer), None

    buffer = None if collect_layers is None else jnp.zeros((collect_layers.shape[0], *x.shape), x.dtype)
    (x, buffer), _ = jax.lax.scan(
      body, (x, buffer), (state, index, layer_keep, sample_keep), unroll=self.config.scan_unroll
    )
    return x, buffer

  def run_cached(
    self,
    x: jax.Array,
    positions: jax.Array,
    cache_k: jax.Array,
    cache_v: jax.Array,
    *,
    start: int = 0,
    stop: int | None = None,
  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Decoding on the stacked weights (GPU/TPU): layers [start, stop) on x [B, T, D] at `positions` [B, T] with
    the KV cache [L, B, kv_heads, S, head_dim] (DecoderLayer.decode). Returns (x, cache_k, cache_v, ran [L] bool).

    start and stop are Python ints (one compiled program per exit): a loop over exactly those layers that indexes
    the stack with the loop counter. No conditional per layer: on a GPU XLA reads a conditional's predicate on the
    host (a round trip per layer per token), and a branch that slices the stack may copy the layer's weights. A
    dynamic index of a loop counter is how every scanned-layers decoder (MaxText, Levanter) reads its weights.
    Each layer stores its new K/V rows in place before it reads its cache slice.
    """
    start, stop, static = self._span(start, stop)
    if not static:
      raise ValueError(
        'run_cached (stacked weights) needs a static layer range (Python ints); '
        'run_cached_unstacked takes a traced exit'
      )
    graphdef, state = nnx.split(self.layers)
    cos, sin = rope_tables(positions, self.config)

    def body(l, carry):
      weights = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, l, keepdims=False), state)
      return nnx.merge(graphdef, weights).decode(carry[0], cos, sin, positions, carry[1], carry[2], l)

    x, cache_k, cache_v = jax.lax.fori_loop(start, stop, body, (x, cache_k, cache_v), unroll=self.config.scan_unroll)
    index = jnp.arange(self.config.num_hidden_layers)
    return x, cache_k, cache_v, (index >= start) & (index < stop)

  def run_cached_unstacked(
    self,
    x: jax.Array,
    positions: jax.Array,
    cache_k: jax.Array,
    cache_v: jax.Array,
    layer_params: tuple[nnx.State, ...],
    *,
    start: int | jax.Array = 0,
    stop: int | jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Decoding on separately stored weights (the CPU layout): as run_cached, with `layer_params` every layer's
    weights as separate arrays (`unstacked_layers()`, made once outside the compiled program), applied in an
    unrolled loop. On a CPU, XLA copies a slice of the stacked weights before each matmul (static or dynamic slice
    alike), which doubles the bytes a decode step moves (docs/results/measurements.md).

    start/stop may be traced values here (one program for every exit): layers outside [start, stop) are skipped
    with lax.cond, and a layer's weights are read inside its branch only, so a skipped layer costs nothing; with
    Python ints only the layers in range are emitted.
    """
    start, stop, static = self._span(start, stop)
    graphdef = nnx.graphdef(self.layers)
    cos, sin = rope_tables(positions, self.config)

    def apply(carry, l):
      layer = nnx.merge(graphdef, layer_params[l])
      return layer.decode(carry[0], cos, sin, positions, carry[1], carry[2], l)

    carry, ran = (x, cache_k, cache_v), []
    for l in range(self.config.num_hidden_layers):
      if static:
        if start <= l < stop:
          carry = apply(carry, l)
        ran.append(jnp.bool_(start <= l < stop))
        continue
      run = (l >= start) & (l < stop)
      carry = jax.lax.cond(run, lambda carry, l=l: apply(carry, l), lambda carry: carry, carry)
      ran.append(run)
    return (*carry, jnp.stack(ran))

  def unstacked_layers(self, dtype=None) -> tuple[nnx.State, ...]:
    """Every layer's parameters as separate arrays (a copy, cast to `dtype` if given), for run_cached_unstacked."""
    state = nnx.state(self.layers)
    copy = lambda a: jnp.array(a, dtype=dtype)
    return tuple(jax.tree.map(lambda a: copy(a[l]), state) for l in range(self.config.num_hidden_layers))

  # --- the runners' earlier names (code written against them keeps working) -----------------------------------

  def run_layers(
    self,
    x,
    positions,
    segment_ids=None,
    *,
    start=0,
    stop=None,
    layer_keep=None,
    sample_keep=None,
    collect=False,
    collect_layers=None,
  ):
    """Deprecated: run_span (start/stop), run_train (masks, collect_layers; collect=True collects every layer).
    Returns (x, hidden or None) as it did. Masks and collected outputs need the whole stack (start 0, stop L), the
    only way the package called it; a span with them is a ValueError."""
    warnings.warn(
      'Transformer.run_layers is deprecated: use run_span, run_train or hidden_states', DeprecationWarning, stacklevel=2
    )
    masks = layer_keep is not None or sample_keep is not None
    if collect or masks or collect_layers is not None:
      if not (isinstance(start, int) and start == 0 and (stop is None or stop == self.config.num_hidden_layers)):
        raise ValueError(
          'run_layers: masks and collected outputs take the whole stack (start=0, stop=None); use run_train'
        )
      if collect and collect_layers is None:
        collect_layers = jnp.arange(self.config.num_hidden_layers, dtype=jnp.int32)
      return self.run_train(
        x, positions, segment_ids, layer_keep=layer_keep, sample_keep=sample_keep, collect_layers=collect_layers
      )
    return self.run_span(x, positions, segment_ids, start=start, stop=stop), None

  def run_layers_cached(self, x, positions, cache_k, cache_v, *, start=0, stop=None, layer_params=None):
    """Deprecated: run_cached (stacked weights) or run_cached_unstacked (layer_params)."""
    warnings.warn(
      'Transformer.run_layers_cached is deprecated: use run_cached or run_cached_unstacked',
      DeprecationWarning,
      stacklevel=2,
    )
    if layer_params is None:
      return self.run_cached(x, positions, cache_k, cache_v, start=start, stop=stop)
    return self.run_cached_unstacked(x, positions, cache_k, cache_v, layer_params, start=start, stop=stop)

  # --- whole model ------------------------------------------------------------------------------------------

  def __call__(
    self,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    *,
    exit_layer: int | jax.Array | None = None,
  ) -> jax.Array:
    """float32 logits [batch, seq, vocab] of exit `exit_layer` (E in 1..L; None = L, the final output)."""
    positions = default_positions(tokens) if positions is None else positions
    return self.head(self.run_span(self.embed(tokens), positions, segment_ids, stop=exit_layer))

  def hidden_states(
    self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """[L, batch, seq, hidden]: entry l is x_{l+1}, the output (never the input) of layer l; no dropout (evaluation,
    the exit statistics)."""
    positions = default_positions(tokens) if positions is None else positions
    apply, state = self._scanned_layer(positions, segment_ids)

    def body(x, layer_state):
      y = apply(layer_state, x)
      return y, y

    _, hidden = jax.lax.scan(body, self.embed(tokens), state, unroll=self.config.scan_unroll)
    return hidden


def create(config: ModelConfig, seed: int = 0) -> Transformer:
  """A randomly initialised model on the default device."""
  return Transformer(config, rngs=nnx.Rngs(seed))


def abstract(config: ModelConfig) -> Transformer:
  """The model with jax.ShapeDtypeStruct leaves: shapes and dtypes without allocating memory."""
  return nnx.eval_shape(functools.partial(create, config))


def count_params(config: ModelConfig) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract(config), nnx.Param)))


def create_sharded(config: ModelConfig, mesh: jax.sharding.Mesh, seed: int = 0) -> Transformer:
  """A randomly initialised model whose parameters are created already sharded on `mesh` (a jit with
  out_shardings: no host ever holds the whole model). Same values as `create` (partitionable threefry)."""
  graphdef, abstract_state = nnx.split(abstract(config))
  shardings = param_shardings(abstract_state, mesh)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return nnx.split(create(config, seed))[1]

  with jax.set_mesh(mesh):
    return nnx.merge(graphdef, init())

"""The Llama decoder with one shared exit head: embedding, L stacked layers applied by a scan, g = norm + LM head.

Exit E (1..L) is g(x_E), the head applied to the output of the first E layers (interfaces.md). The pieces are
public so that the objective and the samplers compose them:

    x0 = model.embed(tokens)
    xE, _ = model.run_layers(x0, positions, stop=E)          # layers [0, E); E may be a traced value
    xL, _ = model.run_layers(xE, positions, start=E)         # layers [E, L), continuing from x_E
    logits = model.head(xL)                                   # the shared exit head g
    _, hidden = model.run_layers(x0, positions, collect=True) # hidden[l] = x_{l+1}, the output of layer l

The layers' parameters are stacked on a leading `layers` axis (nnx.vmap at creation) and applied with
jax.lax.scan, so compile time does not grow with depth.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from layerskip_jax.model.layers import REMAT_POLICIES, DecoderLayer, RMSNorm, param
from layerskip_jax.model.model_config import ModelConfig
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

  def run_layers(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None, *,
                 start: int | jax.Array = 0, stop: int | jax.Array | None = None,
                 layer_keep: jax.Array | None = None, sample_keep: jax.Array | None = None,
                 collect: bool = False, collect_layers: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
    """Runs layers [start, stop) on x (the output of layer start-1, or x_0) and returns (output, hidden).

    start/stop: Python ints scan only those layers; traced values scan all L and skip the others with lax.cond,
      so one compiled program serves every exit.
    layer_keep: bool [L]; a False layer is skipped with lax.cond (per-batch layer dropout: really saves compute).
    sample_keep: bool [L, batch]; where False the sequence passes the layer unchanged (per-sample layer dropout:
      x_{l+1} = x_l + M_l f_l(x_l) with M_l in {0, 1}, no rescaling).
    collect: also return hidden [n, batch, seq, hidden], hidden[i] the output of the i-th layer scanned (with
      static start=0 and stop=None, hidden[l] = x_{l+1}); otherwise hidden is None.
    collect_layers: int [n] distinct layer indices (traced; the early exits a training step supervises): return
      hidden [n, batch, seq, hidden] with hidden[i] the output of layer collect_layers[i] (with start=0). The
      outputs are written into a buffer carried by the scan, so training keeps n of them, not all L: with
      collect=True the [L, B, T, D] stack sat beside the scan's own per-layer residuals (4.3 GB per 4k sequence
      for a 7B model in the compiled CPU program).
    """
    c = self.config
    num_layers = c.num_hidden_layers
    stop = num_layers if stop is None else stop
    graphdef, state = nnx.split(self.layers)
    index = jnp.arange(num_layers, dtype=jnp.int32)
    static_range = isinstance(start, int) and isinstance(stop, int)
    if static_range:
      if not 0 <= start < stop <= num_layers:
        raise ValueError(f'layer range [{start}, {stop}) is not within [0, {num_layers}]')
      state, index, layer_keep, sample_keep = jax.tree.map(lambda a: a[start:stop],
                                                           (state, index, layer_keep, sample_keep))
    cos, sin = rope_tables(positions, c)

    def apply_layer(layer_state, x):
      return nnx.merge(graphdef, layer_state)(x, cos, sin, segment_ids)

    policy_name = c.remat_policy
    if policy_name != 'none':
      apply_layer = jax.checkpoint(apply_layer, policy=REMAT_POLICIES[policy_name], prevent_cse=False)

    def body(carry, xs):
      x, buffer = carry
      layer_state, l, keep_layer, keep_sample = xs
      run = None if static_range else (l >= start) & (l < stop)
      if keep_layer is not None:
        run = keep_layer if run is None else run & keep_layer
      if run is None:
        y = apply_layer(layer_state, x)
      else:
        y = jax.lax.cond(run, apply_layer, lambda _, x: x, layer_state, x)
      if keep_sample is not None:
        y = jnp.where(keep_sample[:, None, None], y, x)
      if buffer is not None:  # one slot written (or rewritten with itself): no pass over the whole buffer
        hit = collect_layers == l
        slot = jnp.argmax(hit)
        old = jax.lax.dynamic_index_in_dim(buffer, slot, keepdims=False)
        buffer = jax.lax.dynamic_update_index_in_dim(buffer, jnp.where(jnp.any(hit), y, old), slot, 0)
      return (y, buffer), (y if collect else None)

    buffer = None
    if collect_layers is not None:
      buffer = jnp.zeros((collect_layers.shape[0], *x.shape), x.dtype)
    (x, buffer), hidden = jax.lax.scan(body, (x, buffer), (state, index, layer_keep, sample_keep),
                                       unroll=c.scan_unroll)
    return x, (buffer if collect_layers is not None else hidden)

  def run_layers_cached(self, x: jax.Array, positions: jax.Array, cache_k: jax.Array, cache_v: jax.Array, *,
                        start: int | jax.Array = 0, stop: int | jax.Array | None = None,
                        layer_params: tuple[nnx.State, ...] | None = None
                        ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Inference: layers [start, stop) on x [B, T, D] at `positions` [B, T] with the KV cache
    [L, B, kv_heads, S, head_dim] (see DecoderLayer.decode). Returns (x, cache_k, cache_v, ran [L] bool).

    Two layouts of the weights, two constructions:

    - Stacked weights (layer_params None: the GPU/TPU path). start and stop must be Python ints (one compiled
      program per exit there): a loop over exactly the layers [start, stop) that indexes the stack with the loop
      counter. No conditional per layer: on a GPU XLA reads a conditional's predicate on the host (a round trip per
      layer per token), and a branch that slices the stack may copy the layer's weights. A dynamic index of a loop
      counter is how every scanned-layers decoder (MaxText, Levanter) reads its weights.
    - layer_params (from `unstacked_layers()`, made once outside the compiled program: the CPU path): every layer's
      weights as separate arrays, applied in an unrolled loop. On a CPU, XLA copies a slice of the stacked weights
      before each matmul (static or dynamic slice alike), which doubles the bytes a decode step moves: the
      weight-matmul chain of tiny measured 1.6-1.8 ms scanned over stacked weights against 0.8 ms with separate
      arrays. start/stop may be traced values here (one program for every exit): layers outside [start, stop) are
      skipped with lax.cond, and a layer's weights are read inside its branch only, so a skipped layer costs
      nothing; with Python ints only the layers in range are emitted.

    Each running layer stores its new K/V rows in place before it reads its cache slice (DecoderLayer.decode).
    `ran` tells which layers ran.
    """
    c = self.config
    num_layers = c.num_hidden_layers
    stop = num_layers if stop is None else stop
    graphdef, state = nnx.split(self.layers)
    cos, sin = rope_tables(positions, c)
    static_range = isinstance(start, int) and isinstance(stop, int)
    if static_range and not 0 <= start < stop <= num_layers:
      raise ValueError(f'layer range [{start}, {stop}) is not within [0, {num_layers}]')

    def apply(carry, l, weights):
      layer = nnx.merge(graphdef, weights)
      return layer.decode(carry[0], cos, sin, positions, carry[1], carry[2], l)

    carry = (x, cache_k, cache_v)
    if layer_params is None:
      if not static_range:
        raise ValueError('run_layers_cached on stacked weights needs a static layer range (Python ints); pass '
                         'layer_params (unstacked_layers()) for a traced exit')
      take = lambda l: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, l, keepdims=False), state)
      carry = jax.lax.fori_loop(start, stop, lambda l, carry: apply(carry, l, take(l)), carry,
                                unroll=c.scan_unroll)
      return (*carry, (jnp.arange(num_layers) >= start) & (jnp.arange(num_layers) < stop))
    ran = []
    for l in range(num_layers):
      if static_range:
        if start <= l < stop:
          carry = apply(carry, l, layer_params[l])
        ran.append(jnp.bool_(start <= l < stop))
        continue
      run = (l >= start) & (l < stop)
      carry = jax.lax.cond(run, lambda carry, l=l: apply(carry, l, layer_params[l]), lambda carry: carry, carry)
      ran.append(run)
    return (*carry, jnp.stack(ran))

  def unstacked_layers(self, dtype=None) -> tuple[nnx.State, ...]:
    """Every layer's parameters as separate arrays (a copy, cast to `dtype` if given), for
    run_layers_cached(layer_params=...)."""
    state = nnx.state(self.layers)
    copy = lambda a: jnp.array(a, dtype=dtype)
    return tuple(jax.tree.map(lambda a: copy(a[l]), state) for l in range(self.config.num_hidden_layers))

  # --- whole model ------------------------------------------------------------------------------------------

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               *, exit_layer: int | jax.Array | None = None) -> jax.Array:
    """float32 logits [batch, seq, vocab] of exit `exit_layer` (E in 1..L; None = L, the final output)."""
    positions = default_positions(tokens) if positions is None else positions
    x, _ = self.run_layers(self.embed(tokens), positions, segment_ids, stop=exit_layer)
    return self.head(x)

  def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None, **keep) -> jax.Array:
    """[L, batch, seq, hidden]: entry l is x_{l+1}, the output (never the input) of layer l; keep as run_layers."""
    positions = default_positions(tokens) if positions is None else positions
    _, hidden = self.run_layers(self.embed(tokens), positions, segment_ids, collect=True, **keep)
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

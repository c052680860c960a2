"""The LayerSkip objective: layer dropout, then the early-exit loss through the one shared head (spec section 1.2).

    J(t) = sum_l w(t, l) * CE(g(x_{l+1}), Y)

With self-distillation (spec section 1.5, `distill_weight` lambda > 0) each early exit's term becomes
(1 - lambda) CE(g(x_l), Y) + lambda D(g(x_L) || g(x_l)), the last exit held fixed; the last exit's own term and
the logged per-exit cross-entropies are unchanged.

Only the exits with non-zero weight are computed, at most `max_supervised_exits` of them per step (a static count),
and each exit's cross-entropy runs over sequence chunks with the logits recomputed in the backward pass, so logits
for all exits (or for a whole sequence) are never in memory at once.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from layerskip_jax.model import Transformer
from layerskip_jax.model.transformer import default_positions
from layerskip_jax.objective.dropout import keep_masks
from layerskip_jax.objective.keys import EXIT_TOKENS, step_key
from layerskip_jax.objective.objective_config import ObjectiveConfig
from layerskip_jax.objective.schedules import early_exit_weights


def _chunked(chunk_len: int, *arrays: jax.Array) -> tuple[int, tuple[jax.Array, ...]]:
  """(num_chunks, arrays [num_chunks, B, c, ...]): the sequence axis (1) cut into chunks of `chunk_len` positions,
  the last one zero-padded."""
  batch, seq = arrays[0].shape[:2]
  chunk_len = min(chunk_len, seq)
  num_chunks = -(-seq // chunk_len)
  pad = num_chunks * chunk_len - seq

  def chunks(a):
    if pad:
      a = jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2))
    return jnp.moveaxis(a.reshape(batch, num_chunks, chunk_len, *a.shape[2:]), 1, 0)

  return num_chunks, tuple(chunks(a) for a in arrays)


def greedy_over_chunks(model: Transformer, hidden: jax.Array, chunk_len: int) -> jax.Array:
  """argmax of g(hidden) [B, T] (int32), chunk by chunk: a [B, T, V] logits tensor never exists."""
  seq = hidden.shape[1]
  _, (chunks,) = _chunked(chunk_len, hidden)
  top1 = jax.lax.map(lambda h: jnp.argmax(model.head(h), axis=-1).astype(jnp.int32), chunks)
  return jnp.moveaxis(top1, 0, 1).reshape(hidden.shape[0], -1)[:, :seq]


def _sum_over_chunks(
  model: Transformer, hidden: jax.Array, targets: jax.Array, mask: jax.Array, chunk_len: int, stats
) -> Any:
  """Sums stats(logits [B, c, V], targets [B, c], mask [B, c]) over chunks of `chunk_len` sequence positions.

  The chunks go through the head one at a time (lax.scan), each under jax.checkpoint: peak memory holds one
  chunk's logits in both passes.
  """
  _, (hidden_chunks, target_chunks, mask_chunks) = _chunked(chunk_len, hidden, targets, mask.astype(jnp.float32))

  @jax.checkpoint
  def chunk_stats(h, y, m):
    return stats(model.head(h), y, m)

  def body(total, xs):
    return jax.tree.map(jnp.add, total, chunk_stats(*xs)), None

  xs = (hidden_chunks, target_chunks, mask_chunks)
  zeros = jax.tree.map(
    lambda s: jnp.zeros(s.shape, s.dtype),
    jax.eval_shape(chunk_stats, *(jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in xs)),
  )
  total, _ = jax.lax.scan(body, zeros, xs)
  return total


def _cross_entropy(logits, targets, mask):
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * mask)


def cross_entropy_sum(
  model: Transformer, hidden: jax.Array, targets: jax.Array, mask: jax.Array, chunk_len: int
) -> jax.Array:
  """sum over tokens of mask * CE(g(hidden), targets), float32, for hidden [B, T, D], targets/mask [B, T],
  computed chunk by chunk (logits never exist for the whole sequence)."""
  return _sum_over_chunks(model, hidden, targets, mask.astype(jnp.float32), chunk_len, _cross_entropy)


def _distillation(kind: str, temperature: float):
  """stats(logits [B, c, V], (targets, teacher logits) [B, c] and [B, c, V], mask) -> (CE sum, D sum) of spec 1.5:
  soft: KL(softmax(z_L / tau) || softmax(z_l / tau)) tau^2; hard: CE with argmax z_L. The teacher is held fixed."""

  def stats(logits, targets_and_teacher, mask):
    targets, teacher = targets_and_teacher
    teacher = jax.lax.stop_gradient(teacher)
    ce = _cross_entropy(logits, targets, mask)
    if kind == 'hard':
      return ce, _cross_entropy(logits, jnp.argmax(teacher, axis=-1), mask)
    log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
    log_q = jax.nn.log_softmax(logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return ce, jnp.sum(kl * mask) * temperature**2

  return stats


def distillation_sums(
  model: Transformer,
  hidden: jax.Array,
  teacher_hidden: jax.Array,
  targets: jax.Array,
  mask: jax.Array,
  chunk_len: int,
  kind: str = 'soft',
  temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """(sum of mask * CE(g(hidden), targets), sum of mask * D(g(teacher_hidden) || g(hidden))), float32, chunk by
  chunk: the teacher's logits are computed per chunk as well (no [B, T, V] tensor for either), under stop-gradient
  (no gradient reaches the teacher's layers through D)."""
  _, (hidden_chunks, teacher_chunks, target_chunks, mask_chunks) = _chunked(
    chunk_len, hidden, jax.lax.stop_gradient(teacher_hidden), targets, mask.astype(jnp.float32)
  )
  stats = _distillation(kind, temperature)

  @jax.checkpoint
  def chunk_stats(h, t, y, m):
    # Tied to the student's chunk: the teacher's logits do not depend on the exit, and XLA hoisted them out of the
    # loop over exits, all chunks at once (a [B, T, V] tensor: 1.58x the train step's temporaries for llama3_2_1b
    # at 8k tokens).
    h, t = jax.lax.optimization_barrier((h, t))
    return stats(model.head(h), (y, model.head(t)), m)

  def body(total, xs):
    return jax.tree.map(jnp.add, total, chunk_stats(*xs)), None

  total, _ = jax.lax.scan(
    body, (jnp.float32(0), jnp.float32(0)), (hidden_chunks, teacher_chunks, target_chunks, mask_chunks)
  )
  return total


def _exit_token_subset(cfg: ObjectiveConfig, seq: int, step, microbatch, layer) -> jax.Array | None:
  """Sequence positions layer `layer`'s exit is scored on this step (None: all). Uniform without replacement,
  from a key that is a pure function of (seed, step, microbatch, layer): an unbiased estimate of the exit's CE."""
  if cfg.exit_token_fraction >= 1.0:
    return None
  count = max(1, math.ceil(cfg.exit_token_fraction * seq))
  key = jax.random.fold_in(step_key(cfg.seed, EXIT_TOKENS, step, microbatch), layer)
  return jax.random.choice(key, seq, (count,), replace=False)


def layerskip_loss(
  model: Transformer,
  batch: dict[str, jax.Array],
  step: int | jax.Array,
  microbatch: int | jax.Array,
  cfg: ObjectiveConfig,
  *,
  train: bool = True,
) -> tuple[jax.Array, dict[str, Any]]:
  """(J, metrics) for one microbatch. `step` is t (0-based: the update that produces step t+1).

  batch: `inputs`, `targets` int [B, T]; `loss_mask` [B, T] (1 where the target counts; 0 on padding, on
  prompt tokens of fine-tuning data, and across document boundaries); optional `positions` and `segment_ids`.
  metrics: `loss` (J), `ce_last`, `exit_ce` float32 [L] (NaN where the exit was not computed this step),
  `tokens` (the number of target tokens). With train=False there is no layer dropout.
  """
  inputs, targets = batch['inputs'], batch['targets']
  mask = batch['loss_mask'].astype(jnp.float32)
  positions = batch.get('positions')
  positions = default_positions(inputs) if positions is None else positions
  num_layers = model.config.num_hidden_layers
  batch_size, seq = inputs.shape

  layer_keep, sample_keep = (None, None)
  if train:
    layer_keep, sample_keep = keep_masks(
      num_layers,
      batch_size,
      step,
      microbatch,
      seed=cfg.seed,
      p_max=cfg.p_max,
      total_steps=cfg.total_steps,
      depth_schedule=cfg.depth_schedule,
      time_schedule=cfg.time_schedule,
      mode=cfg.dropout_mode,
    )
  num_early = cfg.num_early_exits(num_layers)
  weights = early_exit_weights(
    num_layers, step, cfg.total_steps, cfg.curriculum, cfg.rotation_period, cfg.e_scale, cfg.draft_exit
  )
  chosen_weights, chosen = jax.lax.top_k(weights[:-1], max(num_early, 1))  # every active early exit, then zeros
  x_last, hidden = model.run_train(
    model.embed(inputs),
    positions,
    batch.get('segment_ids'),
    layer_keep=layer_keep,
    sample_keep=sample_keep,
    collect_layers=chosen if num_early > 0 else None,
  )

  tokens = jnp.sum(mask)
  denominator = jnp.maximum(tokens, 1.0)
  with jax.named_scope('last_exit_loss'):
    ce_last = cross_entropy_sum(model, x_last, targets, mask, cfg.ce_chunk_len) / denominator
  loss = weights[-1] * ce_last
  exit_ce = jnp.full((num_layers,), jnp.nan, jnp.float32).at[-1].set(ce_last)

  if num_early > 0:
    distill = cfg.distill_weight > 0

    def exit_ce_of(layer, h):  # h = x_{layer+1}: the output of layer `layer`; (CE, the exit's loss)
      y, m, teacher = targets, mask, x_last
      subset = _exit_token_subset(cfg, seq, step, microbatch, layer)
      if subset is not None:
        h, y, m, teacher = h[:, subset], y[:, subset], m[:, subset], teacher[:, subset]
      count = jnp.maximum(jnp.sum(m), 1.0)
      if not distill:
        ce = cross_entropy_sum(model, h, y, m, cfg.ce_chunk_len) / count
        return ce, ce
      ce, d = distillation_sums(model, h, teacher, y, m, cfg.ce_chunk_len, cfg.distill, cfg.distill_temperature)
      lam = cfg.distill_lambda(step)
      return ce / count, ((1 - lam) * ce + lam * d) / count

    # No lax.cond to skip padding entries (zero weight): a cond's residuals are stacked per iteration, head
    # weights included, which cost 1.5x the train step's memory on a 24-layer model; plain iterations keep the
    # loop-invariant weights out of the stack (1.08x).
    with jax.named_scope('early_exit_loss'):
      _, (early_ce, early_loss) = jax.lax.scan(lambda _, xs: (None, exit_ce_of(*xs)), None, (chosen, hidden))
    loss = loss + jnp.sum(chosen_weights * early_loss)
    exit_ce = exit_ce.at[chosen].set(jnp.where(chosen_weights > 0, early_ce, jnp.nan))

  return loss, {'loss': loss, 'ce_last': ce_last, 'exit_ce': exit_ce, 'tokens': tokens}


def exit_statistics(model: Transformer, batch: dict[str, jax.Array], chunk_len: int = 512) -> dict[str, jax.Array]:
  """Evaluation at every exit, no dropout. Sums over the batch's target tokens, each float32 [L] (index l holds exit
  E = l + 1, g(x_{l+1}); interfaces.md): `ce` (cross-entropy), `correct` (top-1 equals the target), `agree_final`
  (top-1 equals the last exit's top-1: greedy agreement); and `tokens`. Divide by tokens for means.

  Every exit, the last included, goes through the head chunk by chunk (`chunk_len` positions at a time): no
  [B, T, V] logits, so evaluation fits wherever the train step (same microbatch) fits."""
  inputs = batch['inputs']
  positions = batch.get('positions')
  positions = default_positions(inputs) if positions is None else positions
  mask = batch['loss_mask'].astype(jnp.float32)
  hidden = model.hidden_states(inputs, positions, batch.get('segment_ids'))  # [L, B, T, D]
  x_last = hidden[-1]
  final = greedy_over_chunks(model, x_last, chunk_len)

  def per_exit(_, h):
    def stats(logits, targets_and_final, m):
      targets, final_top1 = targets_and_final[..., 0], targets_and_final[..., 1]
      top1 = jnp.argmax(logits, axis=-1)
      return (_cross_entropy(logits, targets, m), jnp.sum((top1 == targets) * m), jnp.sum((top1 == final_top1) * m))

    return None, _sum_over_chunks(model, h, jnp.stack([batch['targets'], final], axis=-1), mask, chunk_len, stats)

  _, (ce, correct, agree) = jax.lax.scan(per_exit, None, hidden)
  return {'ce': ce, 'correct': correct, 'agree_final': agree, 'tokens': jnp.sum(mask)}


def summarize_exits(totals: dict[str, np.ndarray]) -> dict[str, Any]:
  """Per-exit means (arrays of length L) from exit_statistics summed over batches (on the host)."""
  tokens = max(float(totals['tokens']), 1.0)
  exit_ce = np.asarray(totals['ce']) / tokens
  return {
    'exit_ce': exit_ce,
    'exit_ppl': np.exp(np.minimum(exit_ce, 50.0)),
    'exit_accuracy': np.asarray(totals['correct']) / tokens,
    'exit_agreement': np.asarray(totals['agree_final']) / tokens,
    'tokens': float(totals['tokens']),
  }

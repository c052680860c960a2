"""AdamW with linear warmup and cosine decay, global-norm clipping, and no weight decay on norm scales."""

from __future__ import annotations

import jax
import optax
from flax import nnx
from ml_collections import config_dict


def learning_rate_schedule(train: config_dict.ConfigDict) -> optax.Schedule:
  """Linear warmup to train.learning_rate, then cosine decay to learning_rate * min_lr_ratio at train.steps."""
  warmup = min(train.warmup_steps, train.steps)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=train.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(train.steps, warmup + 1),
    end_value=train.learning_rate * train.min_lr_ratio,
  )


def _decay_mask(params: nnx.State) -> nnx.State:
  """True for every parameter except norm scales (their logical axes end in 'norm')."""
  return jax.tree.map(
    lambda v: v.get_metadata().get('logical_axes', ('',))[-1] != 'norm',
    params,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def make_optimizer(train: config_dict.ConfigDict, params: nnx.State) -> optax.GradientTransformation:
  """The optimizer for the pure parameter dict of `params` (the model's Param state, real or abstract: only
  metadata is read). The train state holds parameters as a pure dict (nnx.to_pure_dict), as checkpoints do."""
  mask = nnx.to_pure_dict(_decay_mask(params))
  adamw = optax.adamw(
    learning_rate_schedule(train),
    b1=train.adam_b1,
    b2=train.adam_b2,
    eps=train.adam_eps,
    weight_decay=train.weight_decay,
    mask=mask,
  )
  if train.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), adamw)
  return adamw

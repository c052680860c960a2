"""The LayerSkip training objective: schedules (pure functions), layer-dropout masks, the early-exit loss."""

from layerskip_jax.objective.dropout import keep_masks
from layerskip_jax.objective.loss import cross_entropy_sum, distillation_sums, layerskip_loss
from layerskip_jax.objective.objective_config import ObjectiveConfig
from layerskip_jax.objective.schedules import (
  curriculum_mask,
  depth_scale,
  early_exit_scales,
  early_exit_weights,
  layer_dropout_probs,
  max_supervised_exits,
  time_scale,
)

__all__ = [
  'ObjectiveConfig',
  'cross_entropy_sum',
  'curriculum_mask',
  'depth_scale',
  'distillation_sums',
  'early_exit_scales',
  'early_exit_weights',
  'keep_masks',
  'layer_dropout_probs',
  'layerskip_loss',
  'max_supervised_exits',
  'time_scale',
]

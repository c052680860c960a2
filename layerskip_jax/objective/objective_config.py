"""The training recipe's static description: the `layerskip` config section (plus train.steps and train.seed) as a
frozen, hashable dataclass, static under jit.

It is also that section's schema: each field's allowed values sit beside it (config.choice / config.bounded), and
config.validate reads them from here. What each key means is documented in configs/base.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from ml_collections import config_dict

from layerskip_jax.config import bounded, choice, section_kwargs
from layerskip_jax.objective.dropout import DROPOUT_MODES
from layerskip_jax.objective.schedules import CURRICULA, DEPTH_SCHEDULES, TIME_SCHEDULES, max_supervised_exits

DISTILLATION = ('soft', 'hard')  # loss.distillation_sums


def _train_key(default: int = dataclasses.MISSING) -> int:
  """A field taken from the train section, not from `layerskip` (from_config passes it); no default: required."""
  return dataclasses.field(default=default, metadata={'outside_section': True})


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """The `layerskip` config section plus train.steps (T) and train.seed."""

  total_steps: int = _train_key()
  seed: int = _train_key(0)
  p_max: float = bounded(0.1, low=0.0, high=1.0)
  depth_schedule: str = choice('exp', DEPTH_SCHEDULES)
  time_schedule: str = choice('constant', TIME_SCHEDULES)
  dropout_mode: str = choice('per_sample', DROPOUT_MODES)
  e_scale: float = bounded(1.0, low=0.0)
  curriculum: str = choice('rotational', CURRICULA)
  rotation_period: int = bounded(4, low=1)
  exit_token_fraction: float = bounded(1.0, low=0.0, high=1.0, low_excluded=True)
  ce_chunk_len: int = bounded(512, low=1)
  distill_weight: float = bounded(0.0, low=0.0, high=1.0)
  distill: str = choice('soft', DISTILLATION)
  distill_temperature: float = bounded(1.0, low=0.0, low_excluded=True)
  distill_warmup: float = bounded(0.0, low=0.0, high=1.0)
  draft_exit: int = bounded(0, low=0)

  def distill_lambda(self, step) -> jax.Array | float:
    """lambda at step t: distill_weight, ramped linearly from 0 over the first distill_warmup x total_steps steps
    (an early teacher is noise: hard distillation from step 0 collapsed tiny, spec 1.5)."""
    ramp = self.distill_warmup * self.total_steps
    if ramp <= 0:
      return self.distill_weight
    return self.distill_weight * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / ramp)

  @classmethod
  def from_config(cls, config: config_dict.ConfigDict) -> 'ObjectiveConfig':
    """From a whole config (its layerskip section, train.steps and train.seed); a layerskip key that is not a field
    is a one-line ConfigError naming it."""
    return cls(
      total_steps=config.train.steps, seed=config.train.seed, **section_kwargs(config.layerskip, cls, 'layerskip')
    )

  def num_early_exits(self, num_layers: int) -> int:
    """The early exits a step computes (a static count: the curriculum's maximum, draft_exit included; entries of
    zero weight are computed too). The last exit is always supervised, on its own, besides these."""
    return (
      max_supervised_exits(
        num_layers, self.total_steps, self.curriculum, self.rotation_period, self.e_scale, self.draft_exit
      )
      - 1
    )

  @property
  def is_baseline(self) -> bool:
    """p_max = 0 and e_scale = 0: a plain language-model step (last exit only, no masks)."""
    return self.p_max == 0 and self.e_scale == 0

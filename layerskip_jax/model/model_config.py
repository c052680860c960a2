"""The model's static description: a frozen, hashable dataclass built from the `model` section of a config."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from ml_collections import config_dict


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  rope_type: str = 'default'  # 'default' (none), 'linear' or 'llama3'
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


# Fields that change how the model computes or is initialised, not which function it computes: a checkpoint may be
# loaded into a config that differs in these (continual pretraining casts the weights to param_dtype).
NUMERICS_FIELDS = ('dtype', 'param_dtype', 'remat_policy', 'attention_impl', 'attention_block', 'scan_unroll',
                   'initializer_range')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Field names are Hugging Face Llama's; see configs/base.py for what each means."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int = 0
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat_policy: str = 'none'
  attention_impl: str = 'auto'
  attention_block: int = 512
  scan_unroll: int = 1

  def __post_init__(self):
    if not self.head_dim:
      object.__setattr__(self, 'head_dim', self.hidden_size // self.num_attention_heads)
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, 'rope_scaling', RopeScaling(**self.rope_scaling))

  @classmethod
  def from_config(cls, model: config_dict.ConfigDict) -> 'ModelConfig':
    """From a validated config's `model` section (layerskip_jax.config.load validates)."""
    return cls(**model.to_dict())

  def architecture(self) -> dict:
    """The fields that define the function (all but NUMERICS_FIELDS), head_dim resolved."""
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in NUMERICS_FIELDS}

  def replace(self, **changes) -> 'ModelConfig':
    return dataclasses.replace(self, **changes)

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

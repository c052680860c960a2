"""The model's static description: a frozen, hashable dataclass built from the `model` section of a config.

It is also that section's schema: each field's allowed values sit beside it (config.choice / config.bounded), and
config.validate reads them from here. What each key means is documented in configs/base.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from ml_collections import config_dict

from layerskip_jax.config import DTYPES, bounded, choice, section_kwargs
from layerskip_jax.model.attention import IMPLS as ATTENTION_IMPLS

ROPE_TYPES = ('default', 'linear', 'llama3')

# model.remat_policy: name -> the jax.checkpoint policy each layer is rematerialised with (None: no remat).
REMAT_POLICIES = {
  'none': None,
  'full': jax.checkpoint_policies.nothing_saveable,
  'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  'save_proj': jax.checkpoint_policies.save_only_these_names('qkv_proj', 'attn_out', 'mlp_out'),
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  rope_type: str = choice('default', ROPE_TYPES)  # 'default' (none), 'linear' or 'llama3'
  factor: float = bounded(8.0, low=1.0)
  low_freq_factor: float = bounded(1.0, low=0.0, low_excluded=True)
  high_freq_factor: float = bounded(4.0, low=0.0, low_excluded=True)
  original_max_position_embeddings: int = bounded(8192, low=1)


# Fields that change how the model computes or is initialised, not which function it computes: a checkpoint may be
# loaded into a config that differs in these (continual pretraining casts the weights to param_dtype).
NUMERICS_FIELDS = (
  'dtype',
  'param_dtype',
  'remat_policy',
  'attention_impl',
  'attention_block',
  'scan_unroll',
  'initializer_range',
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Field names are Hugging Face Llama's; see configs/base.py for what each means."""

  vocab_size: int = bounded(low=1)
  hidden_size: int = bounded(low=1)
  intermediate_size: int = bounded(low=1)
  num_hidden_layers: int = bounded(low=2)
  num_attention_heads: int = bounded(low=1)
  num_key_value_heads: int = bounded(low=1)
  head_dim: int = bounded(0, low=0)
  rope_theta: float = bounded(10000.0, low=0.0, low_excluded=True)
  rope_scaling: RopeScaling = RopeScaling()
  rms_norm_eps: float = bounded(1e-5, low=0.0, low_excluded=True)
  max_position_embeddings: int = bounded(2048, low=1)
  tie_word_embeddings: bool = False
  initializer_range: float = bounded(0.02, low=0.0)
  dtype: str = choice('float32', DTYPES)
  param_dtype: str = choice('float32', DTYPES)
  remat_policy: str = choice('none', REMAT_POLICIES)
  attention_impl: str = choice('auto', ATTENTION_IMPLS)
  attention_block: int = bounded(512, low=16)
  scan_unroll: int = bounded(1, low=1)

  def __post_init__(self):
    if not self.head_dim:
      object.__setattr__(self, 'head_dim', self.hidden_size // self.num_attention_heads)
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, 'rope_scaling', RopeScaling(**self.rope_scaling))

  @classmethod
  def from_config(cls, model: config_dict.ConfigDict) -> 'ModelConfig':
    """From a config's `model` section (layerskip_jax.config.load validates its values); a key that is not a field
    (of ModelConfig, or of RopeScaling under rope_scaling) is a one-line ConfigError naming it."""
    kwargs = section_kwargs(model, cls, 'model')
    if 'rope_scaling' in kwargs:
      kwargs['rope_scaling'] = RopeScaling(**section_kwargs(model.rope_scaling, RopeScaling, 'model.rope_scaling'))
    return cls(**kwargs)

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

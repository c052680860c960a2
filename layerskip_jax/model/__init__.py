"""The Llama-family model with one shared exit head (Flax NNX)."""

from layerskip_jax.model.model_config import ModelConfig, RopeScaling
from layerskip_jax.model.transformer import Transformer, abstract, count_params, create, create_sharded

__all__ = ['ModelConfig', 'RopeScaling', 'Transformer', 'abstract', 'count_params', 'create', 'create_sharded']

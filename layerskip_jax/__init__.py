"""layerskip_jax: LayerSkip pretraining and self-speculative decoding for Llama-family models in JAX/Flax NNX."""

__version__ = "0.1.0"

"""Checkpoint conversion: Hugging Face Llama safetensors <-> layerskip_jax checkpoint directories."""

from layerskip_jax.convert.hf import export_hf, import_hf

__all__ = ['export_hf', 'import_hf']

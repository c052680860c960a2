"""Inference: the fixed-size KVQ cache and the compiled samplers (autoregressive, early exit, self-speculative)."""

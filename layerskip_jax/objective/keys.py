"""Every random draw of the objective is a pure function of (seed, stream, step, microbatch[, layer or exit]).

No key is carried in mutable state: a resumed run, and a run on another number of devices or hosts, draws the
same values for the same sequences (draws cover the global batch and are then sharded like it).
"""

import jax

LAYER_DROPOUT = 1  # stream ids keep the draws of different purposes independent
EXIT_TOKENS = 2


def step_key(seed: int, stream: int, step: int | jax.Array, microbatch: int | jax.Array) -> jax.Array:
  key = jax.random.fold_in(jax.random.key(seed), stream)
  return jax.random.fold_in(jax.random.fold_in(key, step), microbatch)

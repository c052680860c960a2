"""The Python entry point for users and notebooks.

    from layerskip_jax import api
    lm = api.load('runs/tiny')                       # a training workdir or a converted checkpoint
    logits = lm.logits([[1, 15, 27]], exit_layer=4)  # g(x_4): [batch, seq, vocab], float32
    result = lm.generate(['def parse('], strategy='self_speculative', exit_layer=4, num_speculations=4)
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_dict

from layerskip_jax import checkpoint_dir
from layerskip_jax.data import tokenizer as tokenizer_lib
from layerskip_jax.errors import UsageError
from layerskip_jax.inference.generate import GenerateResult, generate, uses_unstacked_layers
from layerskip_jax.model import Transformer


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens, exit_layer):
  return nnx.merge(graphdef, state)(tokens, exit_layer=exit_layer)


@dataclasses.dataclass
class LoadedModel:
  config: config_dict.ConfigDict
  model: Transformer
  tokenizer: tokenizer_lib.Tokenizer | None
  checkpoint: checkpoint_dir.CheckpointDir
  _layer_params: tuple | None = dataclasses.field(default=None, repr=False)  # decode layout on a CPU (generate)

  @property
  def num_layers(self) -> int:
    return self.model.config.num_hidden_layers

  def _exit(self, exit_layer: int | None) -> int:
    if exit_layer is None:
      return self.num_layers
    if not 1 <= exit_layer <= self.num_layers:
      raise UsageError(f'exit_layer={exit_layer}: must be in 1..{self.num_layers} (E counts the layers run)')
    return exit_layer

  def logits(self, input_ids: Sequence[Sequence[int]] | np.ndarray | jax.Array,
             exit_layer: int | None = None) -> np.ndarray:
    """float32 logits [batch, seq, vocab] of exit `exit_layer` (1..L; None = the final output).

    One compiled program serves every exit (exit_layer is a traced value).
    """
    try:
      tokens = np.asarray(input_ids, dtype=np.int32)
    except ValueError:
      raise UsageError('input_ids: rows must have equal lengths (pad them, or call once per row)') from None
    if tokens.ndim == 1:
      tokens = tokens[None]
    if tokens.ndim != 2 or tokens.size == 0:
      raise UsageError(f'input_ids: expected [batch, seq] token ids, got shape {tokens.shape}')
    vocab = self.model.config.vocab_size
    if tokens.min() < 0 or tokens.max() >= vocab:
      raise UsageError(f'input_ids: ids must lie in [0, {vocab}); got {tokens.min()}..{tokens.max()}')
    graphdef, state = nnx.split(self.model)
    return np.asarray(_logits(graphdef, state, jnp.asarray(tokens), jnp.int32(self._exit(exit_layer))))

  def generate(self, prompts, *, strategy: str = 'autoregressive', exit_layer: int | None = None,
               num_speculations: int = 4, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, **options) -> GenerateResult:
    """Generates for a list of strings (needs the tokenizer) or of token-id lists (ragged): see
    layerskip_jax.inference.generate. Returns .tokens, .text (with a tokenizer) and .stats."""
    if self._layer_params is None and uses_unstacked_layers():
      self._layer_params = self.model.unstacked_layers()  # made once (a copy of the layer weights)
    return generate(self.model, prompts, tokenizer=self.tokenizer, strategy=strategy, exit_layer=exit_layer,
                    num_speculations=num_speculations, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_k=top_k, top_p=top_p, seed=seed, layer_params=self._layer_params, **options)


def load(path: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None) -> LoadedModel:
  """A model from a checkpoint directory (DIR or DIR/checkpoints/<step>), with its tokenizer if it has one."""
  config, model, ckpt = checkpoint_dir.restore_model(path, mesh)
  tokenizer = tokenizer_lib.load(ckpt.tokenizer_path) if ckpt.tokenizer_path else None
  return LoadedModel(config=config, model=model, tokenizer=tokenizer, checkpoint=ckpt)

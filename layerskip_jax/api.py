"""The Python entry point for users and notebooks.

    from layerskip_jax import api
    lm = api.load('runs/tiny')                       # a training workdir or a converted checkpoint
    logits = lm.logits([[1, 15, 27]], exit_layer=4)  # g(x_4): [batch, seq, vocab], float32
    result = lm.generate(['def parse('], strategy='self_speculative', exit_layer=4, num_speculations=4)
    result = lm.generate(['def parse('], strategy='self_speculative', exit_layer='auto', num_speculations='auto')
    result.stats['auto']                             # E and d chosen by a calibration on the prompts, and why

`inspect` reads what a checkpoint says about its model (config, tokenizer) without the weights, in milliseconds;
commands check their flags against it first, so a bad value fails before the minutes a large model takes to load
rather than after them. `load` is `inspect(...).load()`.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import config_dict

from layerskip_jax import checkpoint_dir
from layerskip_jax.data import tokenizer as tokenizer_lib
from layerskip_jax.errors import UsageError
from layerskip_jax.inference import calibrate
from layerskip_jax.inference.cache import cache_length, check_length
from layerskip_jax.inference.generate import GenerateResult, check_request, encode_prompts, generate
from layerskip_jax.inference.layout import DecodeWeights, decode_weights, wants_unstacked
from layerskip_jax.model import ModelConfig, Transformer


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens, exit_layer):
  return nnx.merge(graphdef, state)(tokens, exit_layer=exit_layer)


@dataclasses.dataclass
class LoadedModel:
  config: config_dict.ConfigDict
  model: Transformer
  tokenizer: tokenizer_lib.Tokenizer | None
  checkpoint: checkpoint_dir.CheckpointDir
  _unstacked: DecodeWeights | None = dataclasses.field(default=None, repr=False)  # the CPU decode layout, made once

  @property
  def decode_model(self) -> Transformer:
    """The model the decoder runs in the backend's default layout (inference/layout.py): on a CPU, the unstacked
    layout, a bf16 model's float32 copy (made once, shared with generate); elsewhere the model itself."""
    return self._unstacked_weights().model if wants_unstacked() else self.model

  def _unstacked_weights(self) -> DecodeWeights:
    if self._unstacked is None:  # made once: float32 copies of the layer weights
      self._unstacked = decode_weights(self.model, unstack=True)
    return self._unstacked

  @property
  def num_layers(self) -> int:
    return self.model.config.num_hidden_layers

  def _exit(self, exit_layer: int | None) -> int:
    if exit_layer is None:
      return self.num_layers
    if not 1 <= exit_layer <= self.num_layers:
      raise UsageError(f'exit_layer={exit_layer}: must be in 1..{self.num_layers} (E counts the layers run)')
    return exit_layer

  def logits(
    self, input_ids: Sequence[Sequence[int]] | np.ndarray | jax.Array, exit_layer: int | None = None
  ) -> np.ndarray:
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

  def generate(
    self,
    prompts,
    *,
    strategy: str = 'autoregressive',
    exit_layer: int | str | None = None,
    num_speculations: int | str = 4,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    calibration_log: Callable[[str], None] | None = None,
    **options,
  ) -> GenerateResult:
    """Generates for a list of strings (needs the tokenizer) or of token-id lists (ragged): see
    layerskip_jax.inference.generate. Returns .tokens, .text (with a tokenizer) and .stats.

    exit_layer='auto' and/or num_speculations='auto' (strategy='self_speculative'): E and d are chosen by a short
    calibration on these prompts (inference/calibrate.py: seconds; calibration_log receives its progress line and
    the choice's reason, e.g. print), then used; stats['auto'] says what was chosen and why. An integer for one of
    them fixes it. The calibration is greedy (with sampling its choice is an estimate), and runs on every call: for
    repeated calls choose once with calibrate.choose(lm, prompts) and pass its exit_layer and num_speculations."""
    for name, value in (('exit_layer', exit_layer), ('num_speculations', num_speculations)):
      if isinstance(value, str) and value != 'auto':
        raise UsageError(f'{name}={value!r}: must be an integer or \'auto\'')
    if exit_layer == 'auto' or num_speculations == 'auto':
      return self._generate_auto(
        prompts,
        strategy=strategy,
        exit_layer=exit_layer,
        num_speculations=num_speculations,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        log=calibration_log,
        **options,
      )
    model = self.model
    if wants_unstacked(options.get('unstack_layers')) and options.get('layer_params') is None:
      model = self._unstacked_weights().model
      options['layer_params'] = self._unstacked_weights().layer_params
    return generate(
      model,
      prompts,
      tokenizer=self.tokenizer,
      strategy=strategy,
      exit_layer=exit_layer,
      num_speculations=num_speculations,
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      seed=seed,
      **options,
    )

  def _generate_auto(
    self,
    prompts,
    *,
    strategy: str,
    exit_layer: int | str | None,
    num_speculations: int | str,
    max_new_tokens: int,
    log,
    **request,
  ) -> GenerateResult:
    """generate() with E and/or d chosen by calibrate.choose on the request's own prompts (greedy calibration,
    min(max_new_tokens, 32) tokens, the request's batch), then the request run with the choice."""
    auto = 'exit_layer' if exit_layer == 'auto' else 'num_speculations'
    if strategy != 'self_speculative':
      raise UsageError(
        f'{auto}=auto: chooses E and d for strategy=\'self_speculative\', not {strategy!r}; give an '
        'integer (or use self_speculative)'
      )
    calibrate.check_auto(self.num_layers, auto)
    # The request's other values are checked first (with stand-ins for the auto ones): a bad top_p fails at once.
    stand_in = dict(
      exit_layer=1 if exit_layer == 'auto' else exit_layer,
      num_speculations=1 if num_speculations == 'auto' else num_speculations,
    )
    if request.get('max_speculations') is not None:
      raise UsageError(
        f'max_speculations={request["max_speculations"]!r}: a d bucket is for a given d, not for '
        f'{auto}=auto (which runs each d it tries in its own program); leave it out'
      )
    check_request(
      self.model.config,
      strategy=strategy,
      **stand_in,
      temperature=request['temperature'],
      top_k=request['top_k'],
      top_p=request['top_p'],
      confidence_threshold=request.get('confidence_threshold', 0.0),
    )
    rows = encode_prompts(prompts, self.tokenizer)
    config = self.model.config
    width = max(map(len, rows))
    check_length(config, width, max_new_tokens, stand_in['num_speculations'])
    if max_new_tokens < 2:
      raise UsageError(
        f'max_new_tokens={max_new_tokens}: {auto}=auto calibrates on at least 2 new tokens; give an '
        f'integer {auto} for fewer'
      )
    speculations = (
      [num_speculations]
      if num_speculations != 'auto'
      else [
        d
        for d in calibrate.DEFAULT_SPECULATIONS
        if cache_length(width, max_new_tokens, d) <= config.max_position_embeddings
      ]
    )
    choice = calibrate.choose(
      self,
      rows,
      max_new_tokens=min(max_new_tokens, 32),
      exit_layers=None if exit_layer == 'auto' else [exit_layer],
      num_speculations=speculations,
      batch_size=len(rows),
      log=log,
    )
    if choice.confidence_threshold:
      request['confidence_threshold'] = choice.confidence_threshold
    if choice.adapt_threshold:
      request['adapt_threshold'] = True
    result = self.generate(
      rows,
      strategy=strategy,
      exit_layer=choice.exit_layer,
      num_speculations=choice.num_speculations,
      max_new_tokens=max_new_tokens,
      **request,
    )
    result.stats['auto'] = choice.as_stats()
    return result


_TOKEN_IDS = re.compile(r'-?[0-9]+(?:\s+-?[0-9]+)*')


def token_ids(text: str) -> list[int] | None:
  """A prompt of whitespace-separated integers as token ids (interfaces.md: such a prompt is ids, never text);
  None for text."""
  stripped = text.strip()
  return [int(t) for t in stripped.split()] if _TOKEN_IDS.fullmatch(stripped) else None


def check_token_ids(where: str, ids: Sequence[int], vocab_size: int) -> None:
  """Raises UsageError `where: ...` naming the first id outside the model's vocabulary [0, vocab_size)."""
  bad = next((t for t in ids if not 0 <= t < vocab_size), None)
  if bad is not None:
    raise UsageError(
      f'{where}: token id {bad} is outside the model\'s vocabulary (0..{vocab_size - 1}); give ids in that range'
    )


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """A resolved checkpoint directory, its config and its tokenizer; the weights not read yet."""

  checkpoint: checkpoint_dir.CheckpointDir
  config: config_dict.ConfigDict
  tokenizer: tokenizer_lib.Tokenizer | None
  path: str  # as given, for messages
  flag: str  # the flag that gave it: --ckpt, --compare

  @property
  def model_config(self) -> ModelConfig:
    return ModelConfig.from_config(self.config.model)

  @property
  def num_layers(self) -> int:
    return self.config.model.num_hidden_layers

  @property
  def named(self) -> str:
    """'--ckpt=DIR', for messages."""
    return f'{self.flag}={self.path}'

  def prompt_ids(self, prompt: str, flag: str) -> list[int]:
    """A prompt given on the command line (`flag`) as token ids: a line of integers is ids, text is encoded with BOS
    (it needs the tokenizer); checked against the vocabulary and the positions. Errors name `flag`."""
    if not prompt.strip():
      raise UsageError(f'{flag}={prompt!r}: empty; give text (or space-separated token ids)')
    ids = token_ids(prompt)
    if ids is None:
      if self.tokenizer is None:
        raise UsageError(
          f'{flag}={prompt!r}: {self.named} has no tokenizer, so the prompt must be space-separated token ids'
        )
      ids = self.tokenizer.encode(prompt, add_bos=True)
    check_token_ids(f'{flag}={prompt!r}', ids, self.config.model.vocab_size)
    positions = self.config.model.max_position_embeddings
    if len(ids) > positions:
      raise UsageError(
        f'{flag}: {len(ids)} tokens, more than model.max_position_embeddings={positions} of {self.named}; shorten it'
      )
    return ids

  def load(self, mesh: jax.sharding.Mesh | None = None) -> LoadedModel:
    """Reads the weights (onto `mesh`, default device 0)."""
    config, model, ckpt = checkpoint_dir.restore_model(self.path, mesh, flag=self.flag)
    return LoadedModel(config=config, model=model, tokenizer=self.tokenizer, checkpoint=ckpt)


def inspect(path: str | pathlib.Path, flag: str = '--ckpt') -> CheckpointInfo:
  """The checkpoint directory (DIR or DIR/checkpoints/<step>) resolved, its config and tokenizer read; errors are one
  line naming `flag` (the flag the user gave it with)."""
  ckpt = checkpoint_dir.resolve(path, flag)
  config = ckpt.read_config(flag)
  try:
    tokenizer = tokenizer_lib.load(ckpt.tokenizer_path) if ckpt.tokenizer_path else None
  except UsageError as e:
    raise UsageError(f'{flag}={path}: {e}') from None
  return CheckpointInfo(checkpoint=ckpt, config=config, tokenizer=tokenizer, path=str(path), flag=flag)


def load(path: str | pathlib.Path, mesh: jax.sharding.Mesh | None = None, *, flag: str = '--ckpt') -> LoadedModel:
  """A model from a checkpoint directory (DIR or DIR/checkpoints/<step>), with its tokenizer if it has one. Errors
  name `flag`."""
  return inspect(path, flag).load(mesh)

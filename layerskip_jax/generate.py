"""python -m layerskip_jax.generate --ckpt DIR --prompt TEXT --strategy self_speculative --exit_layer E
    --num_speculations D [--max_new_tokens N --temperature T --top_k K --top_p P --seed S]

Prints the generated text (or ids, for a checkpoint without a tokenizer: give --prompt as space-separated ids) and a
one-line summary: tokens, tokens/s, acceptance rate.

--exit_layer auto and/or --num_speculations auto (self_speculative): E and d are chosen by a short calibration on
the prompt (inference/calibrate.py: seconds); two bracketed lines before the text say that it is calibrating, then
the choice and why; the text and the summary follow as without auto.

Every flag is checked against the checkpoint's config and tokenizer (api.inspect: milliseconds) before the weights
are read, by the same checks generate() makes (inference.generate.check_request, inference.cache.check_length),
with the flags' names: a 7B model takes a minute to load, and a typo in --top_p should not cost it.
"""

from __future__ import annotations

from absl import flags

from layerskip_jax import api, cli
from layerskip_jax.errors import UsageError
from layerskip_jax.inference import calibrate
from layerskip_jax.inference.cache import check_length
from layerskip_jax.inference.decode import STRATEGIES
from layerskip_jax.inference.generate import check_request


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags (defined only when it runs; tests define them on their own FlagValues)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('ckpt', None, 'checkpoint directory (DIR or DIR/checkpoints/<step>)', **fv)
  flags.DEFINE_string('prompt', None, 'the prompt text (or space-separated token ids)', **fv)
  flags.DEFINE_enum('strategy', 'self_speculative', STRATEGIES, 'decoding strategy', **fv)
  flags.DEFINE_string(
    'exit_layer',
    None,
    'E: layers run by the draft / early exit (default: L/2), or auto (chosen '
    'by a calibration on the prompt; self_speculative)',
    **fv,
  )
  flags.DEFINE_string('num_speculations', '4', 'd: drafts per self-speculative round, or auto', **fv)
  flags.DEFINE_integer(
    'max_speculations',
    None,
    'the d bucket: the compiled verify block holds this many drafts, shared by every d up to it (default: d itself)',
    **fv,
  )
  flags.DEFINE_float(
    'confidence_threshold',
    0.0,
    'stop drafting after a draft whose top probability at the early exit is below this (0 = off: always d drafts)',
    **fv,
  )
  flags.DEFINE_bool(
    'adapt_threshold',
    False,
    'adapt the threshold per row from the acceptance so far (starting at --confidence_threshold, or 0.4)',
    **fv,
  )
  flags.DEFINE_integer('max_new_tokens', 64, 'tokens to generate at most', **fv)
  flags.DEFINE_float('temperature', 0.0, '0 = greedy', **fv)
  flags.DEFINE_integer('top_k', 0, 'sample among the k most likely tokens (0 = all)', **fv)
  flags.DEFINE_float('top_p', 1.0, 'sample within the smallest set of this probability mass (1 = all)', **fv)
  flags.DEFINE_integer('seed', 0, 'sampling seed', **fv)


def integer_or_auto(flag: str, value: str | None) -> int | str | None:
  """A flag's value as an integer, or 'auto'; None stays None."""
  if value is None:
    return None
  if value.strip().lower() == 'auto':
    return 'auto'
  try:
    return int(value)
  except ValueError:
    raise UsageError(f'--{flag}={value}: must be an integer or auto') from None


def main(args: cli.Args, f: flags.FlagValues | None = None) -> None:
  f = flags.FLAGS if f is None else f
  if not f.ckpt or f.prompt is None:
    raise UsageError('--ckpt and --prompt are required')
  exit_layer = integer_or_auto('exit_layer', f.exit_layer)
  num_speculations = integer_or_auto('num_speculations', f.num_speculations)
  info = api.inspect(f.ckpt)
  if exit_layer is None and f.strategy != 'autoregressive':
    exit_layer = max(1, info.num_layers // 2)
  auto = [
    name for name, value in (('exit_layer', exit_layer), ('num_speculations', num_speculations)) if value == 'auto'
  ]
  if auto and f.strategy != 'self_speculative':
    raise UsageError(
      f'--{auto[0]}=auto: chooses E and d for --strategy=self_speculative, not {f.strategy}; give an '
      f'integer --{auto[0]}'
    )
  if auto:
    calibrate.check_auto(info.num_layers, auto[0], prefix='--')
    if f.max_speculations is not None:
      raise UsageError(
        f'--max_speculations={f.max_speculations}: a d bucket is for a given d, not for '
        f'--{auto[0]}=auto (which runs each d it tries in its own program); leave it out'
      )
  # auto values are checked with stand-ins (the smallest E and d): every other flag is checked before the weights
  stand_in = dict(
    exit_layer=1 if exit_layer == 'auto' else exit_layer,
    num_speculations=1 if num_speculations == 'auto' else num_speculations,
  )
  sampling = dict(temperature=f.temperature, top_k=f.top_k, top_p=f.top_p)
  drafting = dict(
    max_speculations=f.max_speculations, confidence_threshold=f.confidence_threshold, adapt_threshold=f.adapt_threshold
  )
  _, d_max = check_request(
    info.model_config,
    strategy=f.strategy,
    **stand_in,
    **sampling,
    max_speculations=None if auto else f.max_speculations,
    confidence_threshold=f.confidence_threshold,
    prefix='--',
  )
  prompt = info.prompt_ids(f.prompt, '--prompt')
  check_length(info.model_config, len(prompt), f.max_new_tokens, d_max, prefix='--')
  if auto and f.max_new_tokens < 2:
    raise UsageError(
      f'--max_new_tokens={f.max_new_tokens}: --{auto[0]}=auto calibrates on at least 2 new tokens; '
      f'give an integer --{auto[0]} for fewer'
    )
  lm = info.load()
  result = lm.generate(
    [prompt],
    strategy=f.strategy,
    exit_layer=exit_layer,
    num_speculations=num_speculations,
    **sampling,
    **drafting,
    max_new_tokens=f.max_new_tokens,
    seed=f.seed,
    **(dict(calibration_log=lambda line: print(f'[{line}]', flush=True)) if auto else {}),
  )
  print(result.text[0] if result.text is not None else ' '.join(map(str, result.tokens[0])))
  s = result.stats
  rate = f', acceptance {s["acceptance_rate"]:.1%}' if s['acceptance_rate'] is not None else ''
  print(
    f'[{s["new_tokens"]} tokens, {s["new_tokens"] / max(s["decode_seconds"], 1e-9):.1f} tokens/s decode '
    f'(incl. compile), prefill {s["prefill_seconds"] * 1e3:.0f} ms{rate}]'
  )


if __name__ == '__main__':
  define_flags()
  cli.run(main)

"""python -m layerskip_jax.generate --ckpt DIR --prompt TEXT --strategy self_speculative --exit_layer E
    --num_speculations D [--max_new_tokens N --temperature T --top_k K --top_p P --seed S]

Prints the generated text (or ids, for a checkpoint without a tokenizer: give --prompt as space-separated ids) and a
one-line summary: tokens, tokens/s, acceptance rate.

Every flag is checked against the checkpoint's config and tokenizer (api.inspect: milliseconds) before the weights
are read, by the same checks generate() makes (inference.generate.check_request, inference.cache.check_length),
with the flags' names: a 7B model takes a minute to load, and a typo in --top_p should not cost it.
"""

from __future__ import annotations

from absl import flags

from layerskip_jax import api, cli
from layerskip_jax.errors import UsageError
from layerskip_jax.inference.cache import check_length
from layerskip_jax.inference.decode import STRATEGIES
from layerskip_jax.inference.generate import check_request


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command line's flags (defined only when it runs; tests define them on their own FlagValues)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string('ckpt', None, 'checkpoint directory (DIR or DIR/checkpoints/<step>)', **fv)
  flags.DEFINE_string('prompt', None, 'the prompt text (or space-separated token ids)', **fv)
  flags.DEFINE_enum('strategy', 'self_speculative', STRATEGIES, 'decoding strategy', **fv)
  flags.DEFINE_integer('exit_layer', None, 'E: layers run by the draft / early exit (default: L/2)', **fv)
  flags.DEFINE_integer('num_speculations', 4, 'd: drafts per self-speculative round', **fv)
  flags.DEFINE_integer('max_new_tokens', 64, 'tokens to generate at most', **fv)
  flags.DEFINE_float('temperature', 0.0, '0 = greedy', **fv)
  flags.DEFINE_integer('top_k', 0, 'sample among the k most likely tokens (0 = all)', **fv)
  flags.DEFINE_float('top_p', 1.0, 'sample within the smallest set of this probability mass (1 = all)', **fv)
  flags.DEFINE_integer('seed', 0, 'sampling seed', **fv)


def main(args: cli.Args, f: flags.FlagValues | None = None) -> None:
  f = flags.FLAGS if f is None else f
  if not f.ckpt or f.prompt is None:
    raise UsageError('--ckpt and --prompt are required')
  info = api.inspect(f.ckpt)
  exit_layer = f.exit_layer
  if exit_layer is None and f.strategy != 'autoregressive':
    exit_layer = max(1, info.num_layers // 2)
  options = dict(strategy=f.strategy, exit_layer=exit_layer, num_speculations=f.num_speculations,
                 temperature=f.temperature, top_k=f.top_k, top_p=f.top_p)
  _, d_max = check_request(info.model_config, **options, prefix='--')
  prompt = info.prompt_ids(f.prompt, '--prompt')
  check_length(info.model_config, len(prompt), f.max_new_tokens, d_max, prefix='--')
  lm = info.load()
  result = lm.generate([prompt], **options, max_new_tokens=f.max_new_tokens, seed=f.seed)
  print(result.text[0] if result.text is not None else ' '.join(map(str, result.tokens[0])))
  s = result.stats
  rate = f', acceptance {s["acceptance_rate"]:.1%}' if s['acceptance_rate'] is not None else ''
  print(f'[{s["new_tokens"]} tokens, {s["new_tokens"] / max(s["decode_seconds"], 1e-9):.1f} tokens/s decode '
        f'(incl. compile), prefill {s["prefill_seconds"] * 1e3:.0f} ms{rate}]')


if __name__ == '__main__':
  define_flags()
  cli.run(main)

"""python -m layerskip_jax.generate --ckpt DIR --prompt TEXT --strategy self_speculative --exit_layer E
    --num_speculations D [--max_new_tokens N --temperature T --top_k K --top_p P --seed S]

Prints the generated text (or ids, for a checkpoint without a tokenizer: give --prompt as space-separated ids) and a
one-line summary: tokens, tokens/s, acceptance rate.
"""

from absl import flags

from layerskip_jax import api, cli
from layerskip_jax.errors import UsageError
from layerskip_jax.inference.decode import STRATEGIES

flags.DEFINE_string('ckpt', None, 'checkpoint directory (DIR or DIR/checkpoints/<step>)')
flags.DEFINE_string('prompt', None, 'the prompt text (or space-separated token ids)')
flags.DEFINE_enum('strategy', 'self_speculative', STRATEGIES, 'decoding strategy')
flags.DEFINE_integer('exit_layer', None, 'E: layers run by the draft / early exit (default: L/2)')
flags.DEFINE_integer('num_speculations', 4, 'd: drafts per self-speculative round')
flags.DEFINE_integer('max_new_tokens', 64, 'tokens to generate at most')
flags.DEFINE_float('temperature', 0.0, '0 = greedy')
flags.DEFINE_integer('top_k', 0, 'sample among the k most likely tokens (0 = all)')
flags.DEFINE_float('top_p', 1.0, 'sample within the smallest set of this probability mass (1 = all)')
flags.DEFINE_integer('seed', 0, 'sampling seed')


def main(args: cli.Args) -> None:
  f = flags.FLAGS
  if not f.ckpt or f.prompt is None:
    raise UsageError('--ckpt and --prompt are required')
  lm = api.load(f.ckpt)
  if lm.tokenizer is None or f.prompt.replace(' ', '').isdigit():
    try:
      prompt = [int(t) for t in f.prompt.split()]
    except ValueError:
      raise UsageError(f'--prompt={f.prompt!r}: this checkpoint has no tokenizer; give space-separated token '
                       'ids') from None
  else:
    prompt = f.prompt
  exit_layer = f.exit_layer
  if exit_layer is None and f.strategy != 'autoregressive':
    exit_layer = max(1, lm.num_layers // 2)
  result = lm.generate([prompt], strategy=f.strategy, exit_layer=exit_layer, num_speculations=f.num_speculations,
                       max_new_tokens=f.max_new_tokens, temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
                       seed=f.seed)
  print(result.text[0] if result.text is not None else ' '.join(map(str, result.tokens[0])))
  s = result.stats
  rate = f', acceptance {s["acceptance_rate"]:.1%}' if s['acceptance_rate'] is not None else ''
  print(f'[{s["new_tokens"]} tokens, {s["new_tokens"] / max(s["decode_seconds"], 1e-9):.1f} tokens/s decode '
        f'(incl. compile), prefill {s["prefill_seconds"] * 1e3:.0f} ms{rate}]')


if __name__ == '__main__':
  cli.run(main)

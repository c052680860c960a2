"""Validates a config and prints it resolved, with the model's parameter count (no memory is allocated).

    python -m layerskip_jax.print_config --config configs/llama3_8b.py [--config.section.key=value ...]

A bad config is one line naming the key, with exit status 2.
"""

from absl import flags

from layerskip_jax import cli
from layerskip_jax import config as config_lib
from layerskip_jax.model import ModelConfig, count_params

flags.DEFINE_string('config', 'tiny', 'config file, or the name of a preset in configs/')


def main(args: cli.Args) -> None:
  if len(args.positional) > 1:
    raise config_lib.ConfigError(
      f'unexpected argument {args.positional[1]!r}; overrides look like --config.section.key=value'
    )
  config = config_lib.load(flags.FLAGS.config, args.config_overrides)
  print(config_lib.to_json(config))
  print(f'parameters: {count_params(ModelConfig.from_config(config.model)):,}')


if __name__ == '__main__':
  cli.run(main)

"""What every command line shares: absl flag parsing with `--config.key=value` overrides, and errors as one line.

    def main(args: cli.Args) -> None: ...
    if __name__ == '__main__':
      cli.run(main)

Bad usage or input (UsageError, ConfigError, absl flag errors) prints `error: ...` on stderr and exits 2; any other
failure prints one line and exits 1 (LAYERSKIP_DEBUG=1 re-raises it with the traceback).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

from absl import app, flags, logging

from layerskip_jax.config import load as load_config, split_override_args
from layerskip_jax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Args:
  positional: list[str]  # arguments absl left over (argv[0] first)
  config_overrides: list[str]  # the --config.key=value arguments, in order


def _one_line(e: BaseException) -> str:
  return ' '.join(str(e).split())


def fail(message: str, status: int = 2) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def _parse(argv: list[str]) -> Args:
  rest, overrides = split_override_args(argv)
  try:
    positional = flags.FLAGS(rest)
  except flags.Error as e:
    fail(f'{_one_line(e)} (see --help)')
  return Args(positional=positional, config_overrides=overrides)


def run(main: Callable[[Args], int | None]) -> None:
  """Runs `main` like absl.app.run, with our flag parsing and error reporting.

  LAYERSKIP_PARSE_ONLY=1 parses the command line (flags, and --config.k=v overrides against --config where the
  command has one) and exits 0 without running it: tests check the documented command lines with it."""
  def guarded(args: Args) -> int | None:
    if not flags.FLAGS['verbosity'].present:  # Orbax and JAX log every step at INFO; keep the console readable
      logging.set_verbosity(logging.WARNING)
    try:
      if os.environ.get('LAYERSKIP_PARSE_ONLY'):
        if args.config_overrides and 'config' in flags.FLAGS:
          load_config(flags.FLAGS.config, args.config_overrides)
        return 0
      return main(args)
    except UsageError as e:
      fail(_one_line(e), 2)
    except KeyboardInterrupt:
      fail('interrupted', 130)
    except Exception as e:  # a failure during the run: one line, unless debugging
      if os.environ.get('LAYERSKIP_DEBUG'):
        raise
      fail(f'{type(e).__name__}: {_one_line(e)} (set LAYERSKIP_DEBUG=1 for the traceback)', 1)
  app.run(guarded, flags_parser=_parse)

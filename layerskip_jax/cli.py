"""What every command line shares: absl flag parsing with `--config.key=value` overrides, and errors as one line.

    def main(args: cli.Args) -> None: ...
    if __name__ == '__main__':
      cli.run(main)

Bad usage or input (UsageError, ConfigError, absl flag errors) prints `error: ...` on stderr and exits 2; any other
failure prints one line and exits 1 (an OSError: the path and the reason, e.g. `No space left on device (ENOSPC)`;
LAYERSKIP_DEBUG=1 re-raises it with the traceback).
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import os
import sys
from collections.abc import Callable

from absl import app, flags, logging

from layerskip_jax.config import load as load_config, split_override_args
from layerskip_jax.errors import UsageError, one_line
from layerskip_jax.outputs import describe_os_error


@dataclasses.dataclass(frozen=True)
class Args:
  positional: list[str]  # arguments absl left over (argv[0] first)
  config_overrides: list[str]  # the --config.key=value arguments, in order


class _QuietOrbaxErrors(std_logging.Filter):
  """Orbax logs a failed read or write from each of its threads, with tracebacks; tensorstore's callbacks print
  'Event loop is closed' tracebacks after the failed operation's event loop is gone, and its abandoned coroutines
  and tasks print their errors when collected (asyncio's 'Task exception was never retrieved'): hundreds of lines
  for one full disk or one truncated file. The failure also reaches the command as an exception, reported as one
  line (a CheckpointWriteError, a UsageError naming the damaged checkpoint), so these copies are dropped;
  LAYERSKIP_DEBUG=1 keeps them."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno < std_logging.ERROR:
      return True
    if record.name == 'asyncio':  # 'Task exception was never retrieved': only Orbax runs event loops here
      return False
    return not (record.exc_info and f'{os.sep}orbax{os.sep}' in record.pathname)  # re-raised, one line

  @staticmethod
  def unraisablehook(previous):
    """Drops what a failed Orbax operation leaves behind: tensorstore callbacks on its closed event loop, and its
    abandoned coroutines' errors when they are collected (after the one line was printed)."""

    def hook(unraisable):
      code = getattr(unraisable.object, 'cr_code', None)
      closed_loop = unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == 'Event loop is closed'
      if not (closed_loop or (code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename)):
        previous(unraisable)

    return hook


def _quiet_orbax_errors() -> None:
  installed = any(isinstance(f, _QuietOrbaxErrors) for f in std_logging.getLogger().filters)
  if installed or os.environ.get('LAYERSKIP_DEBUG'):
    return
  quiet = _QuietOrbaxErrors()
  for logger in (std_logging.getLogger(), std_logging.getLogger('absl'), std_logging.getLogger('asyncio')):
    logger.addFilter(quiet)
    for handler in logger.handlers:
      handler.addFilter(quiet)
  sys.unraisablehook = _QuietOrbaxErrors.unraisablehook(sys.unraisablehook)


def fail(message: str, status: int = 2) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def _parse(argv: list[str]) -> Args:
  rest, overrides = split_override_args(argv)
  try:
    positional = flags.FLAGS(rest)
  except flags.Error as e:
    fail(f'{one_line(e)} (see --help)')
  return Args(positional=positional, config_overrides=overrides)


def run(main: Callable[[Args], int | None]) -> None:
  """Runs `main` like absl.app.run, with our flag parsing and error reporting.

  LAYERSKIP_PARSE_ONLY=1 parses the command line (flags, and --config.k=v overrides against --config where the
  command has one) and exits 0 without running it: tests check the documented command lines with it."""

  def guarded(args: Args) -> int | None:
    if not flags.FLAGS['verbosity'].present:  # Orbax and JAX log every step at INFO; keep the console readable
      logging.set_verbosity(logging.WARNING)
    _quiet_orbax_errors()
    try:
      if os.environ.get('LAYERSKIP_PARSE_ONLY'):
        if 'config' in flags.FLAGS:
          load_config(flags.FLAGS.config, args.config_overrides)
        return 0
      return main(args)
    except UsageError as e:
      fail(one_line(e), 2)
    except KeyboardInterrupt:
      fail('interrupted', 130)
    except Exception as e:  # a failure during the run: one line, unless debugging
      if os.environ.get('LAYERSKIP_DEBUG'):
        raise
      if isinstance(e, OSError) and e.errno:  # a full disk, a quota, a lost mount: the path and the reason
        where = f'{e.filename}: ' if e.filename else ''
        fail(f'{where}{describe_os_error(e)} (set LAYERSKIP_DEBUG=1 for the traceback)', 1)
      fail(f'{type(e).__name__}: {one_line(e)} (set LAYERSKIP_DEBUG=1 for the traceback)', 1)

  app.run(guarded, flags_parser=_parse)

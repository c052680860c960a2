"""python -m layerskip_jax.train --config configs/tiny.py --workdir runs/tiny [--dry_run] [--config.section.key=v ...]

Pretrains (or, with --config.train.init_from=CKPT, continues pretraining / fine-tunes) and resumes from the latest
checkpoint in --workdir. Multi-process: SLURM and Cloud TPU environments are detected; elsewhere pass
--coordinator_address host:port --num_processes N --process_id I.

--dry_run makes every check the run makes before it writes anything (the config, the workdir it would resume,
train.init_from), prints what the run would do and exits (0, or 2 with the error): the cluster launchers run it
before submitting, requeueing or stopping anything. It needs no accelerator and writes nothing.
"""

import sys

from absl import flags

from layerskip_jax import cli
from layerskip_jax import config as config_lib
from layerskip_jax.errors import UsageError

flags.DEFINE_string('config', 'tiny', 'config file, or the name of a preset in configs/')
flags.DEFINE_string('workdir', None, 'run directory: config, tokenizer, checkpoints, metrics (resumed if present)')
flags.DEFINE_string('coordinator_address', None, 'multi-process: host:port of process 0')
flags.DEFINE_integer('num_processes', None, 'multi-process: number of processes')
flags.DEFINE_integer('process_id', None, 'multi-process: this process (0..num_processes-1)')
flags.DEFINE_bool(
  'dry_run',
  False,
  'check the config, the workdir and train.init_from as a run would, print what it would do, write nothing and exit',
)


def main(args: cli.Args) -> int:
  f = flags.FLAGS
  if len(args.positional) > 1:
    raise UsageError(f'unexpected argument {args.positional[1]!r}; overrides look like --config.section.key=value')
  if not f.workdir:
    raise UsageError('--workdir is required (the run directory; an existing one is resumed)')
  config = config_lib.load(f.config, args.config_overrides)  # validated before anything compiles
  from layerskip_jax.train import distributed, trainer

  if f.dry_run:
    print(f'ok: {trainer.validate(config, f.workdir)}')
    return 0
  distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
  import jax
  from layerskip_jax.model.attention import resolve_impl

  try:  # a kernel on the wrong backend (cudnn on a TPU, splash on a GPU): refused before anything is written
    resolve_impl(config.model.attention_impl, jax.default_backend(), config.model.dtype)
  except ValueError as e:
    raise UsageError(str(e)) from None
  from layerskip_jax.train.checkpointing import CheckpointWriteError

  try:
    trainer.train(config, f.workdir)
  except (trainer.NonFiniteLoss, CheckpointWriteError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  cli.run(main)

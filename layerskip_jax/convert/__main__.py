"""python -m layerskip_jax.convert import_hf --hf_dir HF --out DIR [--overwrite] [--param_dtype bfloat16]
python -m layerskip_jax.convert export_hf --ckpt DIR --out HF [--overwrite] [--max_shard_size 5GB]
"""

from absl import flags

from layerskip_jax import cli
from layerskip_jax.convert.hf import export_hf, import_hf
from layerskip_jax.errors import UsageError

flags.DEFINE_string('hf_dir', None, 'import_hf: a Hugging Face Llama directory (config.json + safetensors)')
flags.DEFINE_string('ckpt', None, 'export_hf: a checkpoint directory (DIR or DIR/checkpoints/<step>)')
flags.DEFINE_string('out', None, 'the directory to write (must not exist unless --overwrite)')
flags.DEFINE_bool('overwrite', False, 'replace --out if it exists')
flags.DEFINE_string('param_dtype', None, 'import_hf: parameter dtype (default: the checkpoint dtype)')
flags.DEFINE_string('max_shard_size', '5GB', 'export_hf: largest safetensors shard')

COMMANDS = ('import_hf', 'export_hf')


def main(args: cli.Args) -> None:
  f = flags.FLAGS
  if len(args.positional) != 2 or args.positional[1] not in COMMANDS:
    given = ' '.join(args.positional[1:]) or 'nothing'
    raise UsageError(f'expected one command, import_hf or export_hf; got {given}')
  if args.config_overrides:
    raise UsageError(f'{args.config_overrides[0]}: convert takes no config overrides')
  if not f.out:
    raise UsageError('--out is required')
  if args.positional[1] == 'import_hf':
    if not f.hf_dir:
      raise UsageError('import_hf needs --hf_dir')
    out = import_hf(f.hf_dir, f.out, overwrite=f.overwrite, param_dtype=f.param_dtype)
  else:
    if not f.ckpt:
      raise UsageError('export_hf needs --ckpt')
    out = export_hf(f.ckpt, f.out, overwrite=f.overwrite, max_shard_size=f.max_shard_size)
  print(f'wrote {out}')


if __name__ == '__main__':
  cli.run(main)

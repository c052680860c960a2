"""Every command of the README's shell blocks is checked: `python -m layerskip_jax.*` command lines parse (flags and
--config overrides, with LAYERSKIP_PARSE_ONLY=1), launch scripts run with --dry-run, the test command is .ci/run's.
What they do is tested elsewhere: launch/local.sh --smoke runs train/evaluate/benchmark/report end to end, and
each module has its own command-line test."""

import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

README = ROOT / 'README.md'
EXTERNAL = {'gcloud', 'huggingface-cli', 'cd', 'source'}  # other tools' commands, shown for context


def _commands() -> list[list[str]]:
  text = README.read_text()
  blocks = re.findall(r'^[ \t]*```bash\n(.*?)^[ \t]*```', text, flags=re.S | re.M)
  commands = []
  for block in blocks:
    joined = re.sub(r'\\\n\s*', ' ', block)
    for line in joined.splitlines():
      words = shlex.split(line, comments=True)
      while words:  # `a && b`: both
        cut = words.index('&&') if '&&' in words else len(words)
        commands.append(words[:cut])
        words = words[cut + 1 :]
  return commands


COMMANDS = _commands()


def _id(command: list[str]) -> str:
  return ' '.join(command)[:60]


CI_COMMANDS = 4  # after the main command: install, the format check, the lint check, the tests


def test_the_readme_opens_with_the_main_command_and_the_ci_command():
  ci = (ROOT / '.ci' / 'run').read_text().strip().splitlines()[-1]
  assert COMMANDS[0] == ['bash', 'launch/local.sh']
  readme_ci = ' && '.join(' '.join(c) for c in COMMANDS[1 : 1 + CI_COMMANDS])
  assert readme_ci in ci.replace('pip install -q', 'pip install')
  assert COMMANDS[2 : 1 + CI_COMMANDS] == [
    ['ruff', 'format', '--check', '.'],
    ['ruff', 'check', '.'],
    ['python', '-m', 'pytest', '-q'],
  ]


@pytest.mark.parametrize('command', COMMANDS, ids=_id)
def test_readme_command(command, tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  if command[0] in EXTERNAL:
    return
  if command[:2] == ['pip', 'install'] or command[0] == 'ruff' or command[:4] == ['python', '-m', 'pytest', '-q']:
    return  # the CI command: checked above, run by CI itself
  if command[0] == 'sbatch':  # the script's own --dry-run; sbatch's options are sbatch's
    script = next(i for i, w in enumerate(command) if w.endswith('.sbatch'))
    command = ['bash'] + command[script:]
  elif command[0].startswith('launch/'):
    command = ['bash'] + command
  if command[0] == 'bash':
    result = subprocess.run([*command, '--dry-run'], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'python' in result.stdout and 'layerskip_jax' in result.stdout
    return
  assert command[:3] in (['python', '-m', command[2]],) and command[2].startswith('layerskip_jax.'), command
  result = subprocess.run(
    [sys.executable, *command[1:]],
    env={**env, "LAYERSKIP_PARSE_ONLY": "1"},
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr

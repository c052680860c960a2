#!/usr/bin/env bash
# The end-to-end local run: install, pretrain the tiny model with the LayerSkip recipe on the Python standard
# library (every machine has it: no download), evaluate every exit, benchmark generation, print the results.
#
#   bash launch/local.sh                  # the full run: about 10 minutes on 2 CPU cores
#   bash launch/local.sh --smoke          # the same path with a few steps (a minute or two; CI runs this)
#   bash launch/local.sh --with-baseline  # also train the baseline (no layer dropout, last exit only), same steps
#   bash launch/local.sh --with-baseline=time  # the baseline trained as long (wall clock) as the LayerSkip run
#   bash launch/local.sh --dry-run        # print the commands, run nothing
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash launch/local.sh [options] [--config.KEY=VALUE ...]

Creates a virtual environment, installs layerskip_jax, pretrains the tiny preset with the LayerSkip recipe
(layer dropout + early-exit loss) on the embedded python_stdlib corpus, evaluates held-out perplexity at every
exit, benchmarks autoregressive vs self-speculative decoding, and prints the per-exit table and the speed-up.
A finished run is not trained again: the trainer resumes from WORKDIR (delete it to start over).

Options:
  --workdir DIR     run directory (default: runs/tiny, or runs/tiny_smoke with --smoke); the baseline goes to
                    DIR_baseline (the notebooks find runs/tiny and runs/tiny_baseline)
  --smoke           a few steps and a small benchmark: checks the whole path in a minute or two
  --with-baseline[=steps|time]
                    also train the baseline (p_max=0, e_scale=0) and compare the two: for the same steps (to
                    DIR_baseline), or for the same wall-clock time (to DIR_baseline_time: the steps come from
                    the two train steps timed side by side first, python -m layerskip_jax.train.bench)
  --venv DIR        virtual environment to create and use (default: .venv)
  --no-venv         use $PYTHON (default python3) as it is: its packages must already be installed
  --dry-run         print the commands this would run, and run nothing
  -h, --help        this text
Any --config.KEY=VALUE is passed to the trainer (e.g. --config.train.steps=600).
EOF
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
workdir=""
smoke=0
baseline=
venv=".venv"
use_venv=1
dry_run=0
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workdir) [[ $# -ge 2 ]] || { echo "local.sh: --workdir needs a directory" >&2; exit 2; }; workdir="$2"; shift 2 ;;
    --workdir=*) workdir="${1#*=}"; shift ;;
    --venv) [[ $# -ge 2 ]] || { echo "local.sh: --venv needs a directory" >&2; exit 2; }; venv="$2"; shift 2 ;;
    --venv=*) venv="${1#*=}"; shift ;;
    --smoke) smoke=1; shift ;;
    --with-baseline|--with-baseline=steps) baseline='steps'; shift ;;
    --with-baseline=time) baseline='time'; shift ;;
    --with-baseline=*) echo "local.sh: --with-baseline=${1#*=}: expected steps or time" >&2; exit 2 ;;
    --no-venv) use_venv=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --config.*=*) overrides+=("$1"); shift ;;
    *) echo "local.sh: unknown option '$1' (see bash launch/local.sh --help)" >&2; exit 2 ;;
  esac
done

# Print a command, then run it (unless --dry-run).
run() {
  local arg
  printf '+'
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./=,:+@-]+$ ]]; then printf ' %s' "$arg"; else printf ' %q' "$arg"; fi
  done
  printf '\n'
  if [[ $dry_run -eq 0 ]]; then
    "$@"
  fi
}

cd "$here"
if [[ -z "$workdir" ]]; then
  workdir="runs/tiny"
  if [[ $smoke -eq 1 ]]; then workdir="runs/tiny_smoke"; fi
fi
python="${PYTHON:-python3}"
if [[ $use_venv -eq 1 ]]; then
  if [[ ! -x "$venv/bin/python" ]]; then
    run "$python" -m venv "$venv"
  fi
  python="$venv/bin/python"
  run "$python" -m pip install --quiet --upgrade pip
  run "$python" -m pip install --quiet -r requirements.txt
  run "$python" -m pip install --quiet --no-deps -e .
fi

if [[ $smoke -eq 1 ]]; then
  # The same path, small: a few steps of short sequences, a short evaluation and a two-setting benchmark.
  train=(--config.train.steps=6 --config.train.batch_size=4 --config.train.seq_len=64 --config.train.eval_every=0
         --config.train.eval_batches=1 --config.checkpoint.every_steps=6 --config.logging.progress_bar=False)
  evaluate=(--batches 2 --batch_size 4 --seq_len 64)
  bench=(--num_prompts 2 --prompt_len 16 --max_new_tokens 16 '--exit_layers=2,4' '--num_speculations=2,4' --repeats 1)
  step_cost=(--steps 2)
else
  train=(--config.train.eval_batches=16)
  evaluate=(--batches 16)
  bench=(--num_prompts 16 --prompt_len 64 --max_new_tokens 128 '--exit_layers=2,4,5,6' '--num_speculations=1,2,3,4'
         --repeats 3 --auto)
  step_cost=(--steps 8)
fi
train+=("${overrides[@]}")

run "$python" -m layerskip_jax.train --config tiny --workdir "$workdir" "${train[@]}"
compare=()
if [[ -n "$baseline" ]]; then
  # The baseline of interfaces.md: the same run without layer dropout and without early-exit losses.
  base_dir="${workdir}_baseline"
  base_steps=()
  if [[ "$baseline" == time ]]; then
    # As many plain steps as take the LayerSkip run's time: both train steps timed side by side, here, now.
    base_dir="${workdir}_baseline_time"
    run "$python" -m layerskip_jax.train.bench --config tiny --what speed --speed_settings preset,baseline \
      "${step_cost[@]}" "${train[@]}" --json "$workdir/step_cost.json"
    if [[ $dry_run -eq 0 ]]; then
      steps=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["speed"]["equal_time_baseline_steps"])' \
        "$workdir/step_cost.json")
    else
      steps='N'  # read from step_cost.json when it runs
    fi
    base_steps=("--config.train.steps=$steps")
  fi
  run "$python" -m layerskip_jax.train --config tiny --workdir "$base_dir" "${train[@]}" \
    --config.layerskip.p_max=0 --config.layerskip.e_scale=0 "${base_steps[@]}"
  compare=(--compare "$base_dir")
fi
run "$python" -m layerskip_jax.evaluate --ckpt "$workdir" --source python_stdlib --split heldout "${evaluate[@]}" \
  "${compare[@]}" --layerwise_prompt "def fibonacci(n):" --json "$workdir/eval.json" --plot "$workdir/eval.png"
run "$python" -m layerskip_jax.benchmark --ckpt "$workdir" --source python_stdlib --split heldout "${bench[@]}" \
  --strategies=autoregressive,early_exit,self_speculative --batch_sizes 1 \
  --json "$workdir/benchmark.json" --plot "$workdir/benchmark.png"
run "$python" -m layerskip_jax.report --eval "$workdir/eval.json" --benchmark "$workdir/benchmark.json"

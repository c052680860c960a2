#!/usr/bin/env bash
# One check on one GPU (or TPU chip): the train step of llama3_2_1b in bf16 at the largest batch that fits (plain
# and LayerSkip objectives: tokens/s, MFU against the chip's bf16 peak, memory), and batch-1 decoding of a random
# model of the same shape against the weight-streaming floor. Writes one JSON. Needs only
# `pip install -r requirements.txt` plus a CUDA (or TPU) jax build; no data, no network.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: bash launch/gpu_check.sh [--json OUT.json] [--config PRESET] [--steps N] [--smoke] [--dry-run]

  --json FILE     where the results go (default gpu_check.json)
  --config NAME   the preset checked (default llama3_2_1b)
  --steps N       timed train steps per objective (default 10)
  --smoke         the same code on a CPU with a 2-layer tiny model (what CI runs)
  --dry-run       print the command instead of running it
USAGE
}

fail() { echo "error: $*" >&2; exit 2; }

args=()
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --smoke) args+=(--smoke); shift ;;
    --json|--config|--steps)
      [[ $# -ge 2 && "$2" != --* ]] || fail "$1 needs a value (see --help)"
      args+=("$1=$2"); shift 2 ;;
    --json=*|--config=*|--steps=*) args+=("$1"); shift ;;
    *) fail "unknown option $1 (see --help)" ;;
  esac
done

cd "$(dirname "$0")/.."
# The allocator's share of the GPU: the same 0.9 as launch/slurm/train.sbatch (and the planner's default).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
command=("${PYTHON:-python3}" -m layerskip_jax.gpu_check "${args[@]}")
if [[ $dry_run == 1 ]]; then
  printf '%q ' "${command[@]}"; echo
  exit 0
fi
exec "${command[@]}"

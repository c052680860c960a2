#!/bin/bash
# LayerSkip pretraining on a Cloud TPU VM slice (a pod slice of several workers, or one host): the same trainer
# started on every worker over `gcloud compute tpus tpu-vm ssh --worker=all`, detached, one log per worker.
# Run with --help for the usage; launch/README.md has worked examples.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu/train.sh --tpu NAME --zone ZONE --workdir DIR [OPTIONS] [--config.section.key=value ...]
       launch/tpu/train.sh --tpu NAME --zone ZONE --stop | --logs

Starts `python -m layerskip_jax.train` on every worker of a TPU VM slice (gcloud compute tpus tpu-vm ssh
--worker=all), detached with setsid nohup, logging to LOG_DIR/train_<worker hostname>.log on each worker. The
workers join one JAX cluster by themselves (jax.distributed.initialize() reads the TPU metadata). Before launching
it stops whatever still holds the TPU: earlier runs of the trainer (SIGTERM first: they checkpoint and exit),
other processes holding /dev/accel* or /dev/vfio, and a stale /tmp/libtpu_lockfile. Running the same command
again restarts the run from the latest checkpoint in --workdir.

Before it stops anything, the trainer checks the config on worker 0 (`python -m layerskip_jax.train --dry_run`:
the preset, every override, the workdir it would resume and train.init_from, on the CPU; it writes nothing), with
the code being launched (with --setup: the new code, unpacked in a temporary directory). If the trainer refuses,
the script prints its `error: ...` line and exits: the running trainer keeps running.

Options:
  --tpu NAME          TPU VM name (env TPU_NAME)
  --zone ZONE         its zone (env ZONE)
  --project ID        gcloud project (env PROJECT; default: gcloud's configured project)
  --workdir DIR       absolute run directory on a filesystem every worker mounts (NFS / Filestore, or a gcsfuse
                      mount of a bucket); an existing one is resumed (env WORKDIR; required)
  --config NAME|FILE  preset in configs/ or a config file in the checkout (env CONFIG; default llama2_7b)
  --data-cache DIR    data.cache_dir, which must be shared too: process 0 prepares the data, the others read it
                      (env DATA_CACHE; default: layerskip_jax_cache next to --workdir)
  --repo DIR          the checkout on the workers, relative to the home directory or absolute
                      (env REMOTE_REPO; default layerskip_jax)
  --python PY         the interpreter on the workers (env PYTHON; default python3)
  --log-dir DIR       per-worker log directory on the workers, relative to REPO or absolute (env LOG_DIR;
                      default logs)
  --setup             first copy this checkout to every worker (git-tracked and untracked, not ignored, files)
                      and pip install -r requirements.txt "jax[tpu]" there
  --no-cleanup        launch without stopping earlier processes first
  --skip-validation   launch without the trainer's --dry_run check on worker 0 (env LS_SKIP_VALIDATION=1)
  --stop              only stop training on every worker and free the TPU (the trainer checkpoints on SIGTERM)
  --logs              only print the last lines of every worker's log
  --grace SECONDS     how long --stop / the cleanup waits for a SIGTERM'd trainer before SIGKILL (default 120)
  --dry-run           print the gcloud commands and run nothing
  -h, --help          this text
  --config.K=V        any config override, passed to the trainer (e.g. --config.train.init_from=DIR)

Environment:
  LIBTPU_INIT_ARGS    appended after this script's libtpu flags (the last occurrence of a flag wins)
  LS_TUNING=0         do not set this script's libtpu flags

Example (a v5p-32: 4 workers, 16 chips):
  launch/tpu/train.sh --tpu my-v5p --zone us-east5-a --setup --config llama2_7b --workdir /mnt/nfs/runs/llama2_7b \
      --config.train.batch_size=64 --config.train.init_from=/mnt/nfs/ckpt/llama2_7b
EOF
}

die() {
  echo "error: $*" >&2
  exit 2
}

# Prints a command the way a shell reads it back: plain words bare, others in single quotes (after any NAME=).
quote() {
  local safe='^[A-Za-z0-9_./:,=@%+-]+$'
  if [[ $1 =~ $safe ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^([A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//\'/\'\\\'\'}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
show() {
  local sep='' word
  for word in "$@"; do printf '%s' "$sep"; quote "$word"; sep=' '; done
  echo
}
# Words inside a remote command (itself shown in single quotes): bare, in double quotes, or escaped.
rquote() {
  local safe='^[A-Za-z0-9_./:,=@%+-]+$' special='[$`"\\!]'
  if [[ $1 =~ $safe ]]; then
    printf '%s' "$1"
  elif [[ ! $1 =~ $special && $1 =~ ^([A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s"%s"' "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"
  elif [[ ! $1 =~ $special ]]; then
    printf '"%s"' "$1"
  else
    printf '%q' "$1"
  fi
}
rshow() {
  local sep='' word
  for word in "$@"; do printf '%s' "$sep"; rquote "$word"; sep=' '; done
}

tpu=${TPU_NAME:-}
zone=${ZONE:-}
project=${PROJECT:-}
workdir=${WORKDIR:-}
config=${CONFIG:-llama2_7b}
data_cache=${DATA_CACHE:-}
remote_repo=${REMOTE_REPO:-layerskip_jax}
python=${PYTHON:-python3}
log_dir=${LOG_DIR:-}
grace=120
action=train
setup=0
cleanup=1
skip_validation=0
[[ ${LS_SKIP_VALIDATION:-0} != 0 ]] && skip_validation=1
dry_run=0
overrides=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --setup) setup=1 ;;
    --no-cleanup) cleanup=0 ;;
    --skip-validation) skip_validation=1 ;;
    --stop) action=stop ;;
    --logs) action=logs ;;
    --tpu | --zone | --project | --workdir | --config | --data-cache | --repo | --python | --log-dir | --grace)
      (($# >= 2)) || die "$1 needs a value (see --help)"
      case $1 in
        --tpu) tpu=$2 ;;
        --zone) zone=$2 ;;
        --project) project=$2 ;;
        --workdir) workdir=$2 ;;
        --config) config=$2 ;;
        --data-cache) data_cache=$2 ;;
        --repo) remote_repo=$2 ;;
        --python) python=$2 ;;
        --log-dir) log_dir=$2 ;;
        --grace) grace=$2 ;;
      esac
      shift ;;
    --tpu=* | --zone=* | --project=* | --workdir=* | --config=* | --data-cache=* | --repo=* | --python=* | \
      --log-dir=* | --grace=*)
      value=${1#*=}
      case $1 in
        --tpu=*) tpu=$value ;;
        --zone=*) zone=$value ;;
        --project=*) project=$value ;;
        --workdir=*) workdir=$value ;;
        --config=*) config=$value ;;
        --data-cache=*) data_cache=$value ;;
        --repo=*) remote_repo=$value ;;
        --python=*) python=$value ;;
        --log-dir=*) log_dir=$value ;;
        --grace=*) grace=$value ;;
      esac ;;
    --config.*=*) overrides+=("$1") ;;
    --config.*) die "$1: a config override looks like --config.section.key=value" ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done
[[ -n $tpu ]] || die "--tpu is required (the TPU VM name; or set TPU_NAME)"
[[ -n $zone ]] || die "--zone is required (the TPU VM's zone; or set ZONE)"
[[ $grace =~ ^[0-9]+$ ]] || die "--grace=$grace: must be a number of seconds"
if [[ $action == train ]]; then
  [[ -n $workdir ]] || die "--workdir is required (an absolute path every worker mounts; or set WORKDIR)"
  [[ $workdir == /* ]] || die "--workdir=$workdir: must be absolute, on a filesystem every worker mounts"
  [[ -n $config ]] || die "--config is empty (a preset name such as llama2_7b, or a config file)"
  data_cache=${data_cache:-$(dirname "$workdir")/layerskip_jax_cache}
fi
log_dir=${log_dir:-logs}
in_repo="cd $(rquote "$remote_repo") &&"  # remote commands start in the checkout

gcloud_args=("--zone=$zone" ${project:+"--project=$project"})
# The same command on every worker of the slice.
on_all_workers() { run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --worker=all --command="$1"; }
on_worker0() { run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --worker=0 --command="$1"; }
run() {
  if ((dry_run)); then show "$@"; else "$@"; fi
}
if ((!dry_run)); then
  command -v gcloud >/dev/null || die "gcloud not found (install the Google Cloud CLI, or use --dry-run)"
fi

# Stop earlier trainers (SIGTERM: they checkpoint and exit 0; SIGKILL after --grace seconds), then anything else
# holding the TPU chips (/dev/accel* on v2-v4, /dev/vfio/* on v5e and later), then libtpu's lock file. The pattern
# [l]ayerskip_jax[.]train matches the trainer's command line but not this command's own.
pattern='"[l]ayerskip_jax[.]train"'
stop_command="pkill -TERM -f $pattern || true
for _ in \$(seq $grace); do pgrep -f $pattern >/dev/null || break; sleep 1; done
pkill -KILL -f $pattern || true
holders=\$(sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u)
if [ -n \"\$holders\" ]; then echo \"\$(hostname): killing TPU holders \$holders\"; sudo kill -9 \$holders; fi
sudo rm -f /tmp/libtpu_lockfile
echo \"\$(hostname): TPU free\""
stop_command=${stop_command//$'\n'/; }  # one line: gcloud passes it to ssh as is

case $action in
  stop)
    on_all_workers "$stop_command"
    exit 0 ;;
  logs)
    on_all_workers "$in_repo tail -n 20 $(rquote "$log_dir")/train_*.log"
    exit 0 ;;
esac

env_args=(PYTHONUNBUFFERED=1)
if [[ ${LS_TUNING:-1} != 0 ]]; then
  # libtpu flags, widely used for dense LLM training on TPU (MaxText's defaults for v4 / v5). They cannot be checked
  # without a TPU (libtpu aborts on an unknown flag): names change between libtpu releases.
  libtpu_flags=(
    # all-reduce optimisations for data-parallel gradient reduction
    --xla_tpu_enable_data_parallel_all_reduce_opt=true
    # ... also for gradients of different sizes (our norm scales next to the weight matrices)
    --xla_tpu_data_parallel_opt_different_sized_ops=true
    # run collectives asynchronously, fused with the compute around them
    --xla_tpu_enable_async_collective_fusion=true
    # ... including the FSDP all-gathers of parameters
    --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true
    # ... and let an async collective span several steps of the schedule
    --xla_tpu_enable_async_collective_fusion_multiple_steps=true
    # overlap compute with collectives on the TensorCore
    --xla_tpu_overlap_compute_collective_tc=true
    # asynchronous all-gathers (the FSDP weight gathers overlap the previous layer)
    --xla_enable_async_all_gather=true
  )
  env_args+=("LIBTPU_INIT_ARGS=${libtpu_flags[*]}${LIBTPU_INIT_ARGS:+ $LIBTPU_INIT_ARGS}")
fi
trainer_args=(--config "$config" --workdir "$workdir" "--config.data.cache_dir=$data_cache"
              --config.logging.progress_bar=false "${overrides[@]}")
train=("$python" -m layerskip_jax.train "${trainer_args[@]}")

# The trainer's own check, on worker 0 (the workdir, init_from and data live on the workers' shared filesystem),
# on the CPU (never the TPU a running trainer holds). It writes nothing.
check="env JAX_PLATFORMS=cpu $(rshow "$python" -m layerskip_jax.train --dry_run "${trainer_args[@]}")"
# With --setup, the code being installed is checked before it replaces the running one: unpacked in a temporary
# directory on worker 0 and imported from there (PYTHONPATH) with the workers' current environment, run from the
# repo directory as the launch will be, so relative paths (train.init_from, the workdir) mean the same; a relative
# config file is taken from the new code.
staged_args=("${trainer_args[@]}")
if [[ $config == *.py && $config != /* ]]; then staged_args[1]="__STAGED__/$config"; fi
staged_command="env JAX_PLATFORMS=cpu PYTHONPATH=__STAGED__ $(rshow "$python" -m layerskip_jax.train --dry_run \
  "${staged_args[@]}")"
staged_command=${staged_command//__STAGED__/\$dir}
staged_check="dir=\$(mktemp -d) && tar -xzf /tmp/layerskip_jax_code.tgz -C \"\$dir\""
staged_check+=" && { cd $(rquote "$remote_repo") 2>/dev/null || cd \"\$dir\"; } && $staged_command;"
staged_check+=" code=\$?; rm -rf \"\$dir\"; exit \$code"

# Runs a check ($1: the remote command) on worker 0. Its `ok: ...` line passes through. When the trainer refuses,
# prints its `error: ...` line and exits with its status. When the check could not run (no interpreter, jax or
# layerskip_jax missing on the worker, ssh failed), returns 1 with the reason in $check_failure.
check_failure=''
validate() {
  local errors reported last code=0
  if ((dry_run)); then
    on_worker0 "$1"
    return 0
  fi
  { errors=$(on_worker0 "$1" 2>&1 >&3 3>&-); } 3>&1 || code=$?
  ((code == 0)) && return 0
  reported=$(grep '^error: ' <<<"$errors" || true)
  if [[ $reported == *"flag 'dry_run'"* ]]; then
    die "the trainer in $remote_repo on worker 0 has no --dry_run (an older checkout): update it with --setup," \
      "or launch with --skip-validation"
  elif [[ -n $reported ]]; then
    echo "$reported" >&2
    exit "$code"
  fi
  last=$(grep -v '^[[:space:]]*$' <<<"$errors" | tail -n 1 || true)
  check_failure="$python -m layerskip_jax.train --dry_run on worker 0 exited with status $code${last:+: $last}"
  return 1
}

if ((setup)); then
  # This checkout (committed and uncommitted files, nothing git ignores) -> /tmp on every worker; unpacked and
  # installed below, once nothing runs from the files it replaces.
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  tarball="${TMPDIR:-/tmp}/layerskip_jax_code_$tpu.tgz"
  if ((dry_run)); then
    echo "git -C $(rquote "$repo") ls-files -z --cached --others --exclude-standard |" \
      "tar -C $(rquote "$repo") --null -T - -czf $(rquote "$tarball")"
  else
    git -C "$repo" ls-files -z --cached --others --exclude-standard | tar -C "$repo" --null -T - -czf "$tarball"
  fi
  run gcloud compute tpus tpu-vm scp "${gcloud_args[@]}" --worker=all "$tarball" "$tpu:/tmp/layerskip_jax_code.tgz"
fi

# Check before stopping anything: a config the trainer refuses leaves the running trainer running.
check_after_install=0
if ((!skip_validation)); then
  if ((dry_run)); then
    echo "# check the config and the workdir on worker 0 first (the trainer's --dry_run; --skip-validation skips it)"
    if ((setup)); then
      echo "# (if the new code cannot run there before the install and no trainer runs on worker 0: after it)"
    fi
  fi
  if ((setup)); then
    if ! validate "$staged_check"; then
      # The new code does not run with the workers' current environment (a new VM, or new requirements): it can
      # only be checked after the install, which stops the trainer; refused while one runs.
      code=0
      on_worker0 "pgrep -f $pattern > /dev/null" >/dev/null 2>&1 || code=$?
      if ((code == 0)); then
        die "could not check the config with the workers' current environment ($check_failure), and a trainer" \
          "is running on worker 0: stop it first (--stop), or launch with --skip-validation"
      elif ((code != 1)); then
        die "could not check the config ($check_failure), nor tell whether a trainer runs on worker 0" \
          "(ssh exited with status $code): launch again, or with --skip-validation"
      fi
      echo "note: could not check the config before the install ($check_failure); no trainer runs on worker 0:" \
        "installing first, then checking"
      check_after_install=1
    fi
  elif ! validate "$in_repo $check"; then
    die "could not run the config check ($check_failure): if the workers lack the code or its requirements," \
      "launch with --setup (or give their interpreter with --python); or launch with --skip-validation"
  fi
fi

# Stop first: nothing may run from the files the setup replaces.
((cleanup)) && on_all_workers "$stop_command"

if ((setup)); then
  install="mkdir -p $(rquote "$remote_repo") && tar -xzf /tmp/layerskip_jax_code.tgz -C $(rquote "$remote_repo")"
  install+=" && $in_repo $(rquote "$python") -m pip install -q -r requirements.txt \"jax[tpu]\""
  on_all_workers "$install"
fi
if ((check_after_install)) && ! validate "$in_repo $check"; then
  die "could not run the config check after the install ($check_failure): see the pip output above, or launch" \
    "with --skip-validation"
fi

# Detached: setsid nohup survives the end of the ssh session; stdin from /dev/null so ssh returns at once.
launch="$in_repo mkdir -p $(rquote "$log_dir") && env $(rshow "${env_args[@]}") setsid nohup"
launch+=" $(rshow "${train[@]}") > $(rquote "$log_dir")/train_\$(hostname).log 2>&1 < /dev/null &"
launch+=" echo \"\$(hostname): started the trainer, pid \$!, log $(rquote "$log_dir")/train_\$(hostname).log\""
on_all_workers "$launch"
if ((!dry_run)); then
  echo "logs: $0 --tpu $tpu --zone $zone${project:+ --project $project} --repo $remote_repo --logs"
fi

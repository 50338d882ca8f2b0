#!/usr/bin/env bash
# Multi-node GPU training under Slurm: writes an sbatch script (one task per node) and submits it.
set -euo pipefail

PROG=$(basename "$0")
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG --nodes=N [--gpus_per_node=G] [options] [--dry-run] -- COMMAND...

Write an sbatch script that runs COMMAND once per node (srun, one task per node, every GPU of the node
visible to it) as one multi-process JAX job, then submit it with sbatch. In the job:
  DLM_COORDINATOR_ADDRESS = first host of \$SLURM_JOB_NODELIST (scontrol show hostnames) : PORT
  DLM_NUM_PROCESSES       = \$SLURM_NNODES
  DLM_PROCESS_ID          = \$SLURM_PROCID (set inside each srun task)
The job runs in the directory sbatch is called from, with the environment of the caller (sbatch's default
--export=ALL): activate the virtualenv that has dlm-jax before calling this script.

Options:
  --nodes=N            number of nodes = number of processes (required)
  --gpus_per_node=G    GPUs per node (default: 8)
  --port=P             coordinator port (default: 20000 + SLURM_JOB_ID % 20000, so jobs sharing a node
                       do not collide)
  --job_name=NAME      job name (default: dlm-jax)
  --partition=NAME     partition (default: the cluster's default)
  --account=NAME       account to charge (default: yours)
  --time=LIMIT         time limit, e.g. 24:00:00 (default: the partition's)
  --cpus_per_task=C    CPUs per task (= per node), also given to srun
  --output=PATTERN     job log (default: dlm-jax-%j.out, %j = job id)
  --sbatch_arg=ARG     extra #SBATCH line (repeatable), e.g. --sbatch_arg=--exclusive --sbatch_arg=--mem=0
  --script_file=PATH   where the sbatch script is written before submitting (default: ./dlm-jax.sbatch)
  --dry-run            print the commands that would write the script and submit it, and exit: the script
                       inside cat > FILE <<'DLM_JAX_SBATCH_EOF' ... DLM_JAX_SBATCH_EOF, then sbatch FILE
  -h, --help           this help

Example (4 nodes of 8xH100: fsdp over the GPUs of a node, data over the nodes):
  $PROG --nodes=4 --gpus_per_node=8 --partition=gpu --time=48:00:00 -- dlm-jax train \\
      --config=configs/mdlm_owt.py --workdir=/shared/mdlm_owt --config.mesh.data=4 --config.mesh.fsdp=8
EOF
}

positive_int() {
  [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

NODES="" GPUS_PER_NODE=8 PORT="" JOB_NAME=dlm-jax PARTITION="" ACCOUNT="" TIME="" CPUS_PER_TASK=""
OUTPUT="dlm-jax-%j.out" SCRIPT_FILE=./dlm-jax.sbatch DRY_RUN=0
SBATCH_ARGS=()
CMD=()
while (($#)); do
  arg=$1
  shift
  case $arg in
    -h | --help) usage; exit 0 ;;
    --dry-run | --dry_run) DRY_RUN=1; continue ;;
    --) CMD=("$@"); break ;;
    --*=*) key=${arg%%=*} value=${arg#*=} ;;
    --*)
      key=$arg
      (($#)) || die "$key needs a value"
      value=$1
      shift
      ;;
    *) die "unexpected argument '$arg' (put the command after '--')" ;;
  esac
  case $key in
    --nodes) NODES=$value ;;
    --gpus_per_node | --gpus-per-node) GPUS_PER_NODE=$value ;;
    --port) PORT=$value ;;
    --job_name | --job-name) JOB_NAME=$value ;;
    --partition) PARTITION=$value ;;
    --account) ACCOUNT=$value ;;
    --time) TIME=$value ;;
    --cpus_per_task | --cpus-per-task) CPUS_PER_TASK=$value ;;
    --output) OUTPUT=$value ;;
    --sbatch_arg | --sbatch-arg) SBATCH_ARGS+=("$value") ;;
    --script_file | --script-file) SCRIPT_FILE=$value ;;
    *) die "unknown option $key (see --help)" ;;
  esac
done

[[ -n $NODES ]] || die "--nodes is required (see --help)"
positive_int --nodes "$NODES"
positive_int --gpus_per_node "$GPUS_PER_NODE"
[[ -z $CPUS_PER_TASK ]] || positive_int --cpus_per_task "$CPUS_PER_TASK"
if [[ -n $PORT ]] && { ! [[ $PORT =~ ^[1-9][0-9]*$ ]] || ((PORT > 65535)); }; then
  die "--port must be a port number, got '$PORT'"
fi
[[ -n $SCRIPT_FILE ]] || die "--script_file may not be empty"
for a in "$JOB_NAME" "$PARTITION" "$ACCOUNT" "$TIME" "$OUTPUT" ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}; do
  [[ $a != *$'\n'* ]] || die "sbatch options may not contain newlines"
done
((${#CMD[@]})) || die "the command to run is missing: $PROG --nodes=N -- COMMAND..."

SRUN_OPTS=""
[[ -z $CPUS_PER_TASK ]] || SRUN_OPTS=" --cpus-per-task=$CPUS_PER_TASK"

# The sbatch script. Only the user's command is quoted here; $SLURM_* and the rest expand inside the job.
generate_script() {
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=1"
  echo "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
  echo "#SBATCH --output=$OUTPUT"
  [[ -z $PARTITION ]] || echo "#SBATCH --partition=$PARTITION"
  [[ -z $ACCOUNT ]] || echo "#SBATCH --account=$ACCOUNT"
  [[ -z $TIME ]] || echo "#SBATCH --time=$TIME"
  [[ -z $CPUS_PER_TASK ]] || echo "#SBATCH --cpus-per-task=$CPUS_PER_TASK"
  local a
  for a in ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}; do
    echo "#SBATCH $a"
  done
  echo "# Generated by launch/$PROG: one dlm-jax process per node, coordinated by jax.distributed."
  cat <<'EOS'
set -euo pipefail
nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_node=$(head -n 1 <<<"$nodes")
EOS
  if [[ -n $PORT ]]; then
    echo "port=$PORT"
  else
    echo "port=\$((20000 + SLURM_JOB_ID % 20000))"
  fi
  cat <<'EOS'
export DLM_COORDINATOR_ADDRESS="$head_node:$port"
export DLM_NUM_PROCESSES="$SLURM_NNODES"
echo "coordinator $DLM_COORDINATOR_ADDRESS, $DLM_NUM_PROCESSES processes on: ${nodes//$'\n'/ }"
# DLM_PROCESS_ID differs per task: each task sets it from the SLURM_PROCID srun gives it.
# shellcheck disable=SC2016  # $SLURM_PROCID and $@ expand in each task's bash
EOS
  echo "srun --nodes=\"\$SLURM_NNODES\" --ntasks=\"\$SLURM_NNODES\" --ntasks-per-node=1 \\"
  echo "  --kill-on-bad-exit=1$SRUN_OPTS \\"
  echo "  bash -c 'export DLM_PROCESS_ID=\"\$SLURM_PROCID\"; exec \"\$@\"' dlm-jax-task \\"
  echo "  $(quote_all "${CMD[@]}")"
}

SCRIPT=$(generate_script)
if ((DRY_RUN)); then
  echo "cat > $(quote "$SCRIPT_FILE") <<'DLM_JAX_SBATCH_EOF'"
  printf '%s\n' "$SCRIPT"
  echo "DLM_JAX_SBATCH_EOF"
  echo "sbatch $(quote "$SCRIPT_FILE")"
  exit 0
fi

command -v sbatch >/dev/null 2>&1 || die "sbatch not found: run this on a Slurm login node (or use --dry-run)"
printf '%s\n' "$SCRIPT" > "$SCRIPT_FILE"
sbatch "$SCRIPT_FILE"

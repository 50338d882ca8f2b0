#!/usr/bin/env bash
# N processes of one command on this machine, wired together by jax.distributed with CPU (gloo) collectives.
set -euo pipefail

PROG=$(basename "$0")
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG --num_processes=N [--port=P] [--devices_per_process=K] [--dry-run] -- COMMAND...

Start N copies of COMMAND on this machine as one multi-process JAX job (the way a multi-host run
behaves, without the hosts). Process i gets the environment
  DLM_COORDINATOR_ADDRESS=localhost:P  DLM_NUM_PROCESSES=N  DLM_PROCESS_ID=i  DLM_CPU_COLLECTIVES=gloo
  JAX_PLATFORMS=cpu (unless JAX_PLATFORMS is already set)  PYTHONUNBUFFERED=1
and, with --devices_per_process=K, XLA_FLAGS=--xla_force_host_platform_device_count=K (appended to any
XLA_FLAGS already set). Their output is interleaved on stdout, each line prefixed with [pI]. When one
process fails the others are stopped; the exit status is that of the first failure (0 if all succeed).

Options:
  --num_processes=N        number of processes (required, >= 1)
  --port=P                 coordinator port on localhost (default: 12355; must be free)
  --devices_per_process=K  fake CPU devices per process (jax.device_count() is then N*K)
  --dry-run                print the N commands with their environment, one per line, and exit
  -h, --help               this help

Example (2 processes x 4 fake devices = 8 devices; data across processes, fsdp inside each):
  $PROG --num_processes=2 --devices_per_process=4 -- dlm-jax train --config=configs/quickstart.py \\
      --workdir=workdirs/local2 --config.mesh.data=2 --config.mesh.fsdp=-1
EOF
}

NUM_PROCESSES="" PORT=12355 DEVICES_PER_PROCESS=""
set_option() {
  case $1 in
    --num_processes | --num-processes) NUM_PROCESSES=$2 ;;
    --port) PORT=$2 ;;
    --devices_per_process | --devices-per-process) DEVICES_PER_PROCESS=$2 ;;
    *) return 1 ;;
  esac
}

parse_options "$@"
no_positional
CMD=(${REST[@]+"${REST[@]}"})

[[ -n $NUM_PROCESSES ]] || die "--num_processes is required (see --help)"
[[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || die "--num_processes must be a positive integer, got '$NUM_PROCESSES'"
if ! [[ $PORT =~ ^[1-9][0-9]*$ ]] || ((PORT > 65535)); then die "--port must be a port number, got '$PORT'"; fi
if [[ -n $DEVICES_PER_PROCESS ]]; then
  [[ $DEVICES_PER_PROCESS =~ ^[1-9][0-9]*$ ]] ||
    die "--devices_per_process must be a positive integer, got '$DEVICES_PER_PROCESS'"
fi
((${#CMD[@]})) || die "the command to run is missing: $PROG --num_processes=N -- COMMAND..."

# The full command line of process $1, in the array PROC_CMD.
build_command() {
  PROC_CMD=(env "DLM_COORDINATOR_ADDRESS=localhost:$PORT" "DLM_NUM_PROCESSES=$NUM_PROCESSES"
    "DLM_PROCESS_ID=$1" "DLM_CPU_COLLECTIVES=gloo" "JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}" "PYTHONUNBUFFERED=1")
  if [[ -n $DEVICES_PER_PROCESS ]]; then
    PROC_CMD+=("XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")
  fi
  PROC_CMD+=("${CMD[@]}")
}

if ((DRY_RUN)); then
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    build_command "$i"
    quote_all "${PROC_CMD[@]}"
    echo
  done
  exit 0
fi

PIDS=()
stop_all() {
  local pid
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  # Give them a few seconds to exit, then kill what is left.
  for _ in $(seq 50); do
    local alive=0
    for pid in ${PIDS[@]+"${PIDS[@]}"}; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    ((alive)) || return 0
    sleep 0.1
  done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    kill -KILL "$pid" 2>/dev/null || true
  done
}
trap 'echo "$PROG: interrupted, stopping all processes" >&2; stop_all; exit 130' INT
trap 'echo "$PROG: terminated, stopping all processes" >&2; stop_all; exit 143' TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  build_command "$i"
  # env execs the command, so $! is the process itself; sed prefixes each of its lines with [pI].
  "${PROC_CMD[@]}" > >(sed -u "s/^/[p$i] /") 2>&1 &
  PIDS+=("$!")
done

# Poll instead of `wait -n` (bash >= 4.3 only) so the first failure is seen whichever process it is.
status=0
remaining=$NUM_PROCESSES
FINISHED=()
while ((remaining)); do
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    [[ -z ${FINISHED[i]:-} ]] || continue
    pid=${PIDS[i]}
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" || rc=$?
    FINISHED[i]=1
    remaining=$((remaining - 1))
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "$PROG: process $i exited with status $rc; stopping the others" >&2
      stop_all
    fi
  done
  if ((remaining)); then sleep 0.2; fi
done
wait # the [pI] prefixers
if ((status == 0)); then
  echo "$PROG: all $NUM_PROCESSES processes finished" >&2
fi
exit "$status"

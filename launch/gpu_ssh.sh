#!/usr/bin/env bash
# One process per GPU host over ssh: process id = host index, coordinator = the first host.
set -euo pipefail

PROG=$(basename "$0")
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

usage() {
  cat <<EOF
Usage: $PROG --hosts=H1,H2,... [options] [--dry-run] -- COMMAND...

Start COMMAND once per host over ssh, as one multi-process JAX job: the process on host i (0-based, in
--hosts order) gets DLM_COORDINATOR_ADDRESS=COORDINATOR:PORT, DLM_NUM_PROCESSES=<number of hosts> and
DLM_PROCESS_ID=i, and uses every GPU of its host. Each ssh runs in the background with its output in
LOG_DIR/pI-HOST.log; the script waits for all of them. When one fails, the others are stopped (the local ssh
and, through a pid file in /tmp on the host, the remote process); the exit status is that of the first failure.

Every host needs the repository at --remote_dir and dlm-jax installed (in REMOTE_DIR/.venv, or on PATH),
and the hosts must reach COORDINATOR:PORT (open that port between them). ssh runs with BatchMode=yes, so
use keys (ssh-agent) rather than passwords.

Options:
  --hosts=H1,H2,...    ssh destinations ([user@]host), one per process (required)
  --port=P             coordinator port on the first host (default: 12345)
  --coordinator=ADDR   address the other hosts use to reach the first one (default: the first host,
                       without user@); set it when the ssh names are not the cluster-network names
  --remote_dir=DIR     directory of the repository on every host (default: this directory, $PWD)
  --venv=DIR           virtualenv to activate there if it exists, relative to --remote_dir
                       (default: .venv; 'none' to use the PATH as it is)
  --log_dir=DIR        local directory of the per-host logs (default: logs/gpu_ssh)
  --ssh_arg=ARG        extra argument for ssh (repeatable), e.g. --ssh_arg=-p2222 --ssh_arg=-i~/.ssh/key
  --dry-run            print the commands, one per line, and exit without running them
  -h, --help           this help

Example (two 8xH100 hosts: fsdp over the 8 GPUs of a host, data over the 2 hosts):
  $PROG --hosts=gpu-a,gpu-b -- dlm-jax train --config=configs/mdlm_owt.py --workdir=/shared/mdlm_owt \\
      --config.mesh.data=2 --config.mesh.fsdp=8
EOF
}

HOSTS_ARG="" PORT=12345 COORDINATOR="" REMOTE_DIR=$PWD VENV=.venv LOG_DIR=logs/gpu_ssh
SSH_ARGS=()
set_option() {
  case $1 in
    --hosts) HOSTS_ARG=$2 ;;
    --port) PORT=$2 ;;
    --coordinator) COORDINATOR=$2 ;;
    --remote_dir | --remote-dir) REMOTE_DIR=$2 ;;
    --venv) VENV=$2 ;;
    --log_dir | --log-dir) LOG_DIR=$2 ;;
    --ssh_arg | --ssh-arg) SSH_ARGS+=("$2") ;;
    *) return 1 ;;
  esac
}

parse_options "$@"
no_positional
CMD=(${REST[@]+"${REST[@]}"})

[[ -n $HOSTS_ARG ]] || die "--hosts is required, e.g. --hosts=gpu-a,gpu-b (see --help)"
IFS=, read -r -a HOSTS <<<"$HOSTS_ARG"
for h in "${HOSTS[@]}"; do
  [[ -n $h && $h != *[[:space:]]* ]] || die "--hosts must be a comma-separated list of hosts, got '$HOSTS_ARG'"
done
if ! [[ $PORT =~ ^[1-9][0-9]*$ ]] || ((PORT > 65535)); then die "--port must be a port number, got '$PORT'"; fi
((${#CMD[@]})) || die "the command to run is missing: $PROG --hosts=H1,H2 -- COMMAND..."
NUM=${#HOSTS[@]}
if [[ -z $COORDINATOR ]]; then
  COORDINATOR=${HOSTS[0]#*@}
fi

SSH=(ssh -o BatchMode=yes ${SSH_ARGS[@]+"${SSH_ARGS[@]}"})

pid_file() { echo "/tmp/dlm-jax-$PORT-p$1.pid"; }

# The shell command run on host $1 (its index): cd, venv, env, then the command, whose pid is kept in a file
# while it runs (so stop_all can reach it) and whose exit status is the ssh's.
remote_command() {
  local activate=""
  if [[ $VENV != none && -n $VENV ]]; then
    activate="if [ -f $(quote "$VENV/bin/activate") ]; then . $(quote "$VENV/bin/activate"); fi && "
  fi
  printf '%s' "cd $(quote "$REMOTE_DIR") && ${activate}export $(quote_all \
    "DLM_COORDINATOR_ADDRESS=$COORDINATOR:$PORT" "DLM_NUM_PROCESSES=$NUM" "DLM_PROCESS_ID=$1") \
&& { $(quote_all "${CMD[@]}") & pid=\$!; echo \$pid > $(pid_file "$1"); wait \$pid; rc=\$?; \
rm -f $(pid_file "$1"); exit \$rc; }"
}

log_file() { echo "$LOG_DIR/p$1-${HOSTS[$1]//[^A-Za-z0-9_.@-]/_}.log"; }

if ((DRY_RUN)); then
  echo "mkdir -p $(quote "$LOG_DIR")"
  for ((i = 0; i < NUM; i++)); do
    line=$(quote_all "${SSH[@]}" "${HOSTS[i]}" "$(remote_command "$i")")
    echo "$line > $(quote "$(log_file "$i")") 2>&1 < /dev/null &"
  done
  exit 0
fi

mkdir -p "$LOG_DIR"
PIDS=()
stop_all() {
  local i
  # A remote process outlives its ssh (no tty): stop it through its pid file (there only while it runs), then
  # the local ssh if it is still there.
  for ((i = 0; i < ${#PIDS[@]}; i++)); do
    "${SSH[@]}" "${HOSTS[i]}" "f=$(pid_file "$i"); if [ -f \$f ]; then kill \$(cat \$f) 2>/dev/null; rm -f \$f; fi" \
      < /dev/null > /dev/null 2>&1 || true
  done
  sleep 2
  for ((i = 0; i < ${#PIDS[@]}; i++)); do
    kill -TERM "${PIDS[i]}" 2>/dev/null || true
  done
}
trap 'echo "$PROG: interrupted, stopping all hosts" >&2; stop_all; exit 130' INT
trap 'echo "$PROG: terminated, stopping all hosts" >&2; stop_all; exit 143' TERM

for ((i = 0; i < NUM; i++)); do
  "${SSH[@]}" "${HOSTS[i]}" "$(remote_command "$i")" > "$(log_file "$i")" 2>&1 < /dev/null &
  PIDS+=("$!")
  echo "$PROG: process $i on ${HOSTS[i]}: log $(log_file "$i")" >&2
done

status=0
remaining=$NUM
FINISHED=()
while ((remaining)); do
  for ((i = 0; i < NUM; i++)); do
    [[ -z ${FINISHED[i]:-} ]] || continue
    kill -0 "${PIDS[i]}" 2>/dev/null && continue
    rc=0
    wait "${PIDS[i]}" || rc=$?
    FINISHED[i]=1
    remaining=$((remaining - 1))
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "$PROG: process $i on ${HOSTS[i]} exited with status $rc (see $(log_file "$i")); stopping the others" >&2
      stop_all
    fi
  done
  if ((remaining)); then sleep 1; fi
done
if ((status == 0)); then
  echo "$PROG: all $NUM processes finished" >&2
fi
exit "$status"

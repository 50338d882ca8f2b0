#!/usr/bin/env bash
# Cloud TPU VM slices (single- or multi-host) through gcloud: create, set up, run, read logs, stop, delete.
set -euo pipefail

PROG=$(basename "$0")
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
REPO_DEFAULT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $PROG SUBCOMMAND --name=NAME --zone=ZONE [options] [-- ...]

Drive a Cloud TPU VM slice with gcloud. Every worker (host) of the slice runs the same command; on TPU,
jax.distributed finds the coordinator by itself, so no address is passed.

Subcommands:
  create    gcloud compute tpus tpu-vm create NAME (needs --accelerator; --version defaults per generation)
            Arguments after '--' are appended to the gcloud command (e.g. -- --spot).
  setup     copy this repository to every worker (gcloud ... scp --recurse --worker=all) and install it
            there in a virtualenv: pip install -e '.[EXTRAS]' (Python >= 3.11 is installed with apt if missing)
  run       -- COMMAND...   start COMMAND on every worker in the background (nohup, log file), so it keeps
            running after ssh exits; exports DLM_DISTRIBUTED=1 (jax.distributed.initialize() on the pod)
  logs      tail -F the log of one worker (default worker 0: the only one that writes metrics)
  stop      kill the command started by 'run' on every worker (pid file)
  delete    gcloud compute tpus tpu-vm delete NAME --quiet (arguments after '--' are appended)

Options:
  --name=NAME            TPU VM name (required)
  --zone=ZONE            zone, e.g. us-central2-b (required)
  --project=PROJECT      gcloud project (default: gcloud's configured project)
  --accelerator=TYPE     create: v4-32, v5litepod-16, v5p-64, v6e-16, ...
  --version=RUNTIME      create: TPU software version (default: tpu-ubuntu2204-base for v2/v3/v4,
                         v2-alpha-tpuv5-lite for v5litepod, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
  --remote_dir=DIR       where the repository lives on the workers, relative to the home directory
                         (default: dlm-jax)
  --repo=DIR             setup: local repository to copy (default: $REPO_DEFAULT)
  --extras=LIST          setup: pip extras (default: tpu; e.g. tpu,hf for Hugging Face data)
  --log=FILE             run/logs/stop: log file on each worker, relative to the home directory
                         (default: dlm-jax.log; the pid file is FILE with .pid instead of .log)
  --worker=N             logs: which worker to tail (default: 0)
  --dry-run              print the commands, one per line, and exit without running them
  -h, --help             this help

Example:
  $PROG create --name=dlm --zone=us-central2-b --accelerator=v4-32
  $PROG setup  --name=dlm --zone=us-central2-b --extras=tpu,gcs,hf
  $PROG run    --name=dlm --zone=us-central2-b -- dlm-jax train --config=configs/mdlm_owt.py \\
      --workdir=gs://bucket/mdlm_owt --config.mesh.fsdp=-1
  $PROG logs   --name=dlm --zone=us-central2-b
  $PROG delete --name=dlm --zone=us-central2-b
EOF
}

# Prints the command (--dry-run) or runs it.
run_cmd() {
  if ((DRY_RUN)); then
    quote_all "$@"
    echo
  else
    "$@"
  fi
}

# A path on a worker relative to its home directory (absolute paths are kept).
remote_path() {
  # shellcheck disable=SC2016  # $HOME is expanded on the worker
  if [[ $1 == /* ]]; then quote "$1"; else printf '"$HOME"/%s' "$(quote "$1")"; fi
}

NAME="" ZONE="" PROJECT="" ACCELERATOR="" VERSION="" REMOTE_DIR="dlm-jax" REPO="$REPO_DEFAULT"
EXTRAS="tpu,gcs" LOG="dlm-jax.log" WORKER=0
set_option() {
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator | --accelerator-type | --accelerator_type) ACCELERATOR=$2 ;;
    --version) VERSION=$2 ;;
    --remote_dir) REMOTE_DIR=$2 ;;
    --repo) REPO=$2 ;;
    --extras) EXTRAS=$2 ;;
    --log) LOG=$2 ;;
    --worker) WORKER=$2 ;;
    *) return 1 ;;
  esac
}

parse_options "$@"
((${#POSITIONAL[@]} <= 1)) || die "unexpected argument '${POSITIONAL[1]}' (put the command after '--')"
SUBCOMMAND=${POSITIONAL[0]-}

case $SUBCOMMAND in
  create | setup | run | logs | stop | delete) ;;
  "") die "a subcommand is required: create, setup, run, logs, stop or delete (see --help)" ;;
  *) die "unknown subcommand '$SUBCOMMAND': use create, setup, run, logs, stop or delete" ;;
esac
[[ -n $NAME ]] || die "--name is required (see --help)"
[[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name must be lowercase letters, digits and '-', got '$NAME'"
[[ -n $ZONE ]] || die "--zone is required (see --help)"
[[ -n $REMOTE_DIR ]] || die "--remote_dir may not be empty"
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a worker index (0, 1, ...), got '$WORKER'"
if [[ $SUBCOMMAND == run ]]; then
  ((${#REST[@]})) || die "run needs the command after '--', e.g. -- dlm-jax train --config=... --workdir=..."
elif [[ $SUBCOMMAND != create && $SUBCOMMAND != delete ]] && ((${#REST[@]})); then
  die "$SUBCOMMAND takes no arguments after '--'"
fi

GCLOUD_FLAGS=("--zone=$ZONE")
[[ -z $PROJECT ]] || GCLOUD_FLAGS+=("--project=$PROJECT")
TPU_VM=(gcloud compute tpus tpu-vm)
PID=${LOG%.log}.pid
[[ $PID != "$LOG" ]] || PID=$LOG.pid

case $SUBCOMMAND in
  create)
    [[ -n $ACCELERATOR ]] || die "create needs --accelerator, e.g. v4-32, v5litepod-16, v5p-64 or v6e-16"
    if [[ -z $VERSION ]]; then
      case $ACCELERATOR in
        v2-* | v3-* | v4-*) VERSION=tpu-ubuntu2204-base ;;
        v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
        v5p-*) VERSION=v2-alpha-tpuv5 ;;
        v6e-*) VERSION=v2-alpha-tpuv6e ;;
        *) die "no default --version for accelerator '$ACCELERATOR'; pass --version=RUNTIME" ;;
      esac
    fi
    run_cmd "${TPU_VM[@]}" create "$NAME" "${GCLOUD_FLAGS[@]}" "--accelerator-type=$ACCELERATOR" \
      "--version=$VERSION" ${REST[@]+"${REST[@]}"}
    ;;
  setup)
    [[ -f $REPO/setup.py || -f $REPO/pyproject.toml ]] || die "--repo=$REPO is not the dlm-jax repository"
    # A clean copy (no virtualenv, git objects, run outputs or caches) is staged, then copied recursively.
    stage="${TMPDIR:-/tmp}/dlm-jax-stage-$NAME"
    base=$(basename "$REMOTE_DIR")
    parent=$(dirname "$REMOTE_DIR")
    run_cmd rm -rf "$stage"
    run_cmd mkdir -p "$stage/$base"
    run_cmd bash -c "tar -C $(quote "$REPO") --exclude=./.git --exclude=./.venv --exclude=./venv \
--exclude=./workdirs --exclude=./bench_out --exclude=./build --exclude=./dist --exclude=__pycache__ \
--exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache -cf - . | tar -C $(quote "$stage/$base") -xf -"
    if [[ $parent != . ]]; then
      run_cmd "${TPU_VM[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all \
        --command="mkdir -p $(remote_path "$parent")"
    fi
    run_cmd "${TPU_VM[@]}" scp --recurse "$stage/$base" "$NAME:$parent" "${GCLOUD_FLAGS[@]}" --worker=all
    install="set -e; cd $(remote_path "$REMOTE_DIR"); PY=; for p in python3.13 python3.12 python3.11 python3; do \
if command -v \$p >/dev/null 2>&1 && \$p -c \"import sys; sys.exit(sys.version_info < (3, 11))\"; then PY=\$p; \
break; fi; done; if [ -z \"\$PY\" ]; then sudo apt-get update -qq; \
sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv; PY=python3.11; fi; \
\$PY -m venv .venv || { sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \$(basename \$PY)-venv; \
\$PY -m venv .venv; }; . .venv/bin/activate; pip install -q -U pip; pip install -q -e $(quote ".[$EXTRAS]")"
    run_cmd "${TPU_VM[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$install"
    run_cmd rm -rf "$stage"
    ;;
  run)
    # { cmd & } backgrounds only the command, whose output goes to the log, so ssh returns at once.
    remote="cd $(remote_path "$REMOTE_DIR") && if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi \
&& export DLM_DISTRIBUTED=1 && { nohup $(quote_all "${REST[@]}") > $(remote_path "$LOG") 2>&1 < /dev/null & \
echo \$! > $(remote_path "$PID"); }"
    run_cmd "${TPU_VM[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all --command="$remote"
    ((DRY_RUN)) || echo "$PROG: started on every worker of $NAME; follow it with: $PROG logs --name=$NAME \
--zone=$ZONE${PROJECT:+ --project=$PROJECT}" >&2
    ;;
  logs)
    run_cmd "${TPU_VM[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" "--worker=$WORKER" \
      --command="tail -n 200 -F $(remote_path "$LOG")"
    ;;
  stop)
    pidfile=$(remote_path "$PID")
    run_cmd "${TPU_VM[@]}" ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker=all \
      --command="if [ -f $pidfile ]; then kill \$(cat $pidfile) 2>/dev/null || true; rm -f $pidfile; fi"
    ;;
  delete)
    run_cmd "${TPU_VM[@]}" delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet ${REST[@]+"${REST[@]}"}
    ;;
esac

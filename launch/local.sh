#!/usr/bin/env bash
# N JAX processes on this machine, coordinated on localhost: multi-host behaviour on one computer.
#
#   launch/local.sh [--num_processes=2] [--devices_per_process=1] [--port=PORT] [--module=train]
#                   [--log_dir=DIR] [--dry_run] -- --config=configs/synthetic.py --workdir=DIR ...
#
# Every argument after `--` goes to `python -m eavl_jax.<module>` of every process, which also gets
# --coordinator_address=localhost:PORT --num_processes=N --process_id=i. On CPU each process
# fakes --devices_per_process devices (XLA_FLAGS). Process 0 prints to this terminal, the others
# to <log_dir>/process_<i>.log. The script exits with the first non-zero status of a process.
set -euo pipefail

num_processes=2
devices_per_process=1
port=""
module=train
log_dir=""
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num_processes=*) num_processes="${1#*=}" ;;
    --devices_per_process=*) devices_per_process="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --module=*) module="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option '$1' (job arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
if ! [[ "$num_processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: --num_processes=$num_processes must be a positive integer" >&2; exit 2
fi
if [[ -z "$port" ]]; then
  port=$(python -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
fi
if [[ -z "$log_dir" ]]; then
  log_dir=$(mktemp -d "${TMPDIR:-/tmp}/eavl_local.XXXXXX")
fi

commands=()
for ((i = 0; i < num_processes; i++)); do
  commands+=("XLA_FLAGS=--xla_force_host_platform_device_count=$devices_per_process python -m eavl_jax.$module --coordinator_address=localhost:$port --num_processes=$num_processes --process_id=$i $*")
done
if [[ "$dry_run" == 1 ]]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

mkdir -p "$log_dir"
pids=()
for ((i = 0; i < num_processes; i++)); do
  if [[ "$i" == 0 ]]; then
    XLA_FLAGS="--xla_force_host_platform_device_count=$devices_per_process" python -m "eavl_jax.$module" \
      --coordinator_address="localhost:$port" --num_processes="$num_processes" --process_id="$i" "$@" &
  else
    XLA_FLAGS="--xla_force_host_platform_device_count=$devices_per_process" python -m "eavl_jax.$module" \
      --coordinator_address="localhost:$port" --num_processes="$num_processes" --process_id="$i" "$@" \
      > "$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    code=$?
    echo "local.sh: process $i exited with status $code (log: $log_dir/process_$i.log)" >&2
    [[ "$status" == 0 ]] && status=$code
  fi
done
exit "$status"

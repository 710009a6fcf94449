#!/usr/bin/env bash
# The same eavl_jax command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=PROJECT] [--repo_dir=eavl_jax (relative to the remote home)]
#                     [--module=train] [--setup] [--retries=N] [--dry_run] -- \
#       --config=configs/refcoco.py --workdir=gs://BUCKET/eavl/refcoco \
#       --config.data.data_dir=gs://BUCKET/tensorflow_datasets
#
# One process per TPU VM host; jax.distributed.initialize() finds its peers from the TPU metadata
# (--distributed=on). The workdir and the records live on GCS: every host reads its own shard of
# the records and Orbax writes the checkpoint from all hosts to the same gs:// directory.
# --setup first installs the project on every worker (pip install -r requirements.txt -e .).
# A run stopped by SIGTERM (a maintenance event) saves its step and exits with 75
# (eavl_jax.trainer.EXIT_PREEMPTED); --retries=N runs the command again, resuming, up to N times
# while it ends so. The script exits with the job's last status: 0 finished, 75 preempted.
set -euo pipefail

tpu=""
zone=""
project=""
repo_dir=eavl_jax
module=train
setup=0
retries=0
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --repo_dir=*) repo_dir="${1#*=}" ;;
    --module=*) module="${1#*=}" ;;
    --setup) setup=1 ;;
    --retries=*) retries="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option '$1' (job arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$tpu" || -z "$zone" ]]; then
  echo "tpu_pod.sh: --tpu and --zone are required" >&2; exit 2
fi
if ! [[ "$retries" =~ ^[0-9]+$ ]]; then
  echo "tpu_pod.sh: --retries=$retries must be a non-negative integer" >&2; exit 2
fi

job_args=""
for arg in "$@"; do
  job_args+=" $(printf '%q' "$arg")"
done
remote="cd $repo_dir && python3 -m eavl_jax.$module --distributed=on$job_args"
if [[ "$setup" == 1 ]]; then
  remote="cd $repo_dir && pip install -q -r requirements.txt -e . && ${remote#"cd $repo_dir && "}"
fi
gcloud_cmd=(gcloud compute tpus tpu-vm ssh "$tpu" "--zone=$zone" --worker=all)
if [[ -n "$project" ]]; then
  gcloud_cmd+=("--project=$project")
fi
gcloud_cmd+=("--command=$remote")

if [[ "$dry_run" == 1 ]]; then
  printf '%q ' "${gcloud_cmd[@]}"
  printf '\n'
  exit 0
fi
status=0
"${gcloud_cmd[@]}" || status=$?
for ((attempt = 1; attempt <= retries && status == 75; attempt++)); do
  echo "tpu_pod.sh: preempted after saving (exit 75): resuming, retry $attempt of $retries" >&2
  status=0
  "${gcloud_cmd[@]}" || status=$?
done
exit "$status"

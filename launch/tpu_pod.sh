#!/usr/bin/env bash
# The same eavl_jax command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=PROJECT] [--repo_dir=eavl_jax (relative to the remote home)]
#                     [--module=train] [--setup] [--dry_run] -- \
#       --config=configs/refcoco.py --workdir=gs://BUCKET/eavl/refcoco \
#       --config.data.data_dir=gs://BUCKET/tensorflow_datasets
#
# One process per TPU VM host; jax.distributed.initialize() finds its peers from the TPU metadata
# (--distributed=on). The workdir and the records live on GCS: every host reads its own shard of
# the records and Orbax writes the checkpoint from all hosts to the same gs:// directory.
# --setup first installs the project on every worker (pip install -r requirements.txt -e .).
set -euo pipefail

tpu=""
zone=""
project=""
repo_dir=eavl_jax
module=train
setup=0
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --repo_dir=*) repo_dir="${1#*=}" ;;
    --module=*) module="${1#*=}" ;;
    --setup) setup=1 ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown option '$1' (job arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$tpu" || -z "$zone" ]]; then
  echo "tpu_pod.sh: --tpu and --zone are required" >&2; exit 2
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
exec "${gcloud_cmd[@]}"

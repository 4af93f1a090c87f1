#!/usr/bin/env bash
# Deletes the queued resource and its slice (--force deletes the TPU VMs with it). Data under
# /gcs/BUCKET stays in the bucket; anything else on the workers is lost.
#   tpu/teardown.sh
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
need ZONE

mapfile -t flags < <(gflags)
gcloud compute tpus queued-resources delete "$TPU_NAME" "${flags[@]}" --force --quiet
echo "deleted '$TPU_NAME'"

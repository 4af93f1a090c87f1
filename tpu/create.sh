#!/usr/bin/env bash
# Requests a TPU slice as a queued resource and waits until it is ACTIVE.
#   TPU_TYPE=v6e-16 ZONE=us-east5-b tpu/create.sh [--spot | --reserved] [--wait-max MIN]
# A queued request waits for capacity (WAITING_FOR_RESOURCES, then PROVISIONING); this script
# polls every 30 s for up to --wait-max minutes (default 120) and exits non-zero if the
# request fails. Re-running it for an existing request only waits.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
need TPU_TYPE ZONE

extra=()
wait_max=120
while [[ $# -gt 0 ]]; do
  case "$1" in
    --spot) extra+=(--spot) ;;
    --reserved) extra+=(--reserved) ;;
    --wait-max) wait_max="$2"; shift ;;
    *) die "unknown option $1" ;;
  esac
  shift
done

mapfile -t flags < <(gflags)
state() {
  gcloud compute tpus queued-resources describe "$TPU_NAME" "${flags[@]}" \
    --format='value(state.state)' 2>/dev/null || true
}

if [[ -z "$(state)" ]]; then
  version="$(runtime_version "$TPU_TYPE")"
  echo "requesting $TPU_TYPE as '$TPU_NAME' in $ZONE (image $version)"
  gcloud compute tpus queued-resources create "$TPU_NAME" "${flags[@]}" \
    --node-id="$TPU_NAME" --accelerator-type="$TPU_TYPE" --runtime-version="$version" \
    "${extra[@]}"
fi

deadline=$(( $(date +%s) + wait_max * 60 ))
while true; do
  s="$(state)"
  case "$s" in
    ACTIVE)
      echo "'$TPU_NAME' is ACTIVE"
      gcloud compute tpus tpu-vm describe "$TPU_NAME" "${flags[@]}" \
        --format='value(acceleratorType,networkEndpoints.len())' || true
      exit 0 ;;
    FAILED | SUSPENDED)
      gcloud compute tpus queued-resources describe "$TPU_NAME" "${flags[@]}" >&2 || true
      die "the request is $s; delete it with tpu/teardown.sh" ;;
  esac
  (( $(date +%s) < deadline )) || die "still '${s:-unknown}' after $wait_max min; the request stays queued (tpu/teardown.sh deletes it)"
  echo "$(date +%H:%M:%S) ${s:-unknown}"
  sleep 30
done

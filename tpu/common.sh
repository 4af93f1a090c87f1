# shellcheck shell=bash
# Settings shared by the tpu/ scripts (sourced, not run). Set them in the environment or in
# tpu/config.env (same names, KEY=value lines; see tpu/README.md):
#   TPU_NAME  name of the queued resource and of its slice          (default: nsa-jax)
#   TPU_TYPE  accelerator type: v5litepod-N (v5e), v5p-N, v6e-N       (required)
#   ZONE      a zone that has that type, e.g. us-east5-b, europe-west4-b (required)
#   PROJECT   Google Cloud project                         (default: gcloud's configured one)
#   BUCKET    a GCS bucket every worker mounts at /gcs/BUCKET (checkpoints and metrics must
#             live where every host sees them)                        (optional)

set -euo pipefail

# shellcheck disable=SC2034  # the variables below are used by the scripts that source this
TPU_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034
REPO_DIR="$(cd "$TPU_DIR/.." && pwd)"
if [[ -f "$TPU_DIR/config.env" ]]; then
  # shellcheck source=/dev/null
  source "$TPU_DIR/config.env"
fi

TPU_NAME="${TPU_NAME:-nsa-jax}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null || true)}"
# shellcheck disable=SC2034
REMOTE_DIR="nsa-jax"          # the checkout on each worker, under its home directory
# shellcheck disable=SC2034
LOG_DIR="nsa-jax-logs"        # each worker's logs, under its home directory

die() {
  echo "tpu/$(basename "$0"): $*" >&2
  exit 1
}

need() {
  local name
  for name in "$@"; do
    [[ -n "${!name:-}" ]] || die "set $name (environment or tpu/config.env; see tpu/README.md)"
  done
}

# The TPU software version (VM image) of an accelerator type: the images Cloud TPU lists for
# JAX on each generation.
runtime_version() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v4-*) echo "tpu-ubuntu2204-base" ;;
    *) die "unknown accelerator type '$1': use v5litepod-N (v5e), v5p-N or v6e-N" ;;
  esac
}

# gcloud's common flags for this slice
gflags() {
  local flags=(--zone="$ZONE")
  [[ -n "$PROJECT" ]] && flags+=(--project="$PROJECT")
  printf '%s\n' "${flags[@]}"
}

# Runs a command on every worker of the slice (or on the one given as WORKER=N).
on_workers() {
  local flags
  mapfile -t flags < <(gflags)
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${flags[@]}" --worker="${WORKER:-all}" \
    --command="$1"
}

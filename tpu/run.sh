#!/usr/bin/env bash
# Starts `nsa-jax train` on every worker of the slice, in the background (it survives the SSH
# session), as one multi-host run: NSA_JAX_DISTRIBUTED=1 makes each process find the others
# (jax.distributed on Cloud TPU). Arguments are those of `nsa-jax train`; --out must be one
# directory every worker sees (under /gcs/BUCKET, see tpu/setup.sh).
#   tpu/run.sh --config videonsa-7b-36k --out /gcs/my-bucket/runs/v36k mesh=fsdp=-1 \
#       init_from=/gcs/my-bucket/Qwen2.5-VL-7B-Instruct annotations=/gcs/my-bucket/train.jsonl
# Logs: tpu/logs.sh. Stop: tpu/stop.sh. Running the same command again resumes the run.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
need ZONE
[[ $# -gt 0 ]] || die "give the arguments of nsa-jax train (--config NAME --out DIR ...)"

out=""
args=("$@")
for i in "${!args[@]}"; do
  [[ "${args[$i]}" == "--out" ]] && out="${args[$((i + 1))]:-}"
  [[ "${args[$i]}" == --out=* ]] && out="${args[$i]#--out=}"
done
[[ -n "$out" ]] || die "--out DIR is required"
[[ "$out" == /gcs/* ]] || echo "warning: --out $out is not under /gcs/: every worker must see the same directory" >&2

quoted="$(printf '%q ' "${args[@]}")"
read -r -d '' start <<SCRIPT || true
set -euo pipefail
cd ~/$REMOTE_DIR
if [[ -f ~/$LOG_DIR/train.pid ]] && kill -0 "\$(cat ~/$LOG_DIR/train.pid)" 2>/dev/null; then
  echo "worker \$(hostname): a run is going (pid \$(cat ~/$LOG_DIR/train.pid)); tpu/stop.sh first" >&2
  exit 1
fi
NSA_JAX_DISTRIBUTED=1 nohup .venv/bin/nsa-jax train $quoted > ~/$LOG_DIR/train.log 2>&1 < /dev/null &
echo \$! > ~/$LOG_DIR/train.pid
echo "worker \$(hostname): started (pid \$!)"
SCRIPT
on_workers "$start"
echo "started on every worker; follow with tpu/logs.sh"

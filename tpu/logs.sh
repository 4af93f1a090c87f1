#!/usr/bin/env bash
# Streams the run's log: worker 0's (the one that prints progress and metrics) by default,
# another with WORKER=N, or the last lines of every worker's with --all.
#   tpu/logs.sh            # follow worker 0 (Ctrl-C stops following, not the run)
#   WORKER=3 tpu/logs.sh   # follow worker 3
#   tpu/logs.sh --all      # last 20 lines of each worker's log
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
need ZONE

if [[ "${1:-}" == "--all" ]]; then
  WORKER=all on_workers "echo \"== \$(hostname)\"; tail -n 20 ~/$LOG_DIR/train.log"
else
  WORKER="${WORKER:-0}" on_workers "tail -n +1 -F ~/$LOG_DIR/train.log"
fi

#!/usr/bin/env bash
# Stops the run on every worker (SIGTERM to the process tpu/run.sh started, by its pid). The
# last finished checkpoint stays; tpu/run.sh with the same --out resumes from it.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
need ZONE

on_workers "if [[ -f ~/$LOG_DIR/train.pid ]]; then kill \"\$(cat ~/$LOG_DIR/train.pid)\" 2>/dev/null && echo \"\$(hostname): stopped\" || echo \"\$(hostname): not running\"; rm -f ~/$LOG_DIR/train.pid; fi"

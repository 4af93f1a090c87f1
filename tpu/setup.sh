#!/usr/bin/env bash
# Installs this checkout on every worker of the slice: copies the tracked files of the working
# tree (committed or not), makes a Python 3.11 virtual environment with uv, installs the
# project with its TPU extra (jax[tpu], libtpu), and mounts BUCKET (if set) at /gcs/BUCKET
# with gcsfuse. Safe to run again (e.g. after changing the code).
#   tpu/setup.sh
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
need ZONE

archive="$(mktemp -d)/nsa-jax.tar.gz"
trap 'rm -rf "$(dirname "$archive")"' EXIT
# the working tree's tracked files as they are now
git -C "$REPO_DIR" ls-files -z | tar -C "$REPO_DIR" --null -T - -czf "$archive"
echo "copying $(du -h "$archive" | cut -f1) to every worker of '$TPU_NAME'"
mapfile -t flags < <(gflags)
gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":nsa-jax.tar.gz "${flags[@]}" \
  --worker=all

read -r -d '' install <<SCRIPT || true
set -euo pipefail
mkdir -p ~/$REMOTE_DIR ~/$LOG_DIR
tar -xzf ~/nsa-jax.tar.gz -C ~/$REMOTE_DIR
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
export PATH="\$HOME/.local/bin:\$PATH"
cd ~/$REMOTE_DIR
[[ -d .venv ]] || uv venv --python 3.11 .venv
uv pip install --python .venv/bin/python -e '.[tpu]'
if [[ -n "${BUCKET:-}" ]] && ! mountpoint -q /gcs/${BUCKET:-none}; then
  if ! command -v gcsfuse >/dev/null; then
    echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main" \
      | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
    curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg \
      | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
    sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
  fi
  sudo mkdir -p /gcs/${BUCKET:-none} && sudo chown "\$USER" /gcs/${BUCKET:-none}
  gcsfuse --implicit-dirs ${BUCKET:-none} /gcs/${BUCKET:-none}
fi
.venv/bin/python -c "import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)"
SCRIPT
on_workers "$install"
echo "installed on every worker; run a job with tpu/run.sh"

#!/usr/bin/env bash
# Sets up cloudpc on this Debian/Ubuntu machine and runs the server.
# Installs missing system packages and Rust, builds the release binary, then starts the server
# on 127.0.0.1:7365 with its state in /var/lib/cloudpc (a place QEMU's unprivileged user can reach).
# Extra arguments go to `cloudpc server`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
prepare_server
cat <<'MSG'
cloudpc: starting. On the first start the administrator token is printed below, once.
  In another shell:  export CLOUDPC_TOKEN=<that token>
                     target/release/cloudpc users list
  API: http://127.0.0.1:7365/v1.0/   OpenAPI: http://127.0.0.1:7365/openapi.json
MSG
exec target/release/cloudpc server --listen "${CLOUDPC_LISTEN:-127.0.0.1:7365}" \
    --data-dir "${CLOUDPC_DATA_DIR:-/var/lib/cloudpc/data}" --gallery-dir "$CLOUDPC_GALLERY_DIR" --web-dir web/dist "$@"

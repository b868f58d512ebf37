#!/usr/bin/env bash
# Checks that the OpenAPI document tells the truth about the API: schemathesis reads /openapi.json
# from a real `cloudpc server`, generates requests for every operation (examples, coverage,
# fuzzing and stateful sequences that feed created ids into later calls) and checks every answer
# with all of its checks: no server errors, only documented statuses, bodies and headers as
# documented, invalid input refused, valid input accepted, no answer without authentication,
# 405 with Allow for undocumented methods, deleted resources gone. Any failure fails the script.
#
# Needs python3 with venv (Debian: python3-venv) and PyPI for the first run; the venv is kept in
# the cargo target directory. Fixed seed and example counts, so a run is repeatable and takes
# about a minute on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
SEED=${SCHEMATHESIS_SEED:-7365}
MAX_EXAMPLES=${SCHEMATHESIS_MAX_EXAMPLES:-50}

target=${CARGO_TARGET_DIR:-target}
venv="$target/schemathesis-venv"
if ! "$venv/bin/st" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then
    echo "== schemathesis $SCHEMATHESIS_VERSION into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" || {
        echo "python3 cannot make a venv; install the Debian package python3-venv." >&2
        exit 1
    }
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

echo "== cargo build (the server schemathesis talks to)"
# The same selection as the test suite's `cargo test --workspace`, so the build is reused.
cargo build --locked --workspace --all-targets
bin="$target/debug/cloudpc"

work=$(mktemp -d)
# QEMU's unprivileged user must be able to enter the data directory (the server checks).
chmod 755 "$work"
server_pid=""
# Its own domain prefix, so any VM this server might start is found and removed below.
prefix="cpcst$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')-"
stop() {
    status=$?
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if command -v virsh >/dev/null; then
        for d in $(timeout 120 virsh -c qemu:///system list --all --name 2>/dev/null | grep "^$prefix" || true); do
            timeout 120 virsh -c qemu:///system destroy "$d" >/dev/null 2>&1 || true
            timeout 120 virsh -c qemu:///system undefine --managed-save "$d" >/dev/null 2>&1 || true
        done
    fi
    rm -rf "$work"
    exit "$status"
}
trap stop EXIT INT TERM

# QEMU runs as libvirt-qemu and must be able to reach disks under the data directory.
mkdir -m 755 "$work/data"
# The server's only host has no capacity: a Cloud PC that random requests manage to license and
# target (a SKU, a user, a group, an image, a policy, an assignment, all made by stateful
# sequences) waits for capacity with its spec stored, and no VM is ever made.
cat >"$work/cloudpc.toml" <<'EOF'
[[hosts]]
name = "none"
uri = "qemu:///system"
region = "local"
vcpus = 0
memory_mib = 0
disk_gib = 0
EOF
: >"$work/server.out"
token="cpc_$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
CLOUDPC_ADMIN_TOKEN="$token" CLOUDPC_LOG=warn "$bin" server --config "$work/cloudpc.toml" \
    --listen 127.0.0.1:0 --data-dir "$work/data" --skip-image-test-boot --domain-prefix "$prefix" \
    >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
url=""
for _ in $(seq 300); do
    url=$(sed -n 's/^cloudpc listening on //p' "$work/server.out")
    [ -n "$url" ] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$url" ]; then
    echo "The server did not start:" >&2
    cat "$work/server.err" >&2
    exit 1
fi

# Configuration of one check, for a reason the document cannot express:
# - positive_data_acceptance expects a request that fits the schema to succeed. The operations
#   below take bodies with rules a JSON schema does not state: names that must not be blank or
#   hold control characters, userPrincipalName and skuPartNumber shapes, references to users,
#   groups, SKUs and images that must exist, host paths inside an import directory, a version
#   higher than the image's newest, time zones and naming templates, a network connection's OU
#   inside its domain and the fields its join type needs. They answer 400 with a
#   message naming the field, and 400 is documented for them; only for these is 400 accepted.
#   Every other operation (all reads, deletes and actions) must accept valid input.
cat >"$work/schemathesis.toml" <<'EOF'
# No crash cache in the work tree: every run starts from the seed alone.
[cache]
enabled = false

[[operations]]
include-operation-id = [
    "create_user", "update_user", "create_group", "update_group", "add_member",
    "create_sku", "update_sku", "assign_user_license", "assign_group_license",
    "create_device", "create_version", "upload_device", "upload_version",
    "create_policy", "update_policy", "assign_policy", "rename", "create_token",
    "create_connection", "update_connection",
]
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429", "5xx"]
EOF

echo "== schemathesis $SCHEMATHESIS_VERSION against $url/openapi.json (seed $SEED, $MAX_EXAMPLES examples per operation)"
start=$(date +%s)
"$venv/bin/st" --config-file "$work/schemathesis.toml" run "$url/openapi.json" \
    --checks all \
    --seed "$SEED" \
    --max-examples "$MAX_EXAMPLES" \
    --generation-database none \
    --request-timeout 30 \
    --header "Authorization: Bearer $token" \
    --no-color
echo "== schemathesis passed in $(($(date +%s) - start)) s"

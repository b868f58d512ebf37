#!/usr/bin/env bash
# Runs cloudpc's whole test suite: formatting, lints, unit and integration tests.
# Installs missing system packages first, so it works on a fresh Debian/Ubuntu machine and in CI,
# and starts a local PostgreSQL (see ensure_postgres in lib.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_packages
ensure_node
ensure_rust
setup_host
# A local PostgreSQL for the suite's PostgreSQL pass: the harness creates a fresh database per test
# through this URL (the role cloudpc may create databases).
ensure_postgres
# A Samba AD domain controller on a test network for the network-connection tests (each test
# brings it up and down through scripts/test-dc.sh).
ensure_test_dc_packages
export CLOUDPC_TEST_DATABASE_URL="$CLOUDPC_PG_URL"
drop_test_databases
build_web
export CLOUDPC_TEST_GALLERY="$CLOUDPC_GALLERY_DIR"
# Runs one cargo test command with its output also kept in a log; when it fails, ends the output with
# a digest of each failed test's own output (panic messages, what it printed) without backtrace
# frames: CI shows only the tail of a long log, and a failure's message must be in it.
LOG_DIR=target/test-logs
mkdir -p "$LOG_DIR"
run_tests() {
    local log="$LOG_DIR/$1.log" turns="$PWD/$LOG_DIR/$1-vm-turns.tsv" rc=0
    shift
    : > "$turns"
    CLOUDPC_TEST_TURN_LOG="$turns" "$@" 2>&1 | tee "$log" || rc=$?
    # VM tests run one at a time and take most of the time: which ones, for how long.
    if [ -s "$turns" ]; then
        echo "=== VM turns: $(wc -l < "$turns") tests held the VMs $(awk '{s += $1} END {printf "%.0f", s}' "$turns") s in all; the longest:"
        sort -rn "$turns" | head -15
    fi
    if [ "$rc" -ne 0 ]; then
        echo
        echo "=== FAILURE DIGEST ($log, exit $rc): each failed test's output, backtrace frames left out"
        awk '
            /^---- .* ----$/ { on = 1; n = 0 }
            /^failures:$/ && on { on = 0 }
            on && !/^ *[0-9]+: / && !/^ +at / && n++ < 60 { print }
        ' "$log"
        grep -E '^=== WATCHDOG' "$log" || true
        exit "$rc"
    fi
}
echo "== cargo fmt --check"
cargo fmt --all -- --check
# The store's shared code is included by both backends rather than being a module, so cargo fmt
# does not reach it.
rustfmt --check --edition 2021 --config-path rustfmt.toml crates/cloudpc-store/src/sql/shared.rs
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
# Tests that boot VMs take turns inside the one integration binary; the rest run in parallel.
# The store's own tests run on both backends; the replica tests make their own PostgreSQL database.
run_tests sqlite cargo test --locked --workspace
echo "== integration tests again, every server on PostgreSQL"
# The same suite, VM tests included, with each server on a fresh PostgreSQL database instead of
# its SQLite file (the replica tests ran on PostgreSQL already).
CLOUDPC_TEST_BACKEND=postgresql run_tests postgresql cargo test --locked -p cloudpc --test integration -- --skip replicas::
./scripts/schemathesis.sh

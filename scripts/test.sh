#!/usr/bin/env bash
# Runs cloudpc's whole test suite: formatting, lints, unit and integration tests.
# Installs missing system packages first, so it works on a fresh Debian/Ubuntu machine and in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_packages
ensure_node
ensure_rust
setup_host
build_web
export CLOUDPC_TEST_GALLERY="$CLOUDPC_GALLERY_DIR"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test"
# Tests that boot VMs take turns inside the one integration binary; the rest run in parallel.
cargo test --locked --workspace
./scripts/schemathesis.sh

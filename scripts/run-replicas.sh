#!/usr/bin/env bash
# Runs several cloudpc replicas on this machine, all on one PostgreSQL database: the replicated
# set-up on one host, to try it and test it. Sets up like run.sh (packages, Rust, the host, the
# portal, the release binary), then a local PostgreSQL (ensure_postgres in lib.sh), then starts
# replica i (1..N) on 127.0.0.1:(8080+i). The replicas share one data directory, by default
# /var/lib/cloudpc/replicas and not run.sh's: a server removes at start the image files its
# database does not know, so it must not share one with a server on another database.
#
# The test suite runs this script as written on a prepared machine: CLOUDPC_PREPARED=1 skips the
# set-up, CLOUDPC_BIN names the binary, CLOUDPC_PG_URL a database (else ensure_postgres), and
# CLOUDPC_REPLICA_BASE_PORT moves the ports (replica i on base + i).
#
# Usage: scripts/run-replicas.sh [--replicas N] [--demo] [more `cloudpc server` arguments]
#   --replicas N   how many replicas (default 2)
#   --demo         the quickstart demo (see README), set up by replica 1 only
# Ctrl-C stops every replica; when one exits, the others are stopped too.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

usage() { sed -n 's/^# \{0,1\}//;/^Usage:/,/^Ctrl-C/p' "$0"; }

replicas=2 demo=() args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --replicas) [ $# -ge 2 ] || { usage >&2; exit 2; }; replicas=$2; shift 2 ;;
        --replicas=*) replicas=${1#*=}; shift ;;
        --demo) demo=(--demo); shift ;;
        -h | --help) usage; exit 0 ;;
        *) args+=("$1"); shift ;;
    esac
done
case "$replicas" in
    '' | *[!0-9]* | 0*) echo "cloudpc: --replicas takes a whole number from 1 up, not '$replicas'" >&2; exit 2 ;;
esac

port_of() { echo $((${CLOUDPC_REPLICA_BASE_PORT:-8080} + $1)); }
bin=${CLOUDPC_BIN:-target/release/cloudpc}

# Something already answering on a port would take a replica's health check for its own.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Starts replica $1 in the background with the remaining arguments, its output prefixed with its
# number by a sed that ignores Ctrl-C, so the replica's last words still have somewhere to go.
# The database URL (with its password) goes through the environment, not the command line, so
# the process list does not show it.
pids=()
start_replica() {
    local i=$1
    shift
    CLOUDPC_DATABASE_URL="$CLOUDPC_PG_URL" "$bin" server --listen "127.0.0.1:$(port_of "$i")" \
        --data-dir "${CLOUDPC_DATA_DIR:-/var/lib/cloudpc/replicas}" --gallery-dir "$CLOUDPC_GALLERY_DIR" \
        --web-dir web/dist "$@" > >(trap '' INT && exec sed -u "s/^/[replica $i] /") 2>&1 &
    pids[i]=$!
}

# Waits until replica $1 answers /healthz; fails if it exits first or takes over five minutes.
wait_replica() {
    for _ in $(seq 600); do
        curl -fsS -o /dev/null "http://127.0.0.1:$(port_of "$1")/healthz" 2>/dev/null && return 0
        kill -0 "${pids[$1]}" 2>/dev/null || return 1
        sleep 0.5
    done
    echo "cloudpc: replica $1 did not answer on port $(port_of "$1") within five minutes" >&2
    return 1
}

# SIGTERM, which cloudpc takes as a graceful stop (before it listens, the default: it ends). Ctrl-C
# does not reach the replicas by itself: bash starts background commands with SIGINT ignored.
stop_replicas() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}

# Stops the replicas and waits for every one of them, also through a second Ctrl-C.
finish() {
    local pid
    trap - EXIT
    stop_replicas
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do wait "$pid" 2>/dev/null || true; done
    done
    exit "$1"
}

[ "${CLOUDPC_PREPARED:-}" = 1 ] || prepare_server
[ -n "${CLOUDPC_PG_URL:-}" ] || ensure_postgres
for ((i = 1; i <= replicas; i++)); do
    if port_taken "$(port_of "$i")"; then
        echo "cloudpc: port $(port_of "$i") (replica $i) is in use already" >&2
        exit 1
    fi
done

cat <<MSG
cloudpc: starting $replicas replicas on PostgreSQL. On the first start the administrator token is
  printed below, once, by replica 1; the replicas share the database, so it works with each.
  In another shell:  export CLOUDPC_TOKEN=<that token>
                     $bin --url http://127.0.0.1:$(port_of 1) users list
MSG
trap 'finish 130' INT
trap 'finish 143' TERM
trap 'finish 1' EXIT
# Replica 1 alone first: on an empty database it creates the schema, the administrator token and
# the demo, which the others then find, instead of all of them racing to do it.
start_replica 1 "${demo[@]}" "${args[@]}"
wait_replica 1 || { echo "cloudpc: replica 1 did not start" >&2; finish 1; }
for ((i = 2; i <= replicas; i++)); do start_replica "$i" "${args[@]}"; done
for ((i = 2; i <= replicas; i++)); do
    wait_replica "$i" || { echo "cloudpc: replica $i did not start" >&2; finish 1; }
done
for ((i = 1; i <= replicas; i++)); do
    echo "cloudpc: replica $i: http://127.0.0.1:$(port_of "$i")/   API: http://127.0.0.1:$(port_of "$i")/v1.0/"
done
echo "cloudpc: $replicas replicas run; Ctrl-C stops them all"

# Until the first replica exits; then the others are stopped, and its status is the script's.
status=0
wait -n || status=$?
for ((i = 1; i <= replicas; i++)); do
    kill -0 "${pids[i]}" 2>/dev/null || echo "cloudpc: replica $i exited (status $status); stopping the others" >&2
done
finish "$status"

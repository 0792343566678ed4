#!/usr/bin/env bash
# The same workload against PostgreSQL 15 and against auditrail, one after the other on this
# machine, and the ratio of every figure.
#
#   bench/http-vs-postgres.sh [--events N] [--concurrency C] [--single-seconds S]
#                             [--lookups L] [--count-runs R]
#
# Defaults: N=10000000 (the issue's data set size), C=64, S=10, L=10000, R=50.
# L is five times the two tools' own default: a p99 over 2,000 lookups is the 20th slowest,
# which one scheduling hiccup of this VM's host moves; over 10,000 it is the 100th.
# 1. bench/postgres-baseline.sh: a hash-chained audit table, N events bulk-loaded through the
#    chain trigger, then lookups, 30-day counts and single-event INSERTs; its JSON line is kept.
# 2. `auditrail bench http` (release build): the same N events over HTTP, the same queries and
#    single events, printing each figure with its ratio to PostgreSQL's.
# They run one after the other: PostgreSQL's server stays up, idle, while auditrail runs, so that
# auditrail's lookups, once timed alone (like PostgreSQL's own phase), are timed again in ten
# rounds in turn with as many more of PostgreSQL's (one client each, never both at once). This VM's host moves lookup latencies by half from one
# quarter of an hour to the next (each phase prints the CPU time it stole); lookups timed in
# turn see the same minutes, so their ratio (`lookup_p99_ms, in turn`) is the fair one.
# Output goes to the terminal and to bench/results/<UTC time>.txt.
#
# Requirements: PostgreSQL 15 (apt-get install -y postgresql-15) and a Rust toolchain.

set -euo pipefail

EVENTS=10000000
LOOKUPS=10000
PG_ARGS=()
AR_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --events) EVENTS=$2; shift 2 ;;
        --lookups) LOOKUPS=$2; shift 2 ;;
        --concurrency|--single-seconds|--count-runs)
            PG_ARGS+=("$1" "$2"); AR_ARGS+=("$1" "$2"); shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "http-vs-postgres: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done

PG_ARGS+=(--lookups "$LOOKUPS")
AR_ARGS+=(--lookups "$LOOKUPS")

cd "$(dirname "$0")/.."
mkdir -p bench/results
OUT=bench/results/$(date -u +%Y%m%dT%H%M%SZ).txt
exec > >(tee "$OUT") 2>&1

echo "== host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
echo "== auditrail $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $EVENTS events"
cargo build --release -q -p auditrail

echo
echo "== PostgreSQL 15 =="
PG_JSON=$(mktemp)
PG_LOOKUPS=$(mktemp)
trap 'rm -f "$PG_JSON" "$PG_LOOKUPS"' EXIT
bench/postgres-baseline.sh --events "$EVENTS" "${PG_ARGS[@]}" \
    --json-out "$PG_JSON" --lookups-script "$PG_LOOKUPS" \
    --then bash -c 'echo; echo "== auditrail =="; exec "$@"' auditrail \
    "$PWD/target/release/auditrail" bench http --events "$EVENTS" "${AR_ARGS[@]}" \
    --baseline "$PG_JSON" --baseline-lookups "$PG_LOOKUPS"
echo
echo "(saved to $OUT)"

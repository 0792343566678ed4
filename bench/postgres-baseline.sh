#!/usr/bin/env bash
# PostgreSQL 15 baseline for auditrail's benchmarks.
#
# What it measures (on a throwaway cluster it creates, and deletes on exit):
#   (a) bulk ingest of N events through a SHA-256 hash-chain trigger       -> bulk_events_per_s
#   (b) single-event INSERTs, C concurrent clients, S seconds (pgbench)    -> single_events_per_s, p50/p99 ms
#   (c) patient lookup: a patient's events in the last year, newest first,
#       first 50 bodies, L patients drawn with the workload's skew          -> lookup p50/p99/p999 ms
#   (d) 30-day count grouped by action over the whole table, R runs         -> count30d p50/p99 ms
#   (e) on-disk size of table + TOAST + indexes / N                         -> bytes_per_event
# The last line of output is one JSON object with those figures, for ratio computations.
#
# Requirements (fresh Debian 12):
#     apt-get install -y postgresql-15      # initdb, pg_ctl, postgres, pgbench (+ postgresql-client-15: psql)
# plus coreutils, awk and util-linux (runuser), which every Debian has. No Python needed.
# The packaged cluster (pg_ctlcluster 15 main) is not used or touched; it may stay stopped.
#
# Usage:
#     bench/postgres-baseline.sh [--events N] [--concurrency C] [--single-seconds S] [--lookups L]
#                                [--count-runs R] [--unchained] [--keep]
#                                [--json-out FILE] [--lookups-script FILE] [--then CMD ARGS...]
# or the same through environment variables EVENTS, CONCURRENCY, SINGLE_SECONDS, LOOKUPS, COUNT_RUNS.
# Defaults: N=1000000, C=64, S=10, L=2000, R=50.
# Other environment knobs: PG_BIN (default /usr/lib/postgresql/15/bin), PG_SHARED_BUFFERS (default 1GB),
# BULK_CHUNK (rows per bulk INSERT transaction, default 100000), BENCH_TMPDIR (parent of the temp dir),
# BENCH_RUN_AS (unprivileged user to run the server as when invoked as root; default postgres).
#
# --json-out FILE writes the last line (the JSON figures) to FILE too. --lookups-script FILE writes a
# script there that times N more patient lookups when run as `FILE N` (one millisecond figure per line),
# for as long as the server is up. --then CMD ARGS... (the last option) runs CMD once every figure is
# taken, with the server still up and idle, and stops it afterwards: bench/http-vs-postgres.sh runs
# auditrail's benchmark so, timing its lookups in turn with PostgreSQL's through the script.
#
# Each phase also prints the host's share of the machine: CPU time the hypervisor stole and how often
# a task waited for a CPU (/proc/stat, /proc/pressure/cpu). Both move latencies from run to run.
#
# Durability is like auditrail's: fsync=on, synchronous_commit=on, full_page_writes=on (all defaults).
# The server listens only on a unix socket inside the temp dir (listen_addresses='').
# If run as root, the server runs as an unprivileged user (initdb refuses root): 'postgres' if it exists,
# else a system user 'auditrail-bench' is created, else 'nobody'. Clients (psql, pgbench) run as the caller.
#
# Schema and workload: see the SQL below. In short: table audit_event with a BEFORE INSERT trigger that
# takes a transaction-level advisory lock on the chain head, assigns seq under that lock and sets
# hash = sha256(prev_hash || body::text) with prev_hash the hash of the previous row; the lock is held to
# commit, so chain order = seq order = commit order, even under concurrency (checked at the end).
# Events mirror crates/auditrail/src/generator.rs: 5,000 users, 50,000 patients with log-uniform
# popularity, the same action mix, ~400-byte JSON bodies; occurred_at evenly spaced over the last
# 365 days in seq order. Data is generated server-side (generate_series + random(), setseed for
# determinism) into an UNLOGGED staging table first, so the timed ingest is only the ingest.
#
# The chain lock serialises appends, held through the commit's fsync: (b) is bounded by one commit at a time
# and collapses (a lock convoy) if anything else competes for the CPU, so run it on an otherwise idle machine.
# --unchained adds the same single-insert run into an identical table without the chain, for contrast.
#
# Latencies are client-side pgbench figures over the unix socket (prepared statements), i.e. they
# include the round trip and, for lookups, transferring the 50 bodies.

set -euo pipefail

EVENTS=${EVENTS:-1000000}
CONCURRENCY=${CONCURRENCY:-64}
SINGLE_SECONDS=${SINGLE_SECONDS:-10}
LOOKUPS=${LOOKUPS:-2000}
COUNT_RUNS=${COUNT_RUNS:-50}
UNCHAINED=${UNCHAINED:-0}
KEEP=${KEEP:-0}
JSON_OUT=""
LOOKUPS_SCRIPT=""
THEN=()
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PG_SHARED_BUFFERS=${PG_SHARED_BUFFERS:-1GB}
BULK_CHUNK=${BULK_CHUNK:-100000}
BENCH_RUN_AS=${BENCH_RUN_AS:-postgres}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --events) EVENTS=$2; shift 2 ;;
        --events=*) EVENTS=${1#*=}; shift ;;
        --concurrency) CONCURRENCY=$2; shift 2 ;;
        --concurrency=*) CONCURRENCY=${1#*=}; shift ;;
        --single-seconds) SINGLE_SECONDS=$2; shift 2 ;;
        --single-seconds=*) SINGLE_SECONDS=${1#*=}; shift ;;
        --lookups) LOOKUPS=$2; shift 2 ;;
        --lookups=*) LOOKUPS=${1#*=}; shift ;;
        --count-runs) COUNT_RUNS=$2; shift 2 ;;
        --count-runs=*) COUNT_RUNS=${1#*=}; shift ;;
        --unchained) UNCHAINED=1; shift ;;
        --keep) KEEP=1; shift ;;
        --json-out) JSON_OUT=$2; shift 2 ;;
        --lookups-script) LOOKUPS_SCRIPT=$2; shift 2 ;;
        --then) shift; THEN=("$@"); break ;;
        -h|--help) usage; exit 0 ;;
        *) echo "postgres-baseline: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done

for v in EVENTS CONCURRENCY SINGLE_SECONDS LOOKUPS COUNT_RUNS BULK_CHUNK; do
    val=${!v}
    if ! [[ $val =~ ^[0-9]+$ ]] || [ "$val" -lt 1 ]; then
        echo "postgres-baseline: $v must be a positive integer (got '$val')" >&2
        exit 2
    fi
done

missing=()
for b in initdb pg_ctl postgres psql pgbench; do
    [ -x "$PG_BIN/$b" ] || missing+=("$PG_BIN/$b")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "postgres-baseline: missing PostgreSQL 15 binaries: ${missing[*]}" >&2
    echo "  install them with: apt-get install -y postgresql-15   (or set PG_BIN=/path/to/pg15/bin)" >&2
    exit 2
fi
if ! "$PG_BIN/postgres" --version | grep -q ' 15\.'; then
    echo "postgres-baseline: warning: $("$PG_BIN/postgres" --version) is not PostgreSQL 15" >&2
fi
for t in awk sort date mktemp; do
    command -v "$t" >/dev/null || { echo "postgres-baseline: '$t' not found" >&2; exit 2; }
done

now_ns() { date +%s%N; }
log() { printf '%s\n' "$*"; }

# host_mark, then host_since: the host's share of the machine in between (see the header).
host_mark() {
    local _cpu u n s i w q sq st
    read -r _cpu u n s i w q sq st _ </proc/stat
    HOST_TICKS=$((u + n + s + i + w + q + sq + st)) HOST_STEAL=$st
    HOST_WAIT=$(awk -F'total=' '/^some/ {print $2}' /proc/pressure/cpu 2>/dev/null || echo 0)
    HOST_NS=$(now_ns)
}
host_since() {
    local ticks=$HOST_TICKS steal=$HOST_STEAL wait_us=${HOST_WAIT:-0} ns=$HOST_NS
    host_mark
    awk -v t=$((HOST_TICKS - ticks)) -v s=$((HOST_STEAL - steal)) -v w=$((${HOST_WAIT:-0} - wait_us)) \
        -v ns=$((HOST_NS - ns)) 'BEGIN {
            printf "  host: %.1f%% of CPU time stolen by the hypervisor; some task waited for a CPU %.1f%% of the time\n",
                (t > 0 ? 100 * s / t : 0), (ns > 0 ? 100 * w * 1000 / ns : 0) }'
}

# ---------------------------------------------------------------- cluster setup (as an unprivileged user)
RUN_AS=""
if [ "$(id -u)" -eq 0 ]; then
    command -v runuser >/dev/null || { echo "postgres-baseline: running as root needs runuser (util-linux)" >&2; exit 2; }
    if id "$BENCH_RUN_AS" >/dev/null 2>&1; then
        RUN_AS=$BENCH_RUN_AS
    elif id auditrail-bench >/dev/null 2>&1; then
        RUN_AS=auditrail-bench
    elif command -v useradd >/dev/null && useradd --system --no-create-home --shell /usr/sbin/nologin auditrail-bench 2>/dev/null; then
        RUN_AS=auditrail-bench
    elif id nobody >/dev/null 2>&1; then
        RUN_AS=nobody
    else
        echo "postgres-baseline: running as root and found no unprivileged user to run PostgreSQL as" >&2
        exit 2
    fi
fi

STARTED_IN=$PWD
WORK=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/pgbaseline.XXXXXX")
SRV=$WORK/srv                       # everything the server writes: data directory, socket, log
DATA=$SRV/data
SOCK=$SRV/sock
SERVER_LOG=$SRV/server.log
mkdir -p "$SOCK"
if [ -n "$RUN_AS" ]; then
    chmod 711 "$WORK"               # the server user may traverse; clients (root) keep their files here
    chown -R "$RUN_AS" "$SRV"
fi

as_server() {
    if [ -n "$RUN_AS" ]; then
        (cd "$WORK" && runuser -u "$RUN_AS" -- "$@")
    else
        (cd "$WORK" && "$@")
    fi
}

STARTED=0
CHILD=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$CHILD" ]; then
        kill "$CHILD" 2>/dev/null || true
        wait "$CHILD" 2>/dev/null || true
    fi
    if [ "$STARTED" -eq 1 ]; then
        as_server "$PG_BIN/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    if [ "$KEEP" -eq 1 ]; then
        echo "postgres-baseline: kept $WORK (server stopped)" >&2
    else
        rm -rf "$WORK"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! as_server "$PG_BIN/initdb" -D "$DATA" -U bench --auth=trust -E UTF8 --locale=C --no-sync >"$WORK/initdb.log" 2>&1; then
    cat "$WORK/initdb.log" >&2
    echo "postgres-baseline: initdb failed" >&2
    exit 1
fi

PORT=5432   # only names the socket file inside $SOCK; no TCP listener, so no clash with other servers
cat >>"$DATA/postgresql.conf" <<EOF

# ---- postgres-baseline.sh settings ----
listen_addresses = ''
unix_socket_directories = '$SOCK'
port = $PORT
max_connections = $((CONCURRENCY + 20))
# durable, like auditrail (these are also the defaults)
fsync = on
synchronous_commit = on
full_page_writes = on
wal_level = replica
# what a DBA would set for an ingest-heavy box
shared_buffers = '$PG_SHARED_BUFFERS'
max_wal_size = '4GB'
checkpoint_timeout = '15min'
random_page_cost = 1.1
logging_collector = off
EOF

if ! as_server "$PG_BIN/pg_ctl" -D "$DATA" -l "$SERVER_LOG" -w -t 60 start >/dev/null; then
    cat "$SERVER_LOG" >&2 || true
    echo "postgres-baseline: server did not start" >&2
    exit 1
fi
STARTED=1

export PGHOST=$SOCK PGPORT=$PORT PGUSER=bench PGDATABASE=postgres
"$PG_BIN/psql" -qX -v ON_ERROR_STOP=1 -c "CREATE DATABASE bench" >/dev/null
export PGDATABASE=bench
cd "$WORK"

psql_q() { "$PG_BIN/psql" -qXAt -v ON_ERROR_STOP=1 "$@"; }
# bg OUT CMD...: run a long client command in the background with output to OUT and wait for it, so that
# a signal is handled at once (bash defers traps while a foreground child runs) and cleanup can kill it.
bg() {
    local out=$1 rc=0
    shift
    "$@" >"$out" 2>&1 &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    if [ "$rc" -ne 0 ]; then
        cat "$out" >&2
        echo "postgres-baseline: command failed (exit $rc): $*" >&2
    fi
    return "$rc"
}

log "postgres-baseline: $("$PG_BIN/postgres" --version), data in $WORK${RUN_AS:+ (server runs as $RUN_AS)}"
read -r load1 _ < /proc/loadavg 2>/dev/null || load1=unknown
log "  host: $(nproc 2>/dev/null || echo '?') cores, load average $load1 at start (other CPU work distorts (b) badly: see below)"
log "  events=$EVENTS concurrency=$CONCURRENCY single_seconds=$SINGLE_SECONDS lookups=$LOOKUPS count_runs=$COUNT_RUNS shared_buffers=$PG_SHARED_BUFFERS"

# ---------------------------------------------------------------- schema
psql_q >/dev/null <<'SQL'
CREATE TABLE audit_event (
    seq           bigserial PRIMARY KEY,
    occurred_at   timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    category      text,
    action        text,
    outcome       text,
    user_id       text,
    patient_token bytea,
    source_system text,
    ip            inet,
    body          jsonb NOT NULL,
    prev_hash     bytea,
    hash          bytea NOT NULL
);

-- Hash chain. The advisory lock is the chain-head lock: taken per row, held until the transaction
-- ends, so at most one transaction appends at a time. seq is (re)assigned under the lock, so the
-- previous link is simply the row with the highest seq (rows inserted earlier by the same statement
-- are visible to a row-level BEFORE trigger). The bigserial default is overwritten here.
CREATE FUNCTION audit_event_chain() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    prev bytea;
BEGIN
    PERFORM pg_advisory_xact_lock(727465);
    NEW.seq := nextval('audit_event_seq_seq');
    SELECT e.hash INTO prev FROM audit_event e ORDER BY e.seq DESC LIMIT 1;
    NEW.prev_hash := prev;
    NEW.hash := sha256(coalesce(prev, '\x'::bytea) || convert_to(NEW.body::text, 'UTF8'));
    RETURN NEW;
END
$$;

-- RFC 3339 UTC with milliseconds, as in auditrail events (a function so pgbench scripts need no ':' in them).
CREATE FUNCTION iso_ms(t timestamptz) RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"');

CREATE TRIGGER audit_event_chain BEFORE INSERT ON audit_event
    FOR EACH ROW EXECUTE FUNCTION audit_event_chain();

-- The indexes a DBA would make for the benchmark's queries.
CREATE INDEX audit_event_patient_time ON audit_event (patient_token, occurred_at DESC);
CREATE INDEX audit_event_time         ON audit_event (occurred_at);
CREATE INDEX audit_event_action_time  ON audit_event (action, occurred_at);

-- Same table without the chain (hash = sha256(body) only), for --unchained comparison.
CREATE TABLE audit_event_unchained (LIKE audit_event INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
CREATE SEQUENCE audit_event_unchained_seq OWNED BY audit_event_unchained.seq;
ALTER TABLE audit_event_unchained ALTER seq SET DEFAULT nextval('audit_event_unchained_seq');
ALTER TABLE audit_event_unchained ADD PRIMARY KEY (seq);
CREATE INDEX ON audit_event_unchained (patient_token, occurred_at DESC);
CREATE INDEX ON audit_event_unchained (occurred_at);
CREATE INDEX ON audit_event_unchained (action, occurred_at);
SQL

# ---------------------------------------------------------------- data generation (not timed as ingest)
log "generating $EVENTS events (server-side, seeded) ..."
t0=$(now_ns)
psql_q -v n="$EVENTS" >/dev/null <<'SQL'
SELECT setseed(0.4242);
CREATE UNLOGGED TABLE bench_mix (lo int, hi int, category text, action text, method text, status int, failure bool, has_patient bool);
-- per mille ranges, as in crates/auditrail/src/generator.rs
INSERT INTO bench_mix VALUES
    (  0, 699, 'phi_access',     'patient.read',     'GET',   200, false, true),
    (700, 779, 'phi_access',     'patient.search',   'GET',   200, false, true),
    (780, 829, 'phi_modify',     'patient.update',   'PUT',   200, false, true),
    (830, 879, 'authentication', 'login.success',    'POST',  200, false, false),
    (880, 909, 'authentication', 'login.failure',    'POST',  401, true,  false),
    (910, 929, 'phi_access',     'patient.read',     'GET',   403, true,  true),
    (930, 949, 'export',         'data.export',      'POST',  202, false, true),
    (950, 979, 'authentication', 'session.validate', 'GET',   200, false, false),
    (980, 999, 'configuration',  'settings.update',  'PATCH', 200, false, false);

CREATE UNLOGGED TABLE bench_staging AS
WITH g AS (
    SELECT i, random() AS r_act, random() AS r_pat, random() AS r_user, random() AS r_res, random() AS r_obj
    FROM generate_series(1, :n) AS i
    OFFSET 0
), h AS (
    SELECT i,
           floor(r_user * 5000)::int                                          AS uid,
           least(floor(power(50000::float8, r_pat))::int, 49999)             AS pid,   -- log-uniform
           floor(r_act * 1000)::int                                           AS roll,
           (ARRAY['Observation','ImagingStudy','DiagnosticReport','MedicationRequest','Encounter'])
               [1 + floor(r_res * 5)::int]                                    AS resource,
           floor(r_obj * 10000000)::bigint                                    AS obj,
           now() - interval '365 days' + (i::float8 / :n) * interval '365 days' AS ts
    FROM g
), e AS (
    SELECT h.*, m.category, m.action, m.method, m.status, m.failure, m.has_patient,
           'u' || lpad(uid::text, 6, '0')                                     AS user_id,
           '10.' || uid % 7 || '.' || uid % 251 || '.' || (uid * 7) % 253     AS ip_text,
           'MRN' || lpad(pid::text, 8, '0')                                   AS mrn
    FROM h JOIN bench_mix m ON h.roll BETWEEN m.lo AND m.hi
)
SELECT i,
       ts                                                   AS occurred_at,
       category, action,
       CASE WHEN failure THEN 'failure' ELSE 'success' END  AS outcome,
       user_id,
       CASE WHEN has_patient THEN sha256(convert_to(mrn, 'UTF8')) END AS patient_token,
       'ehr'::text                                          AS source_system,
       ip_text::inet                                        AS ip,
       jsonb_build_object(
           'occurred_at', iso_ms(ts),
           'category',    category,
           'action',      action,
           'outcome',     CASE WHEN failure THEN 'failure' ELSE 'success' END,
           'actor',       jsonb_build_object(
                              'user_id',    user_id,
                              'roles',      jsonb_build_array((ARRAY['physician','nurse','radiologist','annotator','admin'])[1 + uid % 5]),
                              'ip',         ip_text,
                              'session_id', 's' || lpad(to_hex(uid * 7919 + floor(extract(epoch FROM ts) / 3600)::bigint), 8, '0')),
           'source',      jsonb_build_object('system', 'ehr',
                              'site', (ARRAY['main-campus','north-clinic','imaging-center','telehealth'])[1 + uid % 4]),
           'request',     jsonb_build_object('method', method, 'path', '/api/patients/' || pid, 'status', status)
       )
       || CASE WHEN has_patient THEN jsonb_build_object(
              'patient',        jsonb_build_object('id', mrn, 'system', 'urn:oid:2.16.840.1.113883.3.0'),
              'entities',       jsonb_build_array(jsonb_build_object('type', resource, 'id', obj::text, 'role', 'domain')),
              'purpose_of_use', 'TREAT')
          ELSE '{}'::jsonb END
       || CASE WHEN action IN ('patient.update', 'settings.update') THEN jsonb_build_object(
              'changes', jsonb_build_array(jsonb_build_object('field', 'status', 'before', 'preliminary', 'after', 'final')))
          ELSE '{}'::jsonb END                              AS body
FROM e;
ALTER TABLE bench_staging ADD PRIMARY KEY (i);
ANALYZE bench_staging;
SQL
t1=$(now_ns)
# jsonb's text form has a space after every ':' and ','; the compact figure drops them.
read -r avg_body avg_compact < <(psql_q -F ' ' -c "
    SELECT round(avg(octet_length(body::text))),
           round(avg(octet_length(replace(replace(replace(body::text, '\": ', '\":'), ', \"', ',\"'), ', {', ',{'))))
    FROM bench_staging")
log "  generated in $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", (b-a)/1e9}') s; mean body ${avg_compact} bytes as compact JSON (${avg_body} as jsonb text)"

# ---------------------------------------------------------------- (a) bulk ingest through the trigger
log "(a) bulk ingest: $EVENTS events through the hash-chain trigger, $BULK_CHUNK per transaction ..."
{
    echo '\set ON_ERROR_STOP 1'
    lo=1
    while [ "$lo" -le "$EVENTS" ]; do
        hi=$((lo + BULK_CHUNK - 1)); [ "$hi" -gt "$EVENTS" ] && hi=$EVENTS
        echo "INSERT INTO audit_event (occurred_at, category, action, outcome, user_id, patient_token, source_system, ip, body)"
        echo "  SELECT occurred_at, category, action, outcome, user_id, patient_token, source_system, ip, body"
        echo "  FROM bench_staging WHERE i BETWEEN $lo AND $hi ORDER BY i;"
        lo=$((hi + 1))
    done
} >"$WORK/bulk.sql"
psql_q -c CHECKPOINT >/dev/null
host_mark
t0=$(now_ns)
bg "$WORK/bulk.out" "$PG_BIN/psql" -qXAt -v ON_ERROR_STOP=1 -f "$WORK/bulk.sql"
t1=$(now_ns)
bulk_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f", (b-a)/1e9}')
bulk_eps=$(awk -v n="$EVENTS" -v s="$bulk_s" 'BEGIN{printf "%.0f", n/s}')
log "  $EVENTS events in $bulk_s s = $bulk_eps events/s"
host_since

t0=$(now_ns)
psql_q -c "VACUUM (ANALYZE) audit_event" >/dev/null
t1=$(now_ns)
log "  VACUUM ANALYZE afterwards (not counted above): $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", (b-a)/1e9}') s"

# ---------------------------------------------------------------- (e) bytes per event
read -r total heap toast idx < <(psql_q -F ' ' -c "
    SELECT pg_total_relation_size('audit_event'),
           pg_relation_size('audit_event'),
           coalesce(pg_total_relation_size(reltoastrelid), 0),
           pg_indexes_size('audit_event')
    FROM pg_class WHERE oid = 'audit_event'::regclass")
bytes_per_event=$(awk -v t="$total" -v n="$EVENTS" 'BEGIN{printf "%.1f", t/n}')
log "(e) on disk: $total bytes (heap $heap, toast $toast, indexes $idx) = $bytes_per_event bytes/event"

# ---------------------------------------------------------------- helpers for pgbench logs
# pcts FILE P...: nearest-rank percentiles of the latency column (µs) of pgbench per-transaction logs, in ms.
pcts() {
    local files=$1; shift
    # shellcheck disable=SC2086
    cat $files | awk '{print $3}' | sort -n | awk -v ps="$*" '
        {a[NR] = $1}
        END {
            n = split(ps, p, " ")
            out = ""
            for (k = 1; k <= n; k++) {
                if (NR == 0) { v = "null" }
                else {
                    i = int(p[k] * NR); if (i < p[k] * NR) i++; if (i < 1) i = 1
                    v = sprintf("%.3f", a[i] / 1000)
                }
                out = out (k > 1 ? " " : "") v
            }
            print out
        }'
}
PGB=("$PG_BIN/pgbench" -n -M prepared)
tps_of() { awk '/^tps = / {printf "%.1f\n", $3; exit}' "$1"; }

# ---------------------------------------------------------------- (c) patient lookups
cat >"$WORK/lookup.sql" <<'EOF'
\set u random(0, 1048575)
\set pid least(int(pow(50000, :u / 1048576.0)), 49999)
SELECT body FROM audit_event
 WHERE patient_token = sha256(convert_to('MRN' || lpad(:pid::text, 8, '0'), 'UTF8'))
   AND occurred_at >= now() - interval '365 days'
 ORDER BY occurred_at DESC
 LIMIT 50;
EOF
# The same warm-up as `auditrail bench http`: a tenth as many lookups, at least one.
warm=$((LOOKUPS / 10 > 0 ? LOOKUPS / 10 : 1))
bg "$WORK/warm.out" "${PGB[@]}" -c 1 -j 1 -t "$warm" -f "$WORK/lookup.sql"
log "(c) patient lookups: $LOOKUPS sequential (1 client, after $warm warm-up), client-side latency over the unix socket ..."
host_mark
bg "$WORK/lookup.out" "${PGB[@]}" -c 1 -j 1 -t "$LOOKUPS" -f "$WORK/lookup.sql" --log --log-prefix="$WORK/lookup"
read -r lookup_p50 lookup_p99 lookup_p999 < <(pcts "$WORK/lookup.*[0-9]" 0.5 0.99 0.999)
log "  p50 $lookup_p50 ms, p99 $lookup_p99 ms, p99.9 $lookup_p999 ms"
host_since
if [ -n "$LOOKUPS_SCRIPT" ]; then
    cat >"$LOOKUPS_SCRIPT" <<EOF
#!/usr/bin/env bash
# Times \$1 more patient lookups against postgres-baseline.sh's server (while it is up), as in (c);
# prints each one's milliseconds on a line. One more runs first, untimed: each run is a new
# connection, whose first query also prepares the statement.
set -euo pipefail
export PGHOST=$SOCK PGPORT=$PORT PGUSER=bench PGDATABASE=bench
turn=\$(mktemp -d "$WORK/turn.XXXXXX")
"$PG_BIN/pgbench" -n -M prepared -c 1 -j 1 -t "\$((\$1 + 1))" -f "$WORK/lookup.sql" --log --log-prefix="\$turn/lookup" >"\$turn/out" 2>&1 || { cat "\$turn/out" >&2; exit 1; }
cat "\$turn"/lookup.* | awk 'NR > 1 {printf "%.3f\\n", \$3 / 1000}'
rm -rf "\$turn"
EOF
    chmod +x "$LOOKUPS_SCRIPT"
fi

# ---------------------------------------------------------------- (d) 30-day count by action
cat >"$WORK/count30.sql" <<'EOF'
SELECT action, count(*) FROM audit_event
 WHERE occurred_at >= now() - interval '30 days'
 GROUP BY action;
EOF
bg "$WORK/warm.out" "${PGB[@]}" -c 1 -j 1 -t 2 -f "$WORK/count30.sql"
log "(d) 30-day count by action: $COUNT_RUNS runs ..."
host_mark
bg "$WORK/count30.out" "${PGB[@]}" -c 1 -j 1 -t "$COUNT_RUNS" -f "$WORK/count30.sql" --log --log-prefix="$WORK/count30"
read -r count_p50 count_p99 < <(pcts "$WORK/count30.*[0-9]" 0.5 0.99)
plan=$(psql_q -c "EXPLAIN (COSTS OFF) SELECT action, count(*) FROM audit_event WHERE occurred_at >= now() - interval '30 days' GROUP BY action" | tr -s ' ' | paste -sd'|' -)
log "  p50 $count_p50 ms, p99 $count_p99 ms  (plan: $plan)"
host_since

# ---------------------------------------------------------------- (b) single-event INSERTs
NSTAGE=$EVENTS
single_insert_sql() {
    cat <<EOF
\set k random(1, $NSTAGE)
INSERT INTO $1 (occurred_at, category, action, outcome, user_id, patient_token, source_system, ip, body$2)
SELECT now(), category, action, outcome, user_id, patient_token, source_system, ip,
       jsonb_set(body, '{occurred_at}', to_jsonb(iso_ms(now())))$3
  FROM bench_staging WHERE i = :k;
EOF
}
single_insert_sql audit_event "" "" >"$WORK/single.sql"
psql_q -c CHECKPOINT >/dev/null
before=$(psql_q -c "SELECT count(*) FROM audit_event")
log "(b) single-event INSERTs: $CONCURRENCY clients, 2 threads, ${SINGLE_SECONDS} s, one event per transaction ..."
host_mark
bg "$WORK/single.out" "${PGB[@]}" -c "$CONCURRENCY" -j 2 -T "$SINGLE_SECONDS" -f "$WORK/single.sql" --log --log-prefix="$WORK/single"
single_eps=$(tps_of "$WORK/single.out")
read -r single_p50 single_p99 < <(pcts "$WORK/single.*[0-9]" 0.5 0.99)
after=$(psql_q -c "SELECT count(*) FROM audit_event")
log "  $single_eps events/s, p50 $single_p50 ms, p99 $single_p99 ms ($((after - before)) rows added)"
host_since

extra_json=""
if [ "$UNCHAINED" -eq 1 ]; then
    single_insert_sql audit_event_unchained ", hash" ", sha256(convert_to(body::text, 'UTF8'))" >"$WORK/unchained.sql"
    psql_q -c CHECKPOINT >/dev/null
    log "(b') same, into an identical table without the chain trigger (hash = sha256(body) only) ..."
    bg "$WORK/unchained.out" "${PGB[@]}" -c "$CONCURRENCY" -j 2 -T "$SINGLE_SECONDS" -f "$WORK/unchained.sql" --log --log-prefix="$WORK/unchained"
    un_eps=$(tps_of "$WORK/unchained.out")
    read -r un_p50 un_p99 < <(pcts "$WORK/unchained.*[0-9]" 0.5 0.99)
    log "  $un_eps events/s, p50 $un_p50 ms, p99 $un_p99 ms"
    extra_json=$(printf ',"unchained_single_events_per_s":%s,"unchained_single_p50_ms":%s,"unchained_single_p99_ms":%s' "$un_eps" "$un_p50" "$un_p99")
fi

# ---------------------------------------------------------------- chain check (not timed)
broken=$(psql_q -c "
    SELECT count(*) FROM (
        SELECT prev_hash, hash, body, lag(hash) OVER (ORDER BY seq) AS expect_prev FROM audit_event) x
    WHERE prev_hash IS DISTINCT FROM expect_prev
       OR hash <> sha256(coalesce(prev_hash, '\x'::bytea) || convert_to(body::text, 'UTF8'))")
rows=$(psql_q -c "SELECT count(*) FROM audit_event")
if [ "$broken" -ne 0 ]; then
    echo "postgres-baseline: hash chain check FAILED: $broken of $rows rows do not link" >&2
    exit 1
fi
log "hash chain check: all $rows rows link to their predecessor and hash correctly"

figures=$(printf '{"system":"postgresql-15","events":%s,"bulk_events_per_s":%s,"single_events_per_s":%s,"single_p50_ms":%s,"single_p99_ms":%s,"lookup_p50_ms":%s,"lookup_p99_ms":%s,"lookup_p999_ms":%s,"count30d_p50_ms":%s,"count30d_p99_ms":%s,"bytes_per_event":%s%s}' \
    "$EVENTS" "$bulk_eps" "$single_eps" "$single_p50" "$single_p99" \
    "$lookup_p50" "$lookup_p99" "$lookup_p999" "$count_p50" "$count_p99" "$bytes_per_event" "$extra_json")
if [ -n "$JSON_OUT" ]; then
    printf '%s\n' "$figures" >"$JSON_OUT"
fi
printf '%s\n' "$figures"
if [ ${#THEN[@]} -gt 0 ]; then
    # The staging table (6 GB at 10M events) is no longer needed: dropped, with a checkpoint, so
    # that the page cache it held is free for the other program, as it would be had this script
    # ended. Without this, a 10M-event run on a 24 GiB machine left too little memory for both.
    psql_q -c "DROP TABLE bench_staging" -c CHECKPOINT >/dev/null
    # Run from where this script was started (this script moved into $WORK); cleanup stops the server.
    cd "$STARTED_IN"
    "${THEN[@]}"
fi

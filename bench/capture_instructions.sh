#!/usr/bin/env bash
# What capture costs the server per writer transaction, in instructions (valgrind's callgrind):
# unlike transactions per second, the count is the same from run to run and whatever else the
# machine is doing, so it shows the effect of a change to the capture path (bench/README.md,
# "Writer path"). Runs a scratch cluster of its own, on a port of its own; needs the PostgreSQL
# server binaries and valgrind (Debian: postgresql-15, valgrind).
#
#     bash bench/capture_instructions.sh [PG_BINDIR]      # default /usr/lib/postgresql/15/bin
#     CAPTURE_PARTS=1 bash bench/capture_instructions.sh  # and what each part of the event row costs
#
# Method: the schema as `outbox migrate` installs it, 1,000 jobs of 10 variants; then a
# single-user backend runs N single-variant update transactions under callgrind (prepared, status
# flipped, so each is captured), with the capture triggers enabled, with no trigger, and with each
# of the two floors of bench/capture_floors.sql (what any capture by a PL/pgSQL row trigger costs).
# The difference between N = 2,500 and N = 500 leaves out start-up; divided by 2,000 it is the
# cost of one transaction; a configuration minus no trigger is what it adds. When the server has
# PgQ (Debian: postgresql-15-pgq3), its C trigger pgq.logutriga is measured too, queueing every
# update as bench/compare.py installs it. CAPTURE_PARTS=1 then takes the event row apart, one
# part at a time and cumulatively, counting capture again after each (docs/decisions/0016).
set -euo pipefail

BIN=${1:-/usr/lib/postgresql/15/bin}
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/outbox-capture-instructions.XXXXXX)
PORT=54991
AS=()
if [ "$(id -u)" = 0 ]; then
    chown postgres "$WORK"
    AS=(runuser -u postgres --)
fi
cleanup() { "${AS[@]}" "$BIN/pg_ctl" -D "$WORK/data" stop -m fast >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT

"${AS[@]}" "$BIN/initdb" -D "$WORK/data" -A trust -U postgres >/dev/null
"${AS[@]}" "$BIN/pg_ctl" -D "$WORK/data" -o "-p $PORT -k $WORK -c listen_addresses=127.0.0.1" -l "$WORK/log" -w start >/dev/null
URL="postgresql://postgres@127.0.0.1:$PORT/postgres"
(cd "$HERE" && OUTBOX_DATABASE_URL=$URL python3 -m processor.cli migrate >/dev/null)
psql -q -v ON_ERROR_STOP=1 "$URL" -f "$HERE/bench/capture_floors.sql"
PGQ=$(psql -qAt "$URL" -c "SELECT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pgq')")
if [ "$PGQ" = t ]; then
    psql -q -v ON_ERROR_STOP=1 "$URL" >/dev/null <<'SQL'
CREATE EXTENSION pgq;
SELECT pgq.create_queue('bench_variants');
CREATE TRIGGER bench_pgq_variants AFTER UPDATE ON jobs_variants
    FOR EACH ROW EXECUTE FUNCTION pgq.logutriga('bench_variants');
ALTER TABLE jobs_variants DISABLE TRIGGER bench_pgq_variants;
SQL
fi
psql -q "$URL" <<'SQL'
INSERT INTO jobs (job_id, status) SELECT gen_random_uuid(), 'queued' FROM generate_series(1, 1000);
INSERT INTO jobs_variants (job_variants_id, job_id, status)
    SELECT gen_random_uuid(), job_id, 'queued' FROM jobs, generate_series(1, 10);
CREATE TABLE bench_variants AS SELECT row_number() OVER () AS i, job_variants_id AS id FROM jobs_variants;
ALTER TABLE bench_variants ADD PRIMARY KEY (i);
VACUUM ANALYZE;
SQL
"${AS[@]}" "$BIN/pg_ctl" -D "$WORK/data" -w stop >/dev/null

for n in 500 2500; do
    python3 - "$n" > "$WORK/updates.$n.sql" <<'PY'
import random, sys
n = int(sys.argv[1])
rng = random.Random(n)
print("PREPARE u(bigint) AS UPDATE jobs_variants SET status = CASE WHEN status = 'running' THEN 'done' "
      "ELSE 'running' END, current_step = 'detect' WHERE job_variants_id = (SELECT id FROM bench_variants WHERE i = $1);")
for _ in range(n):
    print(f"EXECUTE u({rng.randint(1, 10000)});")
PY
done
[ ${#AS[@]} -eq 0 ] || chown -R postgres "$WORK"

# A single-user backend on the scratch database, statements on stdin.
SINGLE=("$BIN/postgres" --single -D "$WORK/data" -c synchronous_commit=off postgres)

# Which triggers each configuration enables: a statement per line, as the single-user backend reads them.
only() {
    echo "ALTER TABLE jobs_variants DISABLE TRIGGER USER;"
    for name in "$@"; do echo "ALTER TABLE jobs_variants ENABLE TRIGGER $name;"; done
}

per_transaction() {  # $@: the triggers to enable
    local counts=()
    for n in 500 2500; do
        only "$@" | "${AS[@]}" "${SINGLE[@]}" >/dev/null 2>&1
        "${AS[@]}" valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.$n" "${SINGLE[@]}" \
            < "$WORK/updates.$n.sql" > /dev/null 2> "$WORK/valgrind.$n"
        counts+=("$(grep -oP 'Collected : \K[0-9]+' "$WORK/valgrind.$n")")
    done
    echo $(( (counts[1] - counts[0]) / 2000 ))
}

with=$(per_transaction outbox_capture_variant_insert_delete outbox_capture_variant_update)
without=$(per_transaction)
empty=$(per_transaction bench_floor_empty_trigger)
bare=$(per_transaction bench_floor_bare_insert)
echo "machine: $(nproc) cores, $("$BIN/postgres" --version), valgrind $(valgrind --version)"
echo "command: bash bench/capture_instructions.sh $BIN"
printf 'single-variant update transaction, server instructions: without capture %d, with capture %d, capture adds %d\n' \
    "$without" "$with" "$((with - without))"
printf 'the floors (bench/capture_floors.sql): an empty trigger adds %d, a bare-insert trigger adds %d\n' \
    "$((empty - without))" "$((bare - without))"
if [ "$PGQ" = t ]; then
    pgq=$(per_transaction bench_pgq_variants)
    printf "PgQ's C trigger (pgq.logutriga) adds %d\n" "$((pgq - without))"
else
    echo "PgQ: not measured, the server has no pgq extension (Debian: apt-get install postgresql-15-pgq3)"
fi

# The event row, part by part: each step changes the scratch schema (the server runs for it), then
# capture is counted again; the differences are what the parts cost a writer's transaction.
alter() {
    "${AS[@]}" "$BIN/pg_ctl" -D "$WORK/data" -o "-p $PORT -k $WORK -c listen_addresses=127.0.0.1" -l "$WORK/log" -w start >/dev/null
    psql -q -v ON_ERROR_STOP=1 "$URL" -c "$1"
    "${AS[@]}" "$BIN/pg_ctl" -D "$WORK/data" -w stop >/dev/null
}
# SQL that replaces, in the update trigger's function, $1 by $2.
rewrite() {
    printf "DO \$do\$ BEGIN EXECUTE replace(pg_get_functiondef('outbox_capture_variant_update'::regproc), %s, %s); END \$do\$" \
        "\$a\$$1\$a\$" "\$b\$$2\$b\$"
}
if [ -n "${CAPTURE_PARTS:-}" ]; then
    previous=$with
    part() {  # $1: what is taken away; $2: the SQL that takes it away
        alter "$2"
        local now
        now=$(per_transaction outbox_capture_variant_insert_delete outbox_capture_variant_update)
        printf '  without %s: capture adds %d (%d less)\n' "$1" "$((now - without))" "$((previous - now))"
        previous=$now
    }
    echo "capture, the event row taken apart (cumulative):"
    part "the variant_id index" "DROP INDEX outbox_events_variant_id_idx"
    part "the primary key (event_id, segment)" "ALTER TABLE outbox_events DROP CONSTRAINT outbox_events_pkey"
    part "the trace context (current_setting)" \
        "$(rewrite "nullif(current_setting('outbox.traceparent', true), '')" "NULL")"
    part "the version sequence (nextval)" "$(rewrite "nextval('outbox_variant_versions')" "1")"
    part "the segments (one plain table, the position index kept)" \
        "BEGIN; ALTER TABLE outbox_events RENAME TO outbox_events_segmented;
         CREATE TABLE outbox_events (LIKE outbox_events_segmented INCLUDING DEFAULTS INCLUDING IDENTITY);
         CREATE INDEX outbox_events_plain_position_idx ON outbox_events (partition, txid, event_id); COMMIT"
    part "the position index: no index left" "DROP INDEX outbox_events_plain_position_idx"
    part "the first-capture test (current_setting, set_config)" \
        "$(rewrite "AND current_setting('outbox.captured', true) IS DISTINCT FROM 'on'
       AND set_config('outbox.captured', 'on', true) = 'on'" "")"
fi

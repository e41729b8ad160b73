#!/usr/bin/env bash
# Snapshot benchmark: ROWS engagement_events read by `COPY (SELECT … ORDER BY
# id) TO STDOUT (FORMAT binary)` through psql (the ceiling: PostgreSQL's own
# fastest way out of the table), by `pgfanout snapshot --log-only` (COPY,
# decode, broker) and by `pgfanout snapshot` (broker, enrichment and every
# sink). Same table, same run, TCP loopback; prints rows/s, each as a
# fraction of COPY's, pgfanout's peak RSS (memory stays bounded by a few
# batches per worker, whatever ROWS is) and CPU seconds, and the CPU seconds
# every program on the machine spent during each pgfanout run (where the two
# cores went).
#
#   benches/snapshot.sh                          1,000,000 rows, 2 workers
#   ROWS=200000 WORKERS=4 benches/snapshot.sh
set -euo pipefail
# Own run directory, so a bench can run beside a test run (set before
# common.sh, which defaults it).
export PGFANOUT_RUN_DIR="${PGFANOUT_RUN_DIR:-/tmp/pgfanout-bench}"
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib/common.sh"
source "$PGFANOUT_ROOT/scripts/lib/bench.sh"
cd "$PGFANOUT_ROOT"

ROWS="${ROWS:-1000000}"
WORKERS="${WORKERS:-2}"
export PGFANOUT_PG_VERSIONS="${PGFANOUT_PG_VERSIONS:-17}"
ensure_rust
scripts/services install
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PGFANOUT_CACHE/target}"
cargo build --release --locked --bin pgfanout
BIN="$CARGO_TARGET_DIR/release/pgfanout"

# measure OUT CMD…: runs CMD with stdout to OUT; prints "<wall ms> <peak RSS
# kB> <CPU s>" (the CPU of CMD itself, user + system).
measure() {
  python3 - "$@" <<'PY'
import resource, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.monotonic()
with open(out, "wb") as f:
    rc = subprocess.run(cmd, stdout=f).returncode
ms = int((time.monotonic() - t0) * 1000)
if rc:
    sys.exit(f"{cmd[0]} exited with {rc}")
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(ms, ru.ru_maxrss, round(ru.ru_utime + ru.ru_stime, 1))
PY
}

bench() {
  local v="${PGFANOUT_PG_VERSIONS%% *}"
  local url_var="PGFANOUT_PG${v}_URL" bin_var="PGFANOUT_PG${v}_BIN"
  local admin="${!url_var}" pgbin="${!bin_var}"
  local db="${admin%/*}/snapbench"
  "$pgbin/psql" -qX "$admin" -c "CREATE DATABASE snapbench" >/dev/null
  local conf="$PGFANOUT_RUN_DIR/snapbench.toml"
  cat >"$conf" <<TOML
[source]
url = "$db"
slot = "snapbench"
publication = "snapbench"
[log]
brokers = "$PGFANOUT_KAFKA_BROKERS"
topic_prefix = "snapbench."
[clickhouse]
url = "$PGFANOUT_CLICKHOUSE_URL"
database = "snapbench"
[redis]
url = "$PGFANOUT_REDIS_URL"
key_prefix = "snapbench:"
[http]
url = "$PGFANOUT_HTTP_URL/snapbench"
secret = "$PGFANOUT_HTTP_SECRET"
[metrics]
listen = ""
TOML
  RUST_LOG=warn "$BIN" -c "$conf" init
  RUST_LOG=warn "$BIN" -c "$conf" generate --events 0 --contents 50 >/dev/null
  local psql=("$pgbin/psql" -qXAt -v ON_ERROR_STOP=1 "$db")
  log "writing $ROWS rows"
  "${psql[@]}" -c "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
    SELECT (ARRAY(SELECT id FROM content ORDER BY id))[1 + g % 50], gen_random_uuid(),
           (ARRAY['play', 'pause', 'finish', 'click'])[1 + g % 4], now() - (g % 3600) * interval '1 second',
           CASE WHEN g % 10 = 0 THEN NULL ELSE (g * 7919) % 600000 END, 'dev-' || (g % 5),
           jsonb_build_object('source', 'bench', 'n', g)
    FROM generate_series(1, $ROWS::int8) g" >/dev/null
  "${psql[@]}" -c "VACUUM ANALYZE engagement_events" >/dev/null
  local copy_sql="COPY (SELECT id, content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload
    FROM engagement_events ORDER BY id) TO STDOUT (FORMAT binary)"
  # `init` created the slot; the snapshot creates its own.
  reset() {
    "${psql[@]}" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'snapbench'" >/dev/null
    "${psql[@]}" -c "DELETE FROM pgfanout_state.snapshot_chunks; DELETE FROM pgfanout_state.snapshots" >/dev/null 2>&1 || true
  }
  local copy1 copy2 logonly full
  copy1=$(measure /dev/null "$pgbin/psql" -qX "$db" -c "$copy_sql")
  reset
  cpu_snapshot >"$PGFANOUT_RUN_DIR/cpu-0"
  logonly=$(RUST_LOG=warn measure "$PGFANOUT_RUN_DIR/snapbench-logonly.json" \
    "$BIN" -c "$conf" snapshot --log-only --workers "$WORKERS")
  cpu_snapshot >"$PGFANOUT_RUN_DIR/cpu-1"
  log "snapshot --log-only: pgfanout itself $(cut -d' ' -f3 <<<"$logonly") CPU s; the other programs:"
  cpu_between "$PGFANOUT_RUN_DIR/cpu-0" "$PGFANOUT_RUN_DIR/cpu-1" $(( $(cut -d' ' -f1 <<<"$logonly") / 1000 ))
  reset
  cpu_snapshot >"$PGFANOUT_RUN_DIR/cpu-2"
  full=$(RUST_LOG=warn measure "$PGFANOUT_RUN_DIR/snapbench-full.json" "$BIN" -c "$conf" snapshot --workers "$WORKERS")
  cpu_snapshot >"$PGFANOUT_RUN_DIR/cpu-3"
  log "snapshot with every sink: pgfanout itself $(cut -d' ' -f3 <<<"$full") CPU s; the other programs:"
  cpu_between "$PGFANOUT_RUN_DIR/cpu-2" "$PGFANOUT_RUN_DIR/cpu-3" $(( $(cut -d' ' -f1 <<<"$full") / 1000 ))
  copy2=$(measure /dev/null "$pgbin/psql" -qX "$db" -c "$copy_sql")

  python3 - "$ROWS" "$v" "$WORKERS" "$copy1" "$copy2" "$logonly" "$full" "$PGFANOUT_RUN_DIR" <<'PY'
import json, sys
rows, v, workers, copy1, copy2, logonly, full, run_dir = sys.argv[1:]
rows = int(rows)
for kind in ("logonly", "full"):
    read = json.load(open(f"{run_dir}/snapbench-{kind}.json"))["rows"]
    if read < rows:
        sys.exit(f"pgfanout snapshot ({kind}) read {read} rows, expected {rows}")
ms = lambda s: int(s.split()[0])
rss = lambda s: int(s.split()[1]) / 1024
cpu = lambda s: float(s.split()[2])
rate = lambda m: rows / (m / 1000)
ceiling = rate((ms(copy1) + ms(copy2)) / 2)
print(f"PostgreSQL {v}, {rows} rows, {workers} workers, TCP loopback, "
      f"{open('/proc/cpuinfo').read().count('processor')} cores")
print(f"{'COPY … (FORMAT binary) via psql (ceiling)':44} {ceiling:>10,.0f} rows/s   "
      f"(runs: {rate(ms(copy1)):,.0f} and {rate(ms(copy2)):,.0f})")
for name, r in (("pgfanout snapshot --log-only (broker only)", logonly), ("pgfanout snapshot (log + every sink)", full)):
    print(f"{name:44} {rate(ms(r)):>10,.0f} rows/s   ratio {rate(ms(r)) / ceiling:.3f} of COPY, "
          f"peak RSS {rss(r):.0f} MB, {cpu(r) / rows * 1e6:.1f} µs CPU per row")
PY
}
with_services bench

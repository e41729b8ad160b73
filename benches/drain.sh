#!/usr/bin/env bash
# Drain benchmark: a backlog of ROWS engagement_events in one slot, read by
# pg_recvlogical (the ceiling: the walsender decoding pgoutput), by pgfanout's
# source path alone (`pgfanout drain`), and by the whole pipeline with every
# sink on (`pgfanout run`, timed until the slot is acknowledged past the
# backlog). Same backlog, same run, same transport (TCP loopback); prints
# rows/s, the ratios and pgfanout's peak and final RSS.
#
#   benches/drain.sh                      1,000,000 rows in one transaction
#   ROWS=200000 TX_ROWS=100 benches/drain.sh   200k rows in 100-row transactions
set -euo pipefail
# Own run directory, so a bench can run beside a test run (set before
# common.sh, which defaults it).
export PGFANOUT_RUN_DIR="${PGFANOUT_RUN_DIR:-/tmp/pgfanout-bench}"
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib/common.sh"
cd "$PGFANOUT_ROOT"

ROWS="${ROWS:-1000000}"
TX_ROWS="${TX_ROWS:-$ROWS}"
export PGFANOUT_PG_VERSIONS="${PGFANOUT_PG_VERSIONS:-17}"
ensure_rust
scripts/services install
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PGFANOUT_CACHE/target}"
cargo build --release --locked --bin pgfanout
BIN="$CARGO_TARGET_DIR/release/pgfanout"

# Cumulative CPU ticks per program name (all processes of the same name summed).
cpu_snapshot() {
  for f in /proc/[0-9]*/stat; do
    awk '{sub(/^[0-9]+ \(/, ""); name = $0; sub(/\).*/, "", name); gsub(/ /, "_", name); n = split($0, a, ") "); split(a[n], b, " "); print name, b[12] + b[13]}' "$f" 2>/dev/null
  done | awk '{t[$1] += $2} END {for (k in t) print k, t[k]}'
}

bench() {
  local v="${PGFANOUT_PG_VERSIONS%% *}"
  local url_var="PGFANOUT_PG${v}_URL" bin_var="PGFANOUT_PG${v}_BIN"
  local admin="${!url_var}" pgbin="${!bin_var}"
  local db="${admin%/*}/bench"
  "$pgbin/psql" -qX "$admin" -c "CREATE DATABASE bench" >/dev/null
  local conf="$PGFANOUT_RUN_DIR/bench.toml" metrics_port
  metrics_port=$(free_ports 1)
  cat >"$conf" <<TOML
[source]
url = "$db"
slot = "full"
publication = "bench"
[log]
brokers = "$PGFANOUT_KAFKA_BROKERS"
topic_prefix = "bench."
[clickhouse]
url = "$PGFANOUT_CLICKHOUSE_URL"
database = "bench"
[redis]
url = "$PGFANOUT_REDIS_URL"
key_prefix = "bench:"
[http]
url = "$PGFANOUT_HTTP_URL/bench"
secret = "$PGFANOUT_HTTP_SECRET"
[metrics]
listen = "127.0.0.1:$metrics_port"
TOML
  RUST_LOG=warn "$BIN" -c "$conf" init
  local psql=("$pgbin/psql" -qXAt "$db")
  "${psql[@]}" -c "SELECT pg_create_logical_replication_slot('recv', 'pgoutput')" >/dev/null
  "${psql[@]}" -c "SELECT pg_create_logical_replication_slot('drain', 'pgoutput')" >/dev/null
  "${psql[@]}" -c "INSERT INTO content VALUES ('00000000-0000-0000-0000-000000000001', 'b', 'Bench', 'podcast', 1200, now())"

  log "writing $ROWS rows in transactions of $TX_ROWS"
  local done=0 n
  while (( done < ROWS )); do
    n=$(( ROWS - done < TX_ROWS ? ROWS - done : TX_ROWS ))
    "${psql[@]}" -c "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
      SELECT '00000000-0000-0000-0000-000000000001', gen_random_uuid(), 'play', now(), (g % 600000), 'web', '{\"source\": \"bench\"}'
      FROM generate_series(1, $n) g" >/dev/null
    done=$(( done + n ))
  done
  local end; end=$("${psql[@]}" -c "SELECT pg_current_wal_insert_lsn()")
  log "backlog ends at $end"

  local t0 t1 recv_ms drain_ms full_ms
  t0=$(now_ms)
  "$pgbin/pg_recvlogical" -d "$db" --slot recv --start --endpos "$end" --no-loop \
    -o proto_version=1 -o publication_names=bench -f /dev/null
  t1=$(now_ms); recv_ms=$(( t1 - t0 ))

  t0=$(now_ms)
  RUST_LOG=warn PGFANOUT_SOURCE__SLOT=drain "$BIN" -c "$conf" drain --until "$end" >&2
  t1=$(now_ms); drain_ms=$(( t1 - t0 ))

  cpu_snapshot >"$PGFANOUT_RUN_DIR/cpu-before"
  t0=$(now_ms)
  RUST_LOG=warn "$BIN" -c "$conf" run 2>"$PGFANOUT_RUN_DIR/logs/bench-run.log" &
  local pid=$! hwm=0 rss=0
  while :; do
    local confirmed
    confirmed=$("${psql[@]}" -c "SELECT confirmed_flush_lsn >= '$end' FROM pg_replication_slots WHERE slot_name = 'full'")
    [[ "$confirmed" == t ]] && break
    kill -0 "$pid" 2>/dev/null || die "pgfanout run exited; see $PGFANOUT_RUN_DIR/logs/bench-run.log"
    sleep 0.1
  done
  t1=$(now_ms); full_ms=$(( t1 - t0 ))
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  # Where the time went: seconds each sink spent flushing (they run
  # concurrently after the broker, so the slowest one bounds the rate).
  curl -fsS "http://127.0.0.1:$metrics_port/metrics" \
    | awk '/^pgfanout_sink_flush_seconds_(sum|count)/ {print "  " $0}' >&2 || true
  cpu_snapshot >"$PGFANOUT_RUN_DIR/cpu-after"
  kill -TERM "$pid"; wait "$pid" || true
  log "CPU seconds per program during the run (2 cores: the machine's whole budget is $(( 2 * full_ms / 1000 )) s):"
  join -a2 -e0 -o 0,1.2,2.2 <(sort "$PGFANOUT_RUN_DIR/cpu-before") <(sort "$PGFANOUT_RUN_DIR/cpu-after") \
    | awk '{d = ($3 - $2) / 100; if (d >= 0.5) printf "  %-24s %6.1f\n", $1, d}' | sort -k2 -nr >&2

  python3 - "$ROWS" "$TX_ROWS" "$recv_ms" "$drain_ms" "$full_ms" "$hwm" "$rss" "$v" <<'PY'
import sys
rows, tx, recv, drain, full, hwm, rss, v = sys.argv[1:]
rows = int(rows)
rate = lambda ms: rows / (int(ms) / 1000)
print(f"PostgreSQL {v}, {rows} rows in transactions of {tx}, TCP loopback, {open('/proc/cpuinfo').read().count('processor')} cores")
print(f"{'pg_recvlogical (ceiling)':34} {rate(recv):>10,.0f} rows/s")
print(f"{'pgfanout drain (source only)':34} {rate(drain):>10,.0f} rows/s   ratio {int(recv)/int(drain):.2f}")
print(f"{'pgfanout run (log + all sinks)':34} {rate(full):>10,.0f} rows/s   ratio {int(recv)/int(full):.2f}")
print(f"pgfanout run RSS: peak {int(hwm)/1024:.0f} MB, at the end {int(rss)/1024:.0f} MB")
PY
}
with_services bench

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
source "$PGFANOUT_ROOT/scripts/lib/bench.sh"
cd "$PGFANOUT_ROOT"

ROWS="${ROWS:-1000000}"
TX_ROWS="${TX_ROWS:-$ROWS}"
export PGFANOUT_PG_VERSIONS="${PGFANOUT_PG_VERSIONS:-17}"
ensure_rust
scripts/services install
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PGFANOUT_CACHE/target}"
cargo build --release --locked --bin pgfanout
BIN="$CARGO_TARGET_DIR/release/pgfanout"

bench() {
  bench_setup bench full
  local v="$BENCH_PG" pgbin="$BENCH_PGBIN" db="$BENCH_DB" metrics_port="$BENCH_METRICS_PORT"
  local conf="$BENCH_CONF" psql=("${BENCH_PSQL[@]}")
  "${psql[@]}" -c "SELECT pg_create_logical_replication_slot('recv', 'pgoutput')" >/dev/null
  "${psql[@]}" -c "SELECT pg_create_logical_replication_slot('drain', 'pgoutput')" >/dev/null
  local end; end=$(bench_backlog "$ROWS" "$TX_ROWS")
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
  bench_run_until "$end" "$PGFANOUT_RUN_DIR/logs/bench-run.log"
  full_ms=$BENCH_RUN_MS
  local hwm=$BENCH_HWM_KB rss=$BENCH_RSS_KB
  # Where the time went: seconds each sink spent flushing (they run
  # concurrently after the broker, so the slowest one bounds the rate).
  curl -fsS "http://127.0.0.1:$metrics_port/metrics" \
    | awk '/^pgfanout_sink_flush_seconds_(sum|count)/ {print "  " $0}' >&2 || true
  cpu_snapshot >"$PGFANOUT_RUN_DIR/cpu-after"
  bench_run_stop
  cpu_between "$PGFANOUT_RUN_DIR/cpu-before" "$PGFANOUT_RUN_DIR/cpu-after" $(( full_ms / 1000 ))

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

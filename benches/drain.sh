#!/usr/bin/env bash
# Drain benchmark: a backlog of ROWS engagement_events in one slot, read by
# pg_recvlogical (the ceiling: the walsender decoding pgoutput), by pgfanout's
# source path alone (`pgfanout drain`), in text and in binary transfer, each
# against the ceiling in the same format, and by the whole pipeline with every
# sink on (`pgfanout run`, timed until the slot is acknowledged past the
# backlog). Same backlog, same run, same transport (TCP loopback); prints
# rows/s, the ratios and pgfanout's peak and final RSS.
#
# Both sides use the same pgoutput protocol: PROTO (default 4, pgfanout's
# choice on PostgreSQL 16+, with streaming = parallel, so a transaction over
# logical_decoding_work_mem is streamed in progress; 2 means streaming = on,
# 1 no streaming).
#
#   benches/drain.sh                      1,000,000 rows in one transaction
#   ROWS=200000 TX_ROWS=100 benches/drain.sh   200k rows in 100-row transactions
#   PROTO=1 benches/drain.sh              the server spills, sends at commit
set -euo pipefail
# Own run directory, so a bench can run beside a test run (set before
# common.sh, which defaults it).
export PGFANOUT_RUN_DIR="${PGFANOUT_RUN_DIR:-/tmp/pgfanout-bench}"
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib/common.sh"
source "$PGFANOUT_ROOT/scripts/lib/bench.sh"
cd "$PGFANOUT_ROOT"

ROWS="${ROWS:-1000000}"
TX_ROWS="${TX_ROWS:-$ROWS}"
PROTO="${PROTO:-4}"
case "$PROTO" in
  1) RECV_PROTO=(-o proto_version=1) ;;
  2 | 3) RECV_PROTO=(-o "proto_version=$PROTO" -o streaming=on) ;;
  *) RECV_PROTO=(-o "proto_version=$PROTO" -o streaming=parallel) ;;
esac
export PGFANOUT_SOURCE__PROTO_VERSION="$PROTO"
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
  local slot
  for slot in recv_text drain_text recv_binary drain_binary; do
    "${psql[@]}" -c "SELECT pg_create_logical_replication_slot('$slot', 'pgoutput')" >/dev/null
  done
  local end; end=$(bench_backlog "$ROWS" "$TX_ROWS")
  log "backlog ends at $end"

  # Each transfer format against the ceiling in the same format: binary
  # saves the walsender every value's output function (pgfanout's default
  # when every published column's type allows it).
  local t0 t1 recv_text_ms drain_text_ms recv_binary_ms drain_binary_ms full_ms
  t0=$(now_ms)
  "$pgbin/pg_recvlogical" -d "$db" --slot recv_text --start --endpos "$end" --no-loop \
    "${RECV_PROTO[@]}" -o publication_names=bench -f /dev/null
  t1=$(now_ms); recv_text_ms=$(( t1 - t0 ))
  t0=$(now_ms)
  RUST_LOG=warn PGFANOUT_SOURCE__SLOT=drain_text PGFANOUT_SOURCE__BINARY=false "$BIN" -c "$conf" drain --until "$end" >&2
  t1=$(now_ms); drain_text_ms=$(( t1 - t0 ))
  t0=$(now_ms)
  "$pgbin/pg_recvlogical" -d "$db" --slot recv_binary --start --endpos "$end" --no-loop \
    "${RECV_PROTO[@]}" -o publication_names=bench -o binary=true -f /dev/null
  t1=$(now_ms); recv_binary_ms=$(( t1 - t0 ))
  t0=$(now_ms)
  RUST_LOG=warn PGFANOUT_SOURCE__SLOT=drain_binary PGFANOUT_SOURCE__BINARY=true "$BIN" -c "$conf" drain --until "$end" >&2
  t1=$(now_ms); drain_binary_ms=$(( t1 - t0 ))

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

  python3 - "$ROWS" "$TX_ROWS" "$recv_text_ms" "$drain_text_ms" "$recv_binary_ms" "$drain_binary_ms" \
    "$full_ms" "$hwm" "$rss" "$v" <<'PY'
import sys
rows, tx, recv_t, drain_t, recv_b, drain_b, full, hwm, rss, v = sys.argv[1:]
rows = int(rows)
rate = lambda ms: rows / (int(ms) / 1000)
import os
print(f"PostgreSQL {v}, pgoutput protocol {os.environ['PGFANOUT_SOURCE__PROTO_VERSION']}, {rows} rows in transactions of {tx}, TCP loopback, {open('/proc/cpuinfo').read().count('processor')} cores")
print(f"{'pg_recvlogical, text (ceiling)':38} {rate(recv_t):>10,.0f} rows/s")
print(f"{'pgfanout drain, text (source only)':38} {rate(drain_t):>10,.0f} rows/s   ratio {int(recv_t)/int(drain_t):.2f}")
print(f"{'pg_recvlogical, binary (ceiling)':38} {rate(recv_b):>10,.0f} rows/s")
print(f"{'pgfanout drain, binary (source only)':38} {rate(drain_b):>10,.0f} rows/s   ratio {int(recv_b)/int(drain_b):.2f}")
print(f"{'pgfanout run, binary (log + all sinks)':38} {rate(full):>10,.0f} rows/s   ratio {int(recv_b)/int(full):.2f}")
print(f"pgfanout run RSS: peak {int(hwm)/1024:.0f} MB, at the end {int(rss)/1024:.0f} MB")
PY
}
with_services bench

#!/usr/bin/env bash
# Large-transaction benchmark: ROWS engagement_events written by ONE
# transaction, then
#   1. the server side of the protocol choice, on two fresh slots over the
#      same backlog: pg_recvlogical with pgoutput protocol 1 (the server
#      spills the transaction to disk until its commit, then sends it) and
#      with protocol 2 + streaming=on (the server sends it while it is still
#      in progress; a client must hold or spill it itself until the commit);
#      time to receive everything and the slots' spill/stream counters;
#   2. `pgfanout run` with every sink, twice over the same backlog (one slot
#      each): with protocol 1 (the server spills) and with the default
#      protocol (2+, streaming: pgfanout holds the transaction, spilling past
#      source.stream_buffer_mb to its own files); each timed until its slot
#      is acknowledged past the transaction, with its peak RSS (goal:
#      < 256 MB) and a check that ClickHouse holds every row.
# TCP loopback; the server's logical_decoding_work_mem is scripts/services'
# (64MB).
#
#   benches/big_tx.sh                 1,000,000 rows
#   ROWS=200000 benches/big_tx.sh
set -euo pipefail
# Own run directory, so a bench can run beside a test run (set before
# common.sh, which defaults it).
export PGFANOUT_RUN_DIR="${PGFANOUT_RUN_DIR:-/tmp/pgfanout-bench}"
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib/common.sh"
source "$PGFANOUT_ROOT/scripts/lib/bench.sh"
cd "$PGFANOUT_ROOT"

ROWS="${ROWS:-1000000}"
export PGFANOUT_PG_VERSIONS="${PGFANOUT_PG_VERSIONS:-17}"
ensure_rust
scripts/services install
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PGFANOUT_CACHE/target}"
cargo build --release --locked --bin pgfanout
BIN="$CARGO_TARGET_DIR/release/pgfanout"

bench() {
  bench_setup bigtx bigtx
  local psql=("${BENCH_PSQL[@]}")
  # Made before the backlog, so each sees all of it.
  "${psql[@]}" -c "SELECT pg_create_logical_replication_slot('proto1', 'pgoutput')" >/dev/null
  "${psql[@]}" -c "SELECT pg_create_logical_replication_slot('proto2', 'pgoutput')" >/dev/null
  "${psql[@]}" -c "SELECT pg_create_logical_replication_slot('bigtx_stream', 'pgoutput')" >/dev/null
  local end; end=$(bench_backlog "$ROWS" "$ROWS")
  log "backlog ends at $end"

  local t0 p1_ms p2_ms
  t0=$(now_ms)
  "$BENCH_PGBIN/pg_recvlogical" -d "$BENCH_DB" --slot proto1 --start --endpos "$end" --no-loop \
    -o proto_version=1 -o publication_names=bigtx -f /dev/null
  p1_ms=$(($(now_ms) - t0))
  t0=$(now_ms)
  "$BENCH_PGBIN/pg_recvlogical" -d "$BENCH_DB" --slot proto2 --start --endpos "$end" --no-loop \
    -o proto_version=2 -o streaming=on -o publication_names=bigtx -f /dev/null
  p2_ms=$(($(now_ms) - t0))

  # The same configuration but for the slot and protocol.
  local conf="$BENCH_CONF" rows_ch run1_ms run1_hwm run1_rss
  sed 's/^slot = "bigtx"$/slot = "bigtx"\nproto_version = 1/' "$conf" >"$PGFANOUT_RUN_DIR/bigtx-proto1.toml"
  sed 's/^slot = "bigtx"$/slot = "bigtx_stream"/' "$conf" >"$PGFANOUT_RUN_DIR/bigtx-stream.toml"

  BENCH_CONF="$PGFANOUT_RUN_DIR/bigtx-proto1.toml"
  bench_run_until "$end" "$PGFANOUT_RUN_DIR/logs/bigtx-run.log"
  rows_ch=$(curl -fsS "$PGFANOUT_CLICKHOUSE_URL/?database=bigtx" \
    --data-binary "SELECT count() FROM enriched_engagements FINAL")
  bench_run_stop
  ((rows_ch == ROWS)) || die "ClickHouse holds $rows_ch rows, expected $ROWS"
  run1_ms=$BENCH_RUN_MS run1_hwm=$BENCH_HWM_KB run1_rss=$BENCH_RSS_KB

  # The same rows again into the same sinks: ClickHouse's FINAL count is
  # unchanged, and the work per row is the same (sinks are idempotent).
  BENCH_CONF="$PGFANOUT_RUN_DIR/bigtx-stream.toml"
  bench_run_until "$end" "$PGFANOUT_RUN_DIR/logs/bigtx-stream.log"
  rows_ch=$(curl -fsS "$PGFANOUT_CLICKHOUSE_URL/?database=bigtx" \
    --data-binary "SELECT count() FROM enriched_engagements FINAL")
  bench_run_stop
  ((rows_ch == ROWS)) || die "ClickHouse holds $rows_ch rows, expected $ROWS"

  # Each walsender reports its counters when it finishes a transaction.
  local stats
  stats=$("${psql[@]}" -F ' ' -c "SELECT slot_name, spill_txns, spill_bytes, stream_txns, stream_bytes, total_bytes
    FROM pg_stat_replication_slots WHERE slot_name IN ('proto1', 'proto2', 'bigtx', 'bigtx_stream') ORDER BY slot_name")

  python3 - "$ROWS" "$BENCH_PG" "$p1_ms" "$p2_ms" "$run1_ms" "$run1_hwm" "$run1_rss" "$BENCH_RUN_MS" "$BENCH_HWM_KB" "$BENCH_RSS_KB" "$stats" <<'PY'
import sys
rows, v, p1, p2, run, hwm, rss, run2, hwm2, rss2, stats = sys.argv[1:]
rows = int(rows)
slots = {l.split()[0]: [int(x) for x in l.split()[1:]] for l in stats.splitlines() if l.strip()}
mb = lambda b: b / 1024 / 1024
def counters(slot):
    spill_txns, spill_bytes, stream_txns, stream_bytes, total = slots.get(slot, [0] * 5)
    return f"spilled {mb(spill_bytes):,.0f} MB ({spill_txns} txns), streamed {mb(stream_bytes):,.0f} MB ({stream_txns} txns)"
rate = lambda ms: rows / (int(ms) / 1000)
print(f"PostgreSQL {v}, one transaction of {rows:,} rows, logical_decoding_work_mem 64MB, TCP loopback, "
      f"{open('/proc/cpuinfo').read().count('processor')} cores")
print(f"{'pg_recvlogical, protocol 1':40} {int(p1) / 1000:7.1f} s {rate(p1):>10,.0f} rows/s   {counters('proto1')}")
print(f"{'pg_recvlogical, protocol 2 + streaming':40} {int(p2) / 1000:7.1f} s {rate(p2):>10,.0f} rows/s   {counters('proto2')}")
print(f"{'pgfanout run, protocol 1, every sink':40} {int(run) / 1000:7.1f} s {rate(run):>10,.0f} rows/s   {counters('bigtx')}")
print(f"{'pgfanout run, streaming, every sink':40} {int(run2) / 1000:7.1f} s {rate(run2):>10,.0f} rows/s   {counters('bigtx_stream')}")
print(f"pgfanout run RSS, protocol 1: peak {int(hwm) / 1024:.0f} MB (goal < 256 MB), at the end {int(rss) / 1024:.0f} MB")
print(f"pgfanout run RSS, streaming:  peak {int(hwm2) / 1024:.0f} MB (goal < 256 MB), at the end {int(rss2) / 1024:.0f} MB")
PY
}
with_services bench

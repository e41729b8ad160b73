#!/usr/bin/env bash
# Content journal benchmark (src/enrich/journal.rs): a catalogue of CONTENTS
# content rows written after the slot exists, so `pgfanout run` streams every
# one of them and appends it to the journal; then a restart, timed from the
# process start to its "starting pipeline" line, which comes after the
# journal was loaded as of the slot's position and pruned. Prints the rows
# the journal holds (about one per content id after the prune).
#
#   benches/journal.sh                   1,000,000 contents
#   CONTENTS=100000 benches/journal.sh
set -euo pipefail
export PGFANOUT_RUN_DIR="${PGFANOUT_RUN_DIR:-/tmp/pgfanout-bench}"
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib/common.sh"
source "$PGFANOUT_ROOT/scripts/lib/bench.sh"
cd "$PGFANOUT_ROOT"

CONTENTS="${CONTENTS:-1000000}"
export PGFANOUT_PG_VERSIONS="${PGFANOUT_PG_VERSIONS:-17}"
ensure_rust
scripts/services install
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PGFANOUT_CACHE/target}"
if [[ -z "${BIN:-}" ]]; then
  cargo build --release --locked --bin pgfanout
  BIN="$CARGO_TARGET_DIR/release/pgfanout"
fi

bench() {
  bench_setup bench_journal bench_journal
  log "writing $CONTENTS content rows (and updating a tenth of them)"
  "${BENCH_PSQL[@]}" -c "INSERT INTO content SELECT gen_random_uuid(), 'slug-' || g, 'Title ' || g,
    (ARRAY['podcast', 'newsletter', 'video'])[1 + g % 3], 60 + g % 3600, now() FROM generate_series(1, $CONTENTS) g" >/dev/null
  "${BENCH_PSQL[@]}" -c "UPDATE content SET length_seconds = length_seconds + 1 WHERE length_seconds % 10 = 0" >/dev/null
  local end
  end=$("${BENCH_PSQL[@]}" -c "SELECT pg_current_wal_insert_lsn()")
  bench_run_until "$end" "$PGFANOUT_RUN_DIR/journal-run1.log"
  log "first run: streamed and journaled the catalogue in ${BENCH_RUN_MS} ms (peak RSS $((BENCH_HWM_KB / 1024)) MB)"
  bench_run_stop
  log "journal rows before the restart: $("${BENCH_PSQL[@]}" -c "SELECT count(*) FROM pgfanout_state.content_versions")"
  local t0 t1
  t0=$(now_ms)
  RUST_LOG=info "$BIN" -c "$BENCH_CONF" run 2>"$PGFANOUT_RUN_DIR/journal-run2.log" &
  local pid=$!
  until grep -q "starting pipeline" "$PGFANOUT_RUN_DIR/journal-run2.log"; do
    kill -0 "$pid" 2>/dev/null || die "pgfanout run exited; see $PGFANOUT_RUN_DIR/journal-run2.log"
    sleep 0.05
  done
  t1=$(now_ms)
  log "restart: journal loaded and pruned in $((t1 - t0)) ms, RSS $(awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$pid/status") MB; $(sed 's/\x1b\[[0-9;]*m//g' "$PGFANOUT_RUN_DIR/journal-run2.log" | grep -o 'contents=[0-9]*' | head -n1)"
  kill -TERM "$pid"
  wait "$pid" || true
  log "journal rows after the prune: $("${BENCH_PSQL[@]}" -c "SELECT count(*) FROM pgfanout_state.content_versions")"
}
with_services bench

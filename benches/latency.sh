#!/usr/bin/env bash
# Latency and memory benchmark: `pgfanout run` (release build, every sink on)
# while `pgfanout generate` writes a steady stream of engagement events at
# each of RATES events/s. For each rate it prints p50 and p99 of the time
# from the PostgreSQL commit to each sink's write returning, read from the
# sidecar's own `pgfanout_commit_to_sink_seconds` histogram (the difference
# of a scrape after WARMUP seconds and one once the slot has caught up after
# the generator stopped, interpolated within buckets), the rate the
# generator actually achieved, and pgfanout's RSS (sampled every second from
# /proc: peak, and steady = the median over the second half of the phase).
#
#   benches/latency.sh                                   1,000/s then 10,000/s, 60 s each
#   DURATION=30 RATES="1000 5000" ROWS_PER_TX=10 benches/latency.sh
#
# Everything runs on this machine: PostgreSQL, the broker, ClickHouse, Redis,
# the HTTP receiver, the generator and pgfanout share its cores, so the
# figures include their contention.
set -euo pipefail
# Own run directory, so a bench can run beside a test run (set before
# common.sh, which defaults it).
export PGFANOUT_RUN_DIR="${PGFANOUT_RUN_DIR:-/tmp/pgfanout-bench}"
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib/common.sh"
source "$PGFANOUT_ROOT/scripts/lib/bench.sh"
cd "$PGFANOUT_ROOT"

RATES="${RATES:-1000 10000}"
DURATION="${DURATION:-60}"       # measured seconds per rate
WARMUP="${WARMUP:-10}"           # seconds per rate before the first scrape
# Events per generated transaction: an application committing small groups
# of events, not one bulk INSERT every half second (generate's default).
ROWS_PER_TX="${ROWS_PER_TX:-10}"
export PGFANOUT_PG_VERSIONS="${PGFANOUT_PG_VERSIONS:-17}"
ensure_rust
scripts/services install
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PGFANOUT_CACHE/target}"
cargo build --release --locked --bin pgfanout
BIN="$CARGO_TARGET_DIR/release/pgfanout"
((DURATION >= 5)) || die "DURATION must be at least 5 (seconds)"
PY="$PGFANOUT_CACHE/venv/bin/python"
[[ -x "$PY" ]] || PY=python3

bench() {
  bench_setup latency latency
  local out="$PGFANOUT_RUN_DIR/latency" metrics="http://127.0.0.1:$BENCH_METRICS_PORT"
  local psql=("${BENCH_PSQL[@]}")
  rm -rf "$out" && mkdir -p "$out"
  # The test services run with synchronous_commit = off (and fsync = off),
  # so a commit leaves its WAL unflushed until the WAL writer's next round
  # (wal_writer_delay, 200 ms), and logical decoding never reads past the
  # flushed WAL: that alone would add up to 200 ms to every latency. A
  # production server commits synchronously; so does the generator here.
  "${psql[@]}" -c "ALTER DATABASE latency SET synchronous_commit = on"
  RUST_LOG=warn "$BIN" -c "$BENCH_CONF" run 2>"$out/run.log" &
  local pid=$!
  wait_for_http "$metrics/readyz" 60 "$pid" || die "pgfanout run never got ready; see $out/run.log"

  # Once a second: time, pgfanout's RSS (kB) and CPU ticks, the machine's
  # busy and total ticks.
  (
    while [[ -r "/proc/$pid/status" ]]; do
      rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null) || break
      cpu=$(awk '{sub(/^.*\) /, ""); split($0, f, " "); print f[12] + f[13]}' "/proc/$pid/stat" 2>/dev/null) || break
      sys=$(awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t}' /proc/stat)
      echo "$(now_ms) $rss $cpu $sys"
      sleep 1
    done
  ) >"$out/samples" &
  local sampler=$!

  local rate events t0 ta tc t1 tb end
  for rate in $RATES; do
    events=$((rate * (WARMUP + DURATION)))
    log "generating $events events at $rate/s in transactions of $ROWS_PER_TX"
    t0=$(now_ms)
    "$BIN" -c "$BENCH_CONF" generate --events "$events" --rate "$rate" --rows-per-statement "$ROWS_PER_TX" \
      >"$out/generate-$rate.out" 2>"$out/generate-$rate.log" &
    local gen=$!
    sleep "$WARMUP"
    curl -fsS "$metrics/metrics" >"$out/scrape-$rate-a"
    ta=$(now_ms)
    # CPU per program over the steady part, taken while the generator and
    # its PostgreSQL backend still run (an exited process's ticks vanish).
    # Every program on the machine counts, others' work included: a busy
    # neighbour shows here.
    cpu_snapshot >"$out/cpu-$rate-a"
    tc=$(now_ms)
    sleep $((DURATION - 3))
    tc=$(($(now_ms) - tc))
    cpu_snapshot >"$out/cpu-$rate-b"
    cpu_between "$out/cpu-$rate-a" "$out/cpu-$rate-b" $((tc / 1000)) 2>"$out/cpu-$rate"
    wait "$gen" || die "pgfanout generate failed; see $out/generate-$rate.log"
    t1=$(now_ms)
    # The last events are in flight: wait until every sink flushed them.
    end=$("${psql[@]}" -c "SELECT pg_current_wal_insert_lsn()")
    until [[ $("${psql[@]}" -c "SELECT confirmed_flush_lsn >= '$end' FROM pg_replication_slots WHERE slot_name = 'latency'") == t ]]; do
      kill -0 "$pid" 2>/dev/null || die "pgfanout run exited; see $out/run.log"
      sleep 0.1
    done
    curl -fsS "$metrics/metrics" >"$out/scrape-$rate-b"
    tb=$(now_ms)
    echo "$rate $events $t0 $ta $t1 $tb" >>"$out/phases"
    sleep 2
  done

  local hwm
  hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status")
  kill -TERM "$pid"
  wait "$pid" || die "pgfanout run did not stop cleanly; see $out/run.log"
  wait "$sampler" || true

  "$PY" - "$out" "$hwm" "$BENCH_PG" "$ROWS_PER_TX" "$(getconf CLK_TCK)" <<'PY'
import re, statistics, sys
out, hwm_kb, pg, rows_per_tx, hz = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
NAME = "pgfanout_commit_to_sink_seconds"
SINKS = ["redis", "clickhouse", "http", "all"]

def buckets(path):
    """{sink: {le: cumulative count}} of the commit-to-sink histogram."""
    h = {}
    for line in open(path):
        m = re.match(NAME + r'_bucket\{(.*)\} (\S+)$', line.strip())
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            h.setdefault(labels["sink"], {})[float(labels["le"])] = float(m.group(2))
    return h

def quantile(q, cum):
    """Linear interpolation within the bucket holding rank q (as Prometheus'
    histogram_quantile does)."""
    les = sorted(cum)
    total = cum[les[-1]]
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for le in les:
        if cum[le] >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(cum[le] - below, 1e-12)
        lower, below = le, cum[le]
    return lower

samples = [list(map(int, l.split())) for l in open(f"{out}/samples") if len(l.split()) == 5]
cores = open("/proc/cpuinfo").read().count("processor")
mem_gib = int(open("/proc/meminfo").readline().split()[1]) / 1024 / 1024
print(f"PostgreSQL {pg}, pgfanout run (release, every sink on), generate in transactions of {rows_per_tx} events,")
print(f"{cores} cores, {mem_gib:.0f} GiB, PostgreSQL, broker, ClickHouse, Redis, HTTP receiver and generator on the same machine")
for line in open(f"{out}/phases"):
    rate, events, t0, ta, t1, tb = map(int, line.split())
    a, b = buckets(f"{out}/scrape-{rate}-a"), buckets(f"{out}/scrape-{rate}-b")
    achieved = events / ((t1 - t0) / 1000)
    print(f"\n{rate:,}/s target: generator wrote {events:,} events in {(t1 - t0) / 1000:.1f} s = {achieved:,.0f}/s"
          + ("" if achieved >= 0.98 * rate else f"  (did NOT sustain the target: {achieved / rate:.0%})"))
    for sink in SINKS:
        cum = {le: b[sink][le] - a.get(sink, {}).get(le, 0.0) for le in b.get(sink, {})}
        if not cum:
            print(f"  commit -> {sink:10} no samples")
            continue
        n = cum[float("inf")]
        p50, p99 = quantile(0.5, cum), quantile(0.99, cum)
        print(f"  commit -> {sink:10} p50 {p50 * 1000:7.1f} ms   p99 {p99 * 1000:7.1f} ms   ({n:,.0f} changes measured)")
    phase = [s for s in samples if t0 <= s[0] <= t1]
    if len(phase) >= 2:
        second_half = [s[1] for s in phase if s[0] >= (t0 + t1) / 2]
        peak = max(s[1] for s in phase)
        first, last = phase[0], phase[-1]
        secs = (last[0] - first[0]) / 1000
        cpu = (last[2] - first[2]) / hz / secs * 100
        busy = (last[3] - first[3]) / max(last[4] - first[4], 1) * 100
        print(f"  pgfanout RSS: peak {peak / 1024:.0f} MB, steady {statistics.median(second_half) / 1024:.0f} MB"
              f"   CPU: pgfanout {cpu:.0f}% of one core, machine {busy:.0f}% busy")
print(f"\npgfanout RSS over the whole run: peak {hwm_kb / 1024:.0f} MB (VmHWM), goal: steady < 100 MB")
PY
  for rate in $RATES; do
    echo
    echo "$rate/s: $(sed -n '1s/^\[[^]]*\] //p' "$out/cpu-$rate") (pgfanout: run and generate)"
    tail -n +2 "$out/cpu-$rate"
  done
  log "raw scrapes, samples and logs: $out (until the next scripts/services up)"
}
with_services bench

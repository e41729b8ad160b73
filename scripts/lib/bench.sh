# shellcheck shell=bash
# shellcheck disable=SC2034  # the BENCH_* variables are set for the caller
# Helpers shared by benches/*.sh. Source after common.sh; call inside
# with_services (they read the env it sources) with BIN set to the pgfanout
# binary. Each sets or prints what it says and nothing else:
#
#   bench_setup DB SLOT         database DB on the first PGFANOUT_PG_VERSIONS
#                               major, a config for it (publication, topic
#                               prefix, ClickHouse database and Redis prefix
#                               DB, slot SLOT, a free metrics port; override
#                               more with PGFANOUT_* variables) and
#                               `pgfanout init`. Sets BENCH_PG
#                               (major), BENCH_PGBIN, BENCH_DB (URL),
#                               BENCH_CONF, BENCH_METRICS_PORT and the array
#                               BENCH_PSQL (psql -qXAt on DB).
#   bench_backlog ROWS TX_ROWS  one content row, then ROWS engagement_events
#                               in transactions of TX_ROWS; prints the WAL
#                               insert position after them.
#   bench_run_until END LOG     starts `pgfanout run` (stderr to LOG) and waits
#                               until its slot is acknowledged at END. Sets
#                               BENCH_RUN_PID (still running), BENCH_RUN_MS,
#                               BENCH_HWM_KB (peak RSS) and BENCH_RSS_KB.
#   bench_run_stop              SIGTERM to that run; waits for it.
#   cpu_snapshot                prints "program ticks" lines: cumulative CPU
#                               ticks per program name (all processes of
#                               the same name summed; kernel workers as one).
#                               A process that exits between two snapshots
#                               takes its ticks with it: snapshot while the
#                               programs of interest still run.
#   cpu_between BEFORE AFTER SECS   prints the CPU seconds each program spent
#                               between two cpu_snapshot files (those over
#                               0.5 s), most first, with the machine's
#                               budget for SECS seconds.

if [[ -n "${_PGFANOUT_BENCH_SH:-}" ]]; then
  return 0
fi
_PGFANOUT_BENCH_SH=1

bench_setup() {
  local name="$1" slot="$2"
  BENCH_PG="${PGFANOUT_PG_VERSIONS%% *}"
  BENCH_PG="${BENCH_PG%%,*}"
  local url_var="PGFANOUT_PG${BENCH_PG}_URL" bin_var="PGFANOUT_PG${BENCH_PG}_BIN"
  local admin="${!url_var}"
  BENCH_PGBIN="${!bin_var}"
  BENCH_DB="${admin%/*}/$name"
  BENCH_CONF="$PGFANOUT_RUN_DIR/$name.toml"
  BENCH_METRICS_PORT=$(free_ports 1)
  BENCH_PSQL=("$BENCH_PGBIN/psql" -qXAt -v ON_ERROR_STOP=1 "$BENCH_DB")
  "$BENCH_PGBIN/psql" -qX "$admin" -c "CREATE DATABASE $name" >/dev/null
  cat >"$BENCH_CONF" <<TOML
[source]
url = "$BENCH_DB"
slot = "$slot"
publication = "$name"
[log]
brokers = "$PGFANOUT_KAFKA_BROKERS"
topic_prefix = "$name."
[clickhouse]
url = "$PGFANOUT_CLICKHOUSE_URL"
database = "$name"
[redis]
url = "$PGFANOUT_REDIS_URL"
key_prefix = "$name:"
[http]
url = "$PGFANOUT_HTTP_URL/$name"
secret = "$PGFANOUT_HTTP_SECRET"
[metrics]
listen = "127.0.0.1:$BENCH_METRICS_PORT"
TOML
  RUST_LOG=warn "$BIN" -c "$BENCH_CONF" init
}

bench_backlog() {
  local rows="$1" tx_rows="$2" done=0 n
  "${BENCH_PSQL[@]}" -c "INSERT INTO content VALUES ('00000000-0000-0000-0000-000000000001', 'b', 'Bench', 'podcast', 1200, now())" >/dev/null
  log "writing $rows rows in transactions of $tx_rows"
  while ((done < rows)); do
    n=$((rows - done < tx_rows ? rows - done : tx_rows))
    "${BENCH_PSQL[@]}" -c "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
      SELECT '00000000-0000-0000-0000-000000000001', gen_random_uuid(), 'play', now(), (g % 600000), 'web', '{\"source\": \"bench\"}'
      FROM generate_series(1, $n) g" >/dev/null
    done=$((done + n))
  done
  "${BENCH_PSQL[@]}" -c "SELECT pg_current_wal_insert_lsn()"
}

bench_run_until() {
  local end="$1" logf="$2" t0 slot confirmed
  slot=$(sed -n 's/^slot = "\(.*\)"$/\1/p' "$BENCH_CONF" | head -n1)
  t0=$(now_ms)
  RUST_LOG=warn "$BIN" -c "$BENCH_CONF" run 2>"$logf" &
  BENCH_RUN_PID=$!
  while :; do
    confirmed=$("${BENCH_PSQL[@]}" -c "SELECT confirmed_flush_lsn >= '$end' FROM pg_replication_slots WHERE slot_name = '$slot'")
    [[ "$confirmed" == t ]] && break
    kill -0 "$BENCH_RUN_PID" 2>/dev/null || die "pgfanout run exited; see $logf"
    sleep 0.1
  done
  BENCH_RUN_MS=$(($(now_ms) - t0))
  # VmHWM is the kernel's own high-water mark of the resident set: no
  # sampling can miss the peak.
  BENCH_HWM_KB=$(awk '/VmHWM/ {print $2}' "/proc/$BENCH_RUN_PID/status")
  BENCH_RSS_KB=$(awk '/VmRSS/ {print $2}' "/proc/$BENCH_RUN_PID/status")
}

bench_run_stop() {
  kill -TERM "$BENCH_RUN_PID"
  wait "$BENCH_RUN_PID" || true
}

cpu_snapshot() {
  for f in /proc/[0-9]*/stat; do
    awk '{sub(/^[0-9]+ \(/, ""); name = $0; sub(/\).*/, "", name); gsub(/ /, "_", name); sub(/^kworker\/.*/, "kworker", name); n = split($0, a, ") "); split(a[n], b, " "); print name, b[12] + b[13]}' "$f" 2>/dev/null
  done | awk '{t[$1] += $2} END {for (k in t) print k, t[k]}'
}

cpu_between() {
  local before="$1" after="$2" secs="$3" hz
  hz=$(getconf CLK_TCK)
  log "CPU seconds per program (the machine's budget: $(nproc) cores x $secs s = $(( $(nproc) * secs )) s):"
  join -a2 -e0 -o 0,1.2,2.2 <(sort "$before") <(sort "$after") \
    | awk -v hz="$hz" '{d = ($3 - $2) / hz; if (d >= 0.5) printf "  %-24s %6.1f\n", $1, d}' | sort -k2 -nr >&2
}

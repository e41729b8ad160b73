#!/usr/bin/env bash
# The compose demo's sidecar entrypoint. Its arguments are pgfanout's command
# line, e.g. `-c /etc/pgfanout/pgfanout.toml run`: with the same options
# (all but the last argument), first `init --no-source-schema` (the postgres
# container already loaded sql/postgres/schema.sql), which creates whatever is
# missing — publication, slot, ClickHouse tables, topics — then exec the
# command itself, so pgfanout is PID 1 and gets docker's SIGTERM.
#
# The marker file is the healthcheck: the generator waits for "healthy",
# because rows written before the slot exists would never reach the sinks.
set -euo pipefail
READY=/tmp/pgfanout.initialized

(($# >= 1)) || { echo "usage: start.sh [pgfanout options] COMMAND" >&2; exit 2; }
rm -f "$READY"
pgfanout "${@:1:$#-1}" init --no-source-schema
touch "$READY"
exec pgfanout "$@"

#!/bin/sh
# Recreates the golden corpus: throwaway PostgreSQL 15 cluster in /tmp/pgdev
# (port 55432), setup.sql, capture.py, stop. Run as root (uses the postgres user).
set -e
BIN=/usr/lib/postgresql/15/bin
HERE=$(cd "$(dirname "$0")" && pwd)
su postgres -c "$BIN/pg_ctl -D /tmp/pgdev/data stop" 2>/dev/null || true
rm -rf /tmp/pgdev && mkdir -p /tmp/pgdev && chown postgres /tmp/pgdev
su postgres -c "$BIN/initdb -D /tmp/pgdev/data -A trust -E UTF8 --locale=C.UTF-8" >/dev/null
cat >> /tmp/pgdev/data/postgresql.conf <<CONF
port = 55432
unix_socket_directories = '/tmp/pgdev'
listen_addresses = ''
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
max_prepared_transactions = 10
logical_decoding_work_mem = 64kB
CONF
su postgres -c "$BIN/pg_ctl -D /tmp/pgdev/data -l /tmp/pgdev/pg.log -w start" >/dev/null
psql -X -q -v ON_ERROR_STOP=1 -h /tmp/pgdev -p 55432 -U postgres -f "$HERE/setup.sql" >/dev/null
python3 "$HERE/capture.py" /tmp/pgdev 55432
su postgres -c "$BIN/pg_ctl -D /tmp/pgdev/data stop" >/dev/null

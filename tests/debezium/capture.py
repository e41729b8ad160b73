#!/usr/bin/env python3
"""Records what real Debezium emits for a PostgreSQL database.

Runs Debezium's embedded engine (PostgreSQL connector, pgoutput, JSON
converter) through pydbzengine and writes every record it hands over as one
JSON line:

    {"topic": "<prefix>.public.t", "key": <key JSON>, "value": <value JSON>}

key and value are the converter's own bytes, embedded verbatim (no Python
round trip that could reformat a number); a tombstone has "value": null.

One JVM runs one engine per --engine option, each on its own slot with its
own offsets (a temporary file), so both JSON converter settings (schemas on
and off) cost one JVM start. Only streamed changes are captured
(snapshot.mode=no_data): create the slot (pg_create_logical_replication_slot
with 'pgoutput') and the publication before the changes to be captured, then
start this program whenever; Debezium streams from the slot's position.

Each engine stops after its first record of --end-table, or after
--max-records records, or when no record came for --idle-timeout seconds
after its first one; the program always ends within --timeout seconds.
Exit status: 0 when every engine stopped on the end topic or the record
count, 3 when one timed out (what it had is written all the same), 2 on bad
arguments, 1 when an engine failed.

Used by tests/debezium_golden.rs; runs on its own too, e.g.

    python tests/debezium/capture.py --host 127.0.0.1 --port 5432 \
        --user pgfanout --password pgfanout --dbname app --topic-prefix app \
        --tables public.orders,public.end --end-table public.end \
        --engine slot=dbz_off,publication=dbz,schemas=off,out=- \
        --engine slot=dbz_on,publication=dbz,schemas=on,out=on.jsonl,provide.transaction.metadata=true
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

ENGINE_KEYS = {"slot", "publication", "schemas", "out", "name"}


def parse_engine(spec: str) -> dict[str, str]:
    """`slot=S,publication=P,schemas=on|off,out=FILE|-[,name=N][,CONNECTOR.PROPERTY=V]…`.

    A key with a dot is a connector property of this engine alone (e.g.
    topic.prefix=x, provide.transaction.metadata=true); its value may hold
    commas (skipped.operations=t,u) as long as what follows one is not KEY=.
    """
    fields: dict[str, str] = {}
    props: dict[str, str] = {}
    for part in re.split(r",(?=[A-Za-z_][A-Za-z0-9_.]*=)", spec):
        key, sep, value = part.partition("=")
        if sep and "." in key:
            props[key] = value
            continue
        if not sep or key not in ENGINE_KEYS:
            raise argparse.ArgumentTypeError(
                f"--engine {spec!r}: {part!r} is neither one of {sorted(ENGINE_KEYS)}=VALUE nor a connector property"
            )
        fields[key] = value
    for key in ("slot", "publication", "schemas", "out"):
        if key not in fields:
            raise argparse.ArgumentTypeError(f"--engine {spec!r}: {key}= is missing")
    if fields["schemas"] not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"--engine {spec!r}: schemas is on or off")
    fields["properties"] = props  # type: ignore[assignment]
    return fields


def parse_property(spec: str) -> tuple[str, str]:
    key, sep, value = spec.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--property {spec!r}: expected NAME=VALUE")
    return key, value


def arguments(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", default=os.environ.get("PGPASSWORD", ""))
    p.add_argument("--dbname", required=True)
    p.add_argument("--topic-prefix", help="Debezium's topic.prefix (no trailing dot), unless an engine sets its own")
    p.add_argument("--tables", required=True, help="table.include.list, e.g. public.a,public.b")
    p.add_argument(
        "--engine",
        action="append",
        type=parse_engine,
        required=True,
        help="one engine: slot=S,publication=P,schemas=on|off,out=FILE|-[,CONNECTOR.PROPERTY=V]...; repeatable",
    )
    p.add_argument(
        "--property",
        action="append",
        type=parse_property,
        default=[],
        help="another connector property for every engine (e.g. skipped.operations=none); repeatable",
    )
    p.add_argument(
        "--end-table",
        help="an engine stops after its first record of this table (schema.table), the end marker",
    )
    p.add_argument("--max-records", type=int, default=0, help="an engine stops after this many records (0: no limit)")
    p.add_argument("--idle-timeout", type=float, default=15.0, help="seconds without a record, after the first")
    p.add_argument("--timeout", type=float, default=120.0, help="the whole run's bound, JVM start included")
    args = p.parse_args(argv)
    outs = [e["out"] for e in args.engine]
    if outs.count("-") > 1 or len(set(outs)) != len(outs):
        p.error("each engine needs its own out (at most one of them '-')")
    if len({e["slot"] for e in args.engine}) != len(args.engine):
        p.error("each engine needs its own slot")
    for e in args.engine:
        if not e["properties"].get("topic.prefix", args.topic_prefix):
            p.error(f"engine on slot {e['slot']}: no topic.prefix (give --topic-prefix)")
    if not args.end_table and args.max_records <= 0 and args.idle_timeout <= 0:
        p.error("give --end-table, --max-records or --idle-timeout: something must stop the engines")
    return args


def connector_properties(args: argparse.Namespace, engine: dict[str, str], offsets: Path) -> dict[str, str]:
    schemas = "true" if engine["schemas"] == "on" else "false"
    props = {
        "name": engine.get("name") or f"capture-{engine['slot']}",
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "database.hostname": args.host,
        "database.port": str(args.port),
        "database.user": args.user,
        "database.password": args.password,
        "database.dbname": args.dbname,
        "topic.prefix": args.topic_prefix or "",
        "plugin.name": "pgoutput",
        "slot.name": engine["slot"],
        "publication.name": engine["publication"],
        # Creates it (for the included tables) only when it does not exist.
        "publication.autocreate.mode": "filtered",
        "table.include.list": args.tables,
        "snapshot.mode": "no_data",
        "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
        "offset.storage.file.filename": str(offsets),
        "offset.flush.interval.ms": "1000",
        # The embedded engine configures its JSON converters from these
        # (`converter.*` for both, `key.converter.*` / `value.converter.*` each).
        "converter.schemas.enable": schemas,
        "key.converter.schemas.enable": schemas,
        "value.converter.schemas.enable": schemas,
        "status.update.interval.ms": "1000",
        # Engines of one topic.prefix in one JVM would register the same
        # JMX names (server=<prefix>); the second waits a minute for the
        # first's, then fails. A tag per engine keeps the names apart.
        "custom.metric.tags": f"engine={engine['slot']}",
    }
    props.update(dict(args.property))
    props.update(engine["properties"])
    return props


class Capture:
    """One engine's records, written as they arrive; knows when it is done."""

    def __init__(self, out, end_topic: str | None, max_records: int):
        self.out = out
        self.end_topic = end_topic
        self.max_records = max_records
        self.count = 0
        self.last = None  # monotonic time of the last record
        self.done = threading.Event()
        self.reason = ""
        self.lock = threading.Lock()

    def record(self, topic: str, key: str | None, value: str | None) -> None:
        line = '{"topic":%s,"key":%s,"value":%s}\n' % (
            json.dumps(topic),
            "null" if key is None else key,
            "null" if value is None else value,
        )
        with self.lock:
            if self.done.is_set():
                # After the end: not part of what was asked for.
                return
            self.out.write(line)
            self.count += 1
            self.last = time.monotonic()
            if self.end_topic is not None and topic == self.end_topic:
                self.finish("end topic")
            elif self.max_records > 0 and self.count >= self.max_records:
                self.finish("max records")

    def finish(self, reason: str) -> None:
        if not self.done.is_set():
            self.reason = reason
            self.out.flush()
            self.done.set()


def main(argv: list[str]) -> int:
    args = arguments(argv)
    deadline = time.monotonic() + args.timeout

    def give_up() -> None:
        # Stopping the engines has a bound of its own below; this one holds
        # even if the JVM hangs in close().
        print(f"capture: still running {args.timeout + 30:.0f}s after the start: exiting", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)

    watchdog = threading.Timer(args.timeout + 30.0, give_up)
    watchdog.daemon = True
    watchdog.start()

    # Records may go to standard output; the JVM and its log must not.
    stdout = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    # C1 only: this JVM lives for seconds, on a busy 2-core machine, where
    # the optimising compiler's work would never pay off.
    os.environ.setdefault("PYDBZ_JVM_OPTS", "-XX:TieredStopAtLevel=1")
    log4j = HERE / "log4j2.properties"
    jvm_opts = [f"-Dlog4j2.configurationFile={log4j.as_uri()}"]

    try:
        from pydbzengine import BasePythonChangeHandler, DebeziumEngine
    except ImportError as e:
        print(f"capture: pydbzengine is not installed ({e}): scripts/services install", file=sys.stderr)
        return 1

    class Handler(BasePythonChangeHandler):
        def __init__(self, capture: Capture):
            self.capture = capture

        def handleJsonBatch(self, records) -> None:
            for r in records:
                key = r.key()
                value = r.value()
                self.capture.record(
                    str(r.destination()),
                    None if key is None else str(key),
                    None if value is None else str(value),
                )

    workdir = Path(tempfile.mkdtemp(prefix="dbz-capture-"))
    runs = []
    for i, engine in enumerate(args.engine):
        out = stdout if engine["out"] == "-" else open(engine["out"], "w", encoding="utf-8")
        props = connector_properties(args, engine, workdir / f"offsets-{i}.dat")
        end_topic = f"{props['topic.prefix']}.{args.end_table}" if args.end_table else None
        capture = Capture(out, end_topic, args.max_records)
        dbz = DebeziumEngine(properties=props, handler=Handler(capture), format="json", jvm_opts=jvm_opts)
        failure: list[BaseException] = []

        def run(dbz=dbz, capture=capture, failure=failure):
            try:
                dbz.run()
            except BaseException as e:  # noqa: BLE001 - reported below, with the engine's name
                failure.append(e)
            finally:
                # run() returns once the engine stopped, by close() or on its own.
                capture.finish(capture.reason or "engine stopped")

        runs.append((engine, capture, dbz, threading.Thread(target=run, daemon=True), failure))
    for _, _, _, thread, _ in runs:
        thread.start()

    timed_out = []
    while True:
        now = time.monotonic()
        for engine, capture, _, _, _ in runs:
            if capture.done.is_set():
                continue
            if now >= deadline:
                capture.finish("timeout")
                timed_out.append(engine["slot"])
            elif args.idle_timeout > 0 and capture.last is not None and now - capture.last >= args.idle_timeout:
                capture.finish("idle timeout")
                timed_out.append(engine["slot"])
        if all(c.done.is_set() for _, c, _, _, _ in runs):
            break
        time.sleep(0.05)

    for _, _, dbz, _, _ in runs:
        dbz.close()
    for engine, capture, _, thread, failure in runs:
        thread.join(timeout=max(1.0, min(20.0, deadline + 20.0 - time.monotonic())))
        if thread.is_alive():
            print(f"capture: engine on slot {engine['slot']} did not stop after close()", file=sys.stderr)
        # close() interrupts run(): only an engine that stopped by itself failed.
        error = f", failed: {failure[0]}" if failure and capture.reason == "engine stopped" else ""
        print(f"capture: slot {engine['slot']}: {capture.count} records, stopped on {capture.reason}{error}", file=sys.stderr)
        capture.out.flush()
        if capture.out is not stdout:
            capture.out.close()
    stdout.flush()
    sys.stderr.flush()
    shutil.rmtree(workdir, ignore_errors=True)
    # An engine that stopped before anything here asked it to failed (its
    # error is in Debezium's log above, or in the line just printed).
    failed = any(capture.reason == "engine stopped" for _, capture, _, _, _ in runs)
    code = 1 if failed else 3 if timed_out else 0
    # The JVM's non-daemon threads (Kafka Connect's) could keep a normal
    # exit waiting: everything is written, so leave at once.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""Captures the golden pgoutput corpus from a throwaway PostgreSQL cluster.

Run setup.sql first, then this script; it writes tests/corpus/pgoutput/*.bin
(one message per file, `<proto>-<seq>-<tag>.bin`) and manifest.json.
Usage: capture.py HOST PORT
"""
import json, os, subprocess, sys

HOST, PORT = sys.argv[1], sys.argv[2]
OUT = os.path.join(os.path.dirname(__file__), "..", "pgoutput")
TZ = "Asia/Kolkata"  # text timestamptz output carries +05:30 offsets


def psql(sql):
    env = dict(os.environ, PGOPTIONS=f"-c TimeZone={TZ}")
    out = subprocess.run(["psql", "-X", "-At", "-F", "|", "-h", HOST, "-p", PORT, "-U", "postgres", "-c", sql],
                         check=True, capture_output=True, text=True, env=env).stdout
    return [line for line in out.splitlines() if line]



SETS = [
    # name, proto, slot, options, keep big transactions
    ("text", 1, "slot_main", {"binary": "false"}),
    ("binary", 1, "slot_main", {"binary": "true"}),
    ("stream", 2, "slot_main", {"streaming": "on"}),
    ("twophase", 3, "slot_2pc", {"streaming": "on", "two_phase": "on"}),
]

for f in os.listdir(OUT):
    if f.endswith(".bin"):
        os.remove(os.path.join(OUT, f))

sets = []
seq = 0
for name, proto, slot, opts in SETS:
    args = {"proto_version": str(proto), "publication_names": "pub", "messages": "true", **opts}
    arglist = ", ".join(f"'{k}', '{v}'" for k, v in args.items())
    rows = psql(f"SELECT lsn, encode(data, 'hex') FROM pg_logical_slot_peek_binary_changes('{slot}', NULL, NULL, {arglist})")
    msgs = [(lsn, bytes.fromhex(h)) for lsn, h in (r.split("|") for r in rows)]
    # Keep the corpus small: inside a transaction or stream block keep the first
    # 12 and last 4 data messages; control messages are always kept.
    kept, block = [], []
    opening, closing = set(b"BSb"), set(b"CEPp")

    def flush():
        data = block if len(block) <= 16 else block[:12] + block[-4:]
        kept.extend(data)
        block.clear()

    for lsn, data in msgs:
        tag = data[0]
        if tag in opening:
            flush()
            kept.append((lsn, data))
        elif tag in closing:
            flush()
            kept.append((lsn, data))
        else:
            block.append((lsn, data))
    flush()
    files = []
    for lsn, data in kept:
        seq += 1
        tag = chr(data[0])
        fname = f"{proto}-{seq:04d}-{tag}.bin"
        with open(os.path.join(OUT, fname), "wb") as fh:
            fh.write(data)
        files.append(f"{fname} {lsn}")
    sets.append({"name": name, "proto": proto, "slot": slot, "options": args, "files": files})
    print(name, len(msgs), "messages,", len(kept), "kept")

# What SELECT returns for every alltypes/content row, as PostgreSQL text (TimeZone as above).
expected = {}
for table in ["alltypes", "content"]:
    cols = psql(f"SELECT column_name FROM information_schema.columns WHERE table_name = '{table}' ORDER BY ordinal_position")
    keys = ", ".join(f"'{c}'" for c in cols)
    # concat() runs the type's output function, exactly as pgoutput does
    # (a plain ::text cast would strip char(n) padding).
    vals = ", ".join(f"CASE WHEN {c} IS NULL THEN NULL ELSE concat({c}) END" for c in cols)
    rows = psql(f"SELECT json_object(ARRAY[{keys}], ARRAY[{vals}]) FROM {table} ORDER BY id")
    expected[table] = [json.loads(r) for r in rows]

manifest = {
    "about": "pgoutput messages captured (each `files` entry is \"<file> <lsn>\") from PostgreSQL 15 by tests/corpus/capture/capture.py; one message per file. "
             "Long transactions/stream blocks are trimmed to their first 12 and last 4 data messages. "
             "`expected` holds every column of every row as its type output function prints it (what pgoutput sends in text mode), with TimeZone=" + TZ + ".",
    "server_version": psql("SHOW server_version")[0],
    "timezone": TZ,
    "sets": sets,
    "expected": expected,
}
with open(os.path.join(OUT, "manifest.json"), "w") as fh:
    # one line per file / row keeps diffs readable without bloating the file
    text = json.dumps(manifest, ensure_ascii=False, indent=1)
    fh.write(text)
    fh.write("\n")
print(seq, "files")

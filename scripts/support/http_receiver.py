"""The "external HTTP system" that pgfanout's webhook sink delivers to, for tests and the demo.

It verifies Standard Webhooks signatures (HMAC-SHA256 over "id.timestamp.body"), applies each
batch at most once per idempotency key, and lets tests inject failures and read back what was
applied, each test isolated by its own URL path (e.g. POST /t_ab12cd).

Usage: python http_receiver.py --host 127.0.0.1 --port 8090 --secret SECRET [--state FILE]
  POST /<path>            a batch: JSON {"events": [...]} with webhook-id / webhook-timestamp /
                          webhook-signature ("v1,<base64>" entries, space-separated) headers
  POST /_control/<path>   {"fail_next": N, "status": 503} | {"hold": true|false} | {"reset": true}
  GET  /_stats/<path>     {"batches", "events", "duplicates", "rejected", "failed", "keys"}
  GET  /_events/<path>    every applied event, in order;   GET /healthz -> 200
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

TOLERANCE_SECONDS = 5 * 60  # Standard Webhooks' recommended replay window


def sign(secret, msg_id, timestamp, body):
    """The `v1,<base64>` signature a sender puts in `webhook-signature` (tests use it too)."""
    digest = hmac.new(secret.encode(), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class Rejected(Exception):
    """A batch the receiver refuses to trust or parse; it is counted and nothing is applied."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


def new_path_state():
    return {"events": [], "keys": [], "batches": 0, "duplicates": 0, "rejected": 0, "failed": 0,
            "fail_next": 0, "fail_status": 503, "hold": False}


class Receiver:
    """All paths' state behind one lock, optionally journaled to a file.

    The journal is append-only, one JSON line per change of state, replayed on start: rewriting
    the whole state per batch made the receiver quadratic in the events it held (a 1M-event
    benchmark spent its time here, not in pgfanout)."""

    def __init__(self, secret, state_file=None):
        self.secret = secret
        self.lock = threading.Lock()
        self.paths = {}
        self.key_sets = {}  # path -> set(keys)
        self.journal = None
        if state_file:
            if os.path.exists(state_file):
                with open(state_file) as f:
                    for line in f:
                        if line.endswith("\n"):  # a torn last line was never acknowledged
                            self._apply(json.loads(line))
            self.journal = open(state_file, "a")

    def _path(self, path):
        if path not in self.paths:
            self.paths[path] = new_path_state()
            self.key_sets[path] = set()
        return self.paths[path]

    def _apply(self, op):
        path = op["path"]
        if op.get("reset"):
            self.paths.pop(path, None)
            self.key_sets.pop(path, None)
        st = self._path(path)
        if "key" in op:
            st["events"].extend(op["events"])
            st["keys"].append(op["key"])
            self.key_sets[path].add(op["key"])
            st["batches"] += 1
        for field in op.get("incr", ()):
            st[field] += 1
        st.update(op.get("set", {}))
        return st

    def _commit(self, op):
        """Applies one change of state and journals it (the caller holds the lock)."""
        st = self._apply(op)
        if self.journal:
            # Flushed to the OS before the answer goes out: a killed receiver keeps every batch
            # it acknowledged.
            self.journal.write(json.dumps(op) + "\n")
            self.journal.flush()
        return st

    def verify(self, headers, body):
        """The batch's idempotency key and events, or Rejected."""
        msg_id = headers.get("webhook-id")
        timestamp = headers.get("webhook-timestamp")
        signatures = headers.get("webhook-signature")
        if not (msg_id and timestamp and signatures):
            raise Rejected(401, "missing webhook-id, webhook-timestamp or webhook-signature")
        try:
            ts = int(timestamp)
        except ValueError:
            raise Rejected(401, "webhook-timestamp is not an integer") from None
        if abs(time.time() - ts) > TOLERANCE_SECONDS:
            raise Rejected(401, "webhook-timestamp outside the 5 minute tolerance")
        expected = sign(self.secret, msg_id, timestamp, body)
        # Several signatures may be sent (secret rotation); one valid v1 entry is enough.
        if not any(hmac.compare_digest(expected, s) for s in signatures.split()):
            raise Rejected(401, "no valid v1 signature")
        idem = headers.get("Idempotency-Key")
        if idem is not None and idem != msg_id:
            raise Rejected(400, "Idempotency-Key differs from webhook-id")
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
            raise Rejected(400, 'body must be a JSON object with an "events" list')
        return msg_id, doc["events"]

    def deliver(self, path, headers, body):
        """Returns (status, response dict) for one batch POST."""
        try:
            key, events = self.verify(headers, body)
        except Rejected as rej:
            with self.lock:
                self._commit({"path": path, "incr": ["rejected"]})
            return rej.status, {"error": str(rej)}
        with self.lock:
            st = self._path(path)
            # An unavailable receiver fails before it looks at keys, like a real outage.
            if st["hold"] or st["fail_next"] > 0:
                status = 503 if st["hold"] else st["fail_status"]
                left = st["fail_next"] - (0 if st["hold"] else 1)
                self._commit({"path": path, "incr": ["failed"], "set": {"fail_next": left}})
                return status, {"error": "injected failure"}
            if key in self.key_sets[path]:
                self._commit({"path": path, "incr": ["duplicates"]})
                return 200, {"duplicate": True}
            self._commit({"path": path, "key": key, "events": events})
            return 200, {"accepted": len(events)}

    def control(self, path, cmd):
        with self.lock:
            op = {"path": path, "reset": bool(cmd.get("reset")), "set": {}}
            if "fail_next" in cmd:
                op["set"].update(fail_next=int(cmd["fail_next"]), fail_status=int(cmd.get("status", 503)))
            if "hold" in cmd:
                op["set"]["hold"] = bool(cmd["hold"])
            st = self._commit(op)
            return {"fail_next": st["fail_next"], "hold": st["hold"]}

    def stats(self, path):
        with self.lock:
            st = self.paths.get(path) or new_path_state()
            return {"batches": st["batches"], "events": len(st["events"]), "duplicates": st["duplicates"],
                    "rejected": st["rejected"], "failed": st["failed"], "keys": len(st["keys"])}

    def events(self, path):
        with self.lock:
            return list((self.paths.get(path) or new_path_state())["events"])


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as an HTTP client pool expects
    # Headers and body go out in two writes; with Nagle on, keep-alive clients wait ~40 ms.
    disable_nagle_algorithm = True
    receiver = None
    verbose = False

    def log_message(self, fmt, *args):
        if self.verbose:
            super().log_message(fmt, *args)

    def _json(self, status, doc):
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/healthz":
            return self._json(200, {"ok": True})
        for prefix, fn in (("/_stats/", self.receiver.stats), ("/_events/", self.receiver.events)):
            if path.startswith(prefix):
                return self._json(200, fn("/" + path[len(prefix):]))
        self._json(404, {"error": "not found"})

    def do_POST(self):
        path = urlsplit(self.path).path
        body = self._body()
        if path.startswith("/_control/"):
            try:
                cmd = json.loads(body or b"{}")
            except ValueError:
                return self._json(400, {"error": "control body must be JSON"})
            return self._json(200, self.receiver.control("/" + path[len("/_control/"):], cmd))
        status, doc = self.receiver.deliver(path, self.headers, body)
        self._json(status, doc)


def main():
    ap = argparse.ArgumentParser(description="pgfanout's test/demo webhook receiver")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8090, help="0 picks a free port (printed on start)")
    ap.add_argument("--secret", required=True, help="HMAC key (its UTF-8 bytes)")
    ap.add_argument("--state", help="journal file (JSON lines) that keeps applied batches across restarts")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()

    Handler.receiver = Receiver(args.secret, args.state)
    Handler.verbose = args.verbose
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True

    def stop(*_):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"http_receiver listening on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()

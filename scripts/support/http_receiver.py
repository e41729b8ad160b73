"""The "external HTTP system" that pgfanout's webhook sink delivers to, for tests and the demo.

It behaves like a strict Standard Webhooks receiver: it verifies each batch's signature with the
official `standardwebhooks` package (a `whsec_<base64>` secret, or a raw one as its UTF-8 bytes,
as pgfanout's `http.secret`), applies each batch at most once per Idempotency-Key, the key alone
(never looking at the events' ids), and counts a key that arrives again with a different body
("conflicts": a sender that re-cuts batches on replay). Tests inject failures and read back what
was applied, each test isolated by its own URL path (e.g. POST /t_ab12cd).

Usage: python http_receiver.py --host 127.0.0.1 --port 8090 --secret SECRET [--state FILE]
  POST /<path>            a batch: JSON {"events": [...]} with Idempotency-Key, webhook-id,
                          webhook-timestamp and webhook-signature ("v1,<base64>" entries) headers
  POST /_control/<path>   {"fail_next": N, "status": 503, "retry_after": "2"} | {"hold": true|false}
                          | {"reset": true}
  GET  /_stats/<path>     {"batches", "events", "duplicates", "conflicts", "rejected", "failed", "keys"}
  GET  /_events/<path>    every applied event, in order
  GET  /_conflicts/<path> [{"key", "applied", "received", "first_difference"}] for each conflict
  GET  /healthz -> 200
"""

import argparse
import hashlib
import json
import os
import signal
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from standardwebhooks import Webhook


def webhook(secret):
    """The verifier for `secret`: a `whsec_` secret as Standard Webhooks defines it, any other
    string as its UTF-8 bytes (the library would base64-decode it, silently dropping characters
    outside the alphabet). Bytes are the key itself."""
    if isinstance(secret, bytes) or secret.startswith("whsec_"):
        return Webhook(secret)
    return Webhook(secret.encode())


def sign(secret, msg_id, timestamp, body):
    """The `v1,<base64>` signature a sender puts in `webhook-signature` (tests use it too)."""
    when = datetime.fromtimestamp(int(timestamp), tz=timezone.utc)
    return webhook(secret).sign(msg_id, when, body.decode())


class Rejected(Exception):
    """A batch the receiver refuses to trust or parse; it is counted and nothing is applied."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status


def new_path_state():
    return {"events": [], "keys": [], "batches": 0, "duplicates": 0, "conflicts": 0, "rejected": 0,
            "failed": 0, "fail_next": 0, "fail_status": 503, "retry_after": None, "hold": False,
            "conflict_list": []}


def digest(body):
    return hashlib.sha256(body).hexdigest()


class Receiver:
    """All paths' state behind one lock, optionally journaled to a file.

    The journal is append-only, one JSON line per change of state, replayed on start: rewriting
    the whole state per batch made the receiver quadratic in the events it held (a 1M-event
    benchmark spent its time here, not in pgfanout)."""

    def __init__(self, secret, state_file=None):
        self.webhook = webhook(secret)
        self.lock = threading.Lock()
        self.paths = {}
        # path -> {key: (digest of the body applied under it, index of its first event, count)}
        self.key_sets = {}
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
            self.key_sets[path] = {}
        return self.paths[path]

    def _apply(self, op):
        path = op["path"]
        if op.get("reset"):
            self.paths.pop(path, None)
            self.key_sets.pop(path, None)
        st = self._path(path)
        if "key" in op:
            st["keys"].append(op["key"])
            self.key_sets[path][op["key"]] = (op.get("digest"), len(st["events"]), len(op["events"]))
            st["events"].extend(op["events"])
            st["batches"] += 1
        if "conflict" in op:
            st["conflict_list"].append(op["conflict"])
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
        try:
            # Checks the headers, the 5 minute timestamp tolerance and the signatures (one valid
            # v1 entry of several is enough: secret rotation); parses the JSON.
            doc = self.webhook.verify(body, dict(headers.items()))
        except Exception as e:  # WebhookVerificationError, or a malformed header or body
            raise Rejected(401, f"signature verification failed: {e}") from None
        # The key a receiver de-duplicates by; it must be the signed webhook-id, or anyone could
        # replay a signed batch under a fresh key.
        idem = headers.get("Idempotency-Key")
        if idem is None:
            raise Rejected(400, "no Idempotency-Key")
        if idem != headers.get("webhook-id"):
            raise Rejected(400, "Idempotency-Key differs from webhook-id")
        if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
            raise Rejected(400, 'body must be a JSON object with an "events" list')
        return idem, doc["events"]

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
                doc = {"error": "injected failure"}
                if st["retry_after"] is not None and not st["hold"]:
                    doc["retry_after"] = st["retry_after"]
                return status, doc
            d = digest(body)
            if key in self.key_sets[path]:
                applied_digest, start, count = self.key_sets[path][key]
                if applied_digest not in (None, d):
                    # Already applied under this key, so ignored like any duplicate: the events
                    # it carries now are lost to a key-deduplicating receiver.
                    applied = st["events"][start:start + count]
                    diff = next(({"index": i, "applied": a, "received": b}
                                 for i, (a, b) in enumerate(zip(applied, events)) if a != b), None)
                    conflict = {"key": key, "applied": count, "received": len(events), "first_difference": diff}
                    self._commit({"path": path, "incr": ["duplicates", "conflicts"], "conflict": conflict})
                    return 200, {"duplicate": True, "conflict": True}
                self._commit({"path": path, "incr": ["duplicates"]})
                return 200, {"duplicate": True}
            self._commit({"path": path, "key": key, "events": events, "digest": d})
            return 200, {"accepted": len(events)}

    def control(self, path, cmd):
        with self.lock:
            op = {"path": path, "reset": bool(cmd.get("reset")), "set": {}}
            if "fail_next" in cmd:
                op["set"].update(fail_next=int(cmd["fail_next"]), fail_status=int(cmd.get("status", 503)),
                                 retry_after=cmd.get("retry_after"))
            if "hold" in cmd:
                op["set"]["hold"] = bool(cmd["hold"])
            st = self._commit(op)
            return {"fail_next": st["fail_next"], "hold": st["hold"]}

    def stats(self, path):
        with self.lock:
            st = self.paths.get(path) or new_path_state()
            return {"batches": st["batches"], "events": len(st["events"]), "duplicates": st["duplicates"],
                    "conflicts": st["conflicts"], "rejected": st["rejected"], "failed": st["failed"],
                    "keys": len(st["keys"])}

    def conflicts(self, path):
        with self.lock:
            return list((self.paths.get(path) or new_path_state())["conflict_list"])

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

    def _json(self, status, doc, retry_after=None):
        body = json.dumps(doc).encode()
        self.send_response(status)
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        if 300 <= status < 400:
            self.send_header("Location", "/_moved" + urlsplit(self.path).path)
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
        for prefix, fn in (("/_stats/", self.receiver.stats), ("/_events/", self.receiver.events),
                           ("/_conflicts/", self.receiver.conflicts)):
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
        self._json(status, doc, doc.pop("retry_after", None))


def main():
    ap = argparse.ArgumentParser(description="pgfanout's test/demo webhook receiver")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8090, help="0 picks a free port (printed on start)")
    ap.add_argument("--secret", required=True,
                    help="whsec_<base64 of the key>, or any other string: the key is its UTF-8 bytes")
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

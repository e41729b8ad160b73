"""Tests of the webhook receiver (http_receiver.py): signatures, idempotency, injected failures.

The sidecar's end-to-end tests trust these counters to prove exactly-once delivery, so the
receiver's own behaviour is pinned here. Needs the venv's `standardwebhooks`; runs in about a
second.
"""

import base64
import hashlib
import hmac
import http.client
import json
import os
import subprocess
import sys
import time
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from http_receiver import sign  # noqa: E402

# A Standard Webhooks secret: the key is the 24 bytes the base64 stands for.
SECRET = "whsec_" + base64.b64encode(b"pgfanout receiver test key").decode()


def start(state, secret=SECRET):
    proc = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "http_receiver.py"),
         "--port", "0", "--secret", secret, "--state", str(state)],
        stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "listening" in line, line
    return proc, int(line.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    proc, port = start(tmp_path_factory.mktemp("recv") / "state.jsonl")
    yield port
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def path():
    return "/t_" + uuid.uuid4().hex[:8]


def call(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else None


def call_headers(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders())


def signed(events, key=None, secret=SECRET, ts=None, idem=True):
    """A batch's body and headers as a Standard Webhooks sender makes them."""
    key = key or str(uuid.uuid4())
    ts = str(int(time.time()) if ts is None else ts)
    body = json.dumps({"events": events}).encode()
    headers = {"webhook-id": key, "webhook-timestamp": ts,
               "webhook-signature": "v1,AAAA " + sign(secret, key, ts, body),
               "Content-Type": "application/json"}
    if idem:
        headers["Idempotency-Key"] = key
    return body, headers


def post_batch(port, path, events, key=None, secret=SECRET, tamper=False, ts=None, idem=True):
    body, headers = signed(events, key, secret, ts, idem)
    if tamper:
        body = body.replace(b"}", b',"x":1}', 1)
    return call(port, "POST", path, body, headers)


def stats(port, path):
    return call(port, "GET", "/_stats" + path)[1]


def test_healthz(port):
    assert call(port, "GET", "/healthz")[0] == 200


def test_good_signature_applied(port, path):
    assert post_batch(port, path, [{"id": 1}, {"id": 2}]) == (200, {"accepted": 2})
    assert post_batch(port, path, [{"id": 3}])[0] == 200
    assert call(port, "GET", "/_events" + path)[1] == [{"id": 1}, {"id": 2}, {"id": 3}]
    assert stats(port, path) == {"batches": 2, "events": 3, "duplicates": 0, "conflicts": 0,
                                 "rejected": 0, "failed": 0, "keys": 2}


def test_standard_webhooks_signature_of_the_sender():
    """The signature pgfanout computes (src/sinks/http.rs, same test vector) verifies here."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", b'{"test": 2432232314}') == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_bad_signatures_rejected(port, path):
    assert post_batch(port, path, [{"id": 1}], tamper=True)[0] == 401
    assert post_batch(port, path, [{"id": 1}], secret="whsec_" + base64.b64encode(b"wrong").decode())[0] == 401
    # The raw secret's text is not its key: a sender must decode whsec_.
    assert post_batch(port, path, [{"id": 1}], secret=SECRET.encode())[0] == 401
    assert post_batch(port, path, [{"id": 1}], ts=int(time.time()) - 600)[0] == 401
    assert call(port, "POST", path, b'{"events": []}')[0] == 401  # no headers at all
    assert post_batch(port, path, [{"id": 1}], idem=False)[0] == 400  # nothing to de-duplicate by
    s = stats(port, path)
    assert (s["rejected"], s["events"], s["batches"]) == (6, 0, 0)


def test_raw_secret_is_its_utf8_bytes(tmp_path, path):
    raw = "plain-secret-äö"
    proc, port = start(tmp_path / "state.jsonl", secret=raw)
    try:
        ts = str(int(time.time()))
        body = json.dumps({"events": [{"id": 1}]}).encode()
        mac = hmac.new(raw.encode(), f"k1.{ts}.".encode() + body, hashlib.sha256).digest()  # by hand
        headers = {"webhook-id": "k1", "webhook-timestamp": ts, "Idempotency-Key": "k1",
                   "webhook-signature": "v1," + base64.b64encode(mac).decode()}
        assert call(port, "POST", path, body, headers) == (200, {"accepted": 1})
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_duplicate_key_applied_once(port, path):
    assert post_batch(port, path, [{"id": 1}], key="batch-1")[0] == 200
    assert post_batch(port, path, [{"id": 1}], key="batch-1") == (200, {"duplicate": True})
    s = stats(port, path)
    assert (s["batches"], s["events"], s["duplicates"], s["conflicts"], s["keys"]) == (1, 1, 1, 0, 1)


def test_same_key_other_body_is_a_conflict(port, path):
    """De-duplication by key alone: other events under a known key are ignored, and counted."""
    assert post_batch(port, path, [{"id": 1}, {"id": 2}], key="batch-1")[0] == 200
    assert post_batch(port, path, [{"id": 1}], key="batch-1") == (200, {"duplicate": True, "conflict": True})
    assert post_batch(port, path, [{"id": 1}, {"id": 2}], key="batch-1") == (200, {"duplicate": True})
    s = stats(port, path)
    assert (s["batches"], s["events"], s["duplicates"], s["conflicts"]) == (1, 2, 2, 1)
    assert call(port, "GET", "/_conflicts" + path)[1] == [{
        "key": "batch-1", "applied": 2, "received": 1,
        "first_difference": None}]  # the received events are a prefix of those applied
    assert post_batch(port, path, [{"id": 1}, {"id": 3}], key="batch-1")[0] == 200
    assert call(port, "GET", "/_conflicts" + path)[1][1]["first_difference"] == {
        "index": 1, "applied": {"id": 2}, "received": {"id": 3}}


def test_fail_next_and_hold(port, path):
    assert call(port, "POST", "/_control" + path, json.dumps({"fail_next": 2, "status": 500}).encode())[0] == 200
    assert post_batch(port, path, [{"id": 1}], key="k1")[0] == 500
    assert post_batch(port, path, [{"id": 1}], key="k1")[0] == 500
    assert post_batch(port, path, [{"id": 1}], key="k1")[0] == 200  # the retry finally lands

    call(port, "POST", "/_control" + path, b'{"hold": true}')
    assert post_batch(port, path, [{"id": 2}], key="k2")[0] == 503
    assert post_batch(port, path, [{"id": 2}], key="k2")[0] == 503
    call(port, "POST", "/_control" + path, b'{"hold": false}')
    assert post_batch(port, path, [{"id": 2}], key="k2")[0] == 200
    assert stats(port, path) == {"batches": 2, "events": 2, "duplicates": 0, "conflicts": 0,
                                 "rejected": 0, "failed": 4, "keys": 2}

    call(port, "POST", "/_control" + path, b'{"reset": true}')
    assert stats(port, path)["batches"] == 0
    assert post_batch(port, path, [{"id": 1}], key="k1") == (200, {"accepted": 1})


def test_injected_retry_after_and_redirect(port):
    path = "/t_" + uuid.uuid4().hex[:8]
    call(port, "POST", "/_control" + path, json.dumps({"fail_next": 1, "status": 429, "retry_after": "3"}).encode())
    status, headers = call_headers(port, "POST", path, *signed([{"id": 1}]))
    assert (status, headers.get("Retry-After")) == (429, "3")
    call(port, "POST", "/_control" + path, json.dumps({"fail_next": 1, "status": 307}).encode())
    status, headers = call_headers(port, "POST", path, *signed([{"id": 1}]))
    assert status == 307 and headers["Location"].endswith(path)
    assert stats(port, path)["failed"] == 2


def test_state_survives_a_kill(tmp_path, path):
    """A receiver killed and restarted keeps every batch it acknowledged (the outage tests stop it)."""
    state = tmp_path / "state.jsonl"
    proc, port = start(state)
    try:
        assert post_batch(port, path, [{"id": 1}, {"id": 2}], key="k1")[0] == 200
        assert post_batch(port, path, [{"id": 1}], key="k1")[0] == 200  # duplicate
        call(port, "POST", "/_control" + path, b'{"fail_next": 1}')
        assert post_batch(port, path, [{"id": 3}], key="k2")[0] == 503
        before = stats(port, path)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    proc, port = start(state)
    try:
        assert stats(port, path) == before
        assert post_batch(port, path, [{"id": 1}], key="k1") == (200, {"duplicate": True, "conflict": True})
        assert post_batch(port, path, [{"id": 1}, {"id": 2}], key="k1") == (200, {"duplicate": True})
        assert [e["id"] for e in call(port, "GET", "/_events" + path)[1]] == [1, 2]
    finally:
        proc.kill()
        proc.wait(timeout=10)

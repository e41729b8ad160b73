"""Tests of the webhook receiver (http_receiver.py): signatures, idempotency, injected failures.

The sidecar's end-to-end tests trust these counters to prove exactly-once delivery, so the
receiver's own behaviour is pinned here. Standard library only; runs in well under a second.
"""

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

SECRET = "test-secret"


def start(state):
    proc = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "http_receiver.py"),
         "--port", "0", "--secret", SECRET, "--state", str(state)],
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


def post_batch(port, path, events, key=None, secret=SECRET, tamper=False, ts=None):
    key = key or str(uuid.uuid4())
    ts = str(int(time.time()) if ts is None else ts)
    body = json.dumps({"events": events}).encode()
    headers = {"webhook-id": key, "webhook-timestamp": ts, "Idempotency-Key": key,
               "webhook-signature": "v1,AAAA " + sign(secret, key, ts, body),
               "Content-Type": "application/json"}
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
    assert stats(port, path) == {"batches": 2, "events": 3, "duplicates": 0, "rejected": 0,
                                 "failed": 0, "keys": 2}


def test_bad_signatures_rejected(port, path):
    assert post_batch(port, path, [{"id": 1}], tamper=True)[0] == 401
    assert post_batch(port, path, [{"id": 1}], secret="wrong")[0] == 401
    assert post_batch(port, path, [{"id": 1}], ts=int(time.time()) - 600)[0] == 401
    assert call(port, "POST", path, b'{"events": []}')[0] == 401  # no headers at all
    s = stats(port, path)
    assert (s["rejected"], s["events"], s["batches"]) == (4, 0, 0)


def test_duplicate_key_applied_once(port, path):
    assert post_batch(port, path, [{"id": 1}], key="batch-1")[0] == 200
    assert post_batch(port, path, [{"id": 1}], key="batch-1") == (200, {"duplicate": True})
    s = stats(port, path)
    assert (s["batches"], s["events"], s["duplicates"], s["keys"]) == (1, 1, 1, 1)


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
    assert stats(port, path) == {"batches": 2, "events": 2, "duplicates": 0, "rejected": 0,
                                 "failed": 4, "keys": 2}

    call(port, "POST", "/_control" + path, b'{"reset": true}')
    assert stats(port, path)["batches"] == 0
    assert post_batch(port, path, [{"id": 1}], key="k1") == (200, {"accepted": 1})


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
        assert post_batch(port, path, [{"id": 1}], key="k1") == (200, {"duplicate": True})
        assert [e["id"] for e in call(port, "GET", "/_events" + path)[1]] == [1, 2]
    finally:
        proc.kill()
        proc.wait(timeout=10)

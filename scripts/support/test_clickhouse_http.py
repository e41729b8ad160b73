"""Tests of the ClickHouse HTTP adapter (clickhouse_http.py) itself, against a real chdb engine.

The Rust sink's own tests use the adapter through the `clickhouse` crate; these pin down the
protocol details that crate relies on (formats, compressed blocks, multipart params, errors).
Run with the support venv: /root/.cache/pgfanout/venv/bin/python -m pytest scripts/support
"""

import http.client
import json
import os
import ssl
import struct
import subprocess
import sys

import lz4.block
import lz4.frame
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clickhouse_http as ch  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("chdb")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "clickhouse_http.py"),
         "--host", "127.0.0.1", "--port", "0", "--data", str(data)],
        stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "clickhouse_http listening on http://127.0.0.1:PORT ..."
    assert "listening" in line, line
    port = int(line.split("http://127.0.0.1:")[1].split()[0])
    yield port
    proc.terminate()
    proc.wait(timeout=30)


def request(port, path, body=b"", headers=None, method="POST", chunked=False):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    if chunked:
        conn.request(method, path, body=iter([body[:7], body[7:]]), headers=headers or {},
                     encode_chunked=True)
    else:
        conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, data


def sql(port, text, path="/"):
    resp, data = request(port, path, text.encode())
    assert resp.status == 200, data
    return data


def test_ping(server):
    resp, data = request(server, "/ping", method="GET")
    assert (resp.status, data) == (200, b"Ok.\n")


def test_select_formats(server):
    resp, data = request(server, "/?default_format=RowBinaryWithNamesAndTypes", b"SELECT toUInt8(7) AS a, 'xy' AS b")
    assert resp.status == 200
    assert data == b"\x02\x01a\x01b\x05UInt8\x06String\x07\x02xy"
    out = sql(server, "SELECT number AS n FROM numbers(2)", "/?default_format=JSONEachRow")
    assert [json.loads(line) for line in out.splitlines()] == [{"n": 0}, {"n": 1}]
    assert sql(server, "SELECT 1") == b"1\n"  # TabSeparated by default


def test_lz4_frame_and_compress_blocks(server):
    resp, data = request(server, "/", b"SELECT 'hello'", {"Accept-Encoding": "lz4"})
    assert resp.getheader("Content-Encoding") == "lz4"
    assert lz4.frame.decompress(data) == b"hello\n"
    resp, data = request(server, "/?compress=1", b"SELECT 'hello'")
    assert resp.getheader("Content-Encoding") is None
    assert ch.decompress_blocks(data) == b"hello\n"


def test_block_framing_matches_crate():
    # Vector from clickhouse-0.15.3 src/compression/lz4/mod.rs `it_compresses`.
    source = bytes([1, 0, 2, 255, 255, 255, 255, 0, 1, 1, 1, 115, 6, 83, 116, 114, 105, 110, 103, 3, 97, 98, 99])
    expected = bytes([245, 5, 222, 235, 225, 158, 59, 108, 225, 31, 65, 215, 66, 66, 36, 92, 130, 34, 0, 0, 0,
                      23, 0, 0, 0]) + lz4.block.compress(source, store_size=False)
    assert ch.compress_blocks(source) == expected
    assert ch.decompress_blocks(expected + expected) == source + source


def test_compressed_rowbinary_insert(server):
    sql(server, "CREATE DATABASE IF NOT EXISTS t_ins")
    sql(server, "CREATE TABLE t_ins.rows (id UInt64, s String) ENGINE = MergeTree ORDER BY id "
                "SETTINGS non_replicated_deduplication_window = 10")
    rows = b"".join(struct.pack("<Q", i) + b"\x01" + bytes([65 + i]) for i in range(3))
    body = ch.compress_blocks(rows[:10]) + ch.compress_blocks(rows[10:])
    path = "/?database=t_ins&decompress=1&insert_deduplication_token=tok&query=" + \
           "INSERT%20INTO%20rows(id%2Cs)%20FORMAT%20RowBinary"
    for _ in range(2):  # the retried batch is dropped by the token
        resp, data = request(server, path, body, chunked=True)
        assert resp.status == 200, data
        assert json.loads(resp.getheader("X-ClickHouse-Summary"))["written_rows"] == "3"
    assert sql(server, "SELECT count(), groupArray(s) FROM rows", "/?database=t_ins") == b"3\t['A','B','C']\n"

    corrupt = bytearray(body)
    corrupt[0] ^= 1
    resp, data = request(server, path, bytes(corrupt))
    assert resp.getheader("X-ClickHouse-Exception-Code") == "40" and resp.status == 500
    framed = bytes([ch.METHOD_ZSTD]) + body[17:16 + struct.unpack_from("<I", body, 17)[0]]
    resp, data = request(server, path, ch.checksum(framed) + framed)
    assert resp.getheader("X-ClickHouse-Exception-Code") == "89" and b"zstd" in data


def test_multipart_params(server):
    boundary = "clickhouse-rs-boundary-abc"
    fields = [("query", "SELECT {a:UInt32} + 1, {s:String}"), ("param_a", "41"), ("param_s", "it's\\tok")]
    body = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n{v}\r\n' for n, v in fields)
    body += f"--{boundary}--\r\n"
    resp, data = request(server, "/?default_format=JSONEachRow", body.encode(),
                         {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert resp.status == 200, data
    # Parameter values use ClickHouse's escaped text form: "\\t" arrives as a tab.
    assert list(json.loads(data).values()) == [42, "it's\tok"]


def test_error_codes(server):
    resp, data = request(server, "/", b"SELECT * FROM no_such_table")
    assert resp.status == 404 and resp.getheader("X-ClickHouse-Exception-Code") == "60"
    assert data.startswith(b"Code: 60. DB::Exception:")
    resp, data = request(server, "/", b"SELEC 1")
    assert resp.status == 400 and resp.getheader("X-ClickHouse-Exception-Code") == "62"
    resp, data = request(server, "/?database=no_such_db", b"SELECT 1")
    assert resp.status == 404 and resp.getheader("X-ClickHouse-Exception-Code") == "81"
    resp, data = request(server, "/", b"SELECT throwIf(1)")
    assert resp.status == 500


def test_settings_and_database_do_not_leak(server):
    sql(server, "CREATE DATABASE IF NOT EXISTS t_db")
    sql(server, "CREATE TABLE IF NOT EXISTS t_db.only_here (x UInt8) ENGINE = Memory")
    assert sql(server, "SELECT currentDatabase(), getSetting('max_threads')",
               "/?database=t_db&max_threads=3&wait_end_of_query=1") == b"t_db\t3\n"
    assert sql(server, "SELECT count() FROM only_here", "/?database=t_db") == b"0\n"
    sql(server, "SET max_threads = 5")
    after = sql(server, "SELECT currentDatabase(), getSetting('max_threads')")
    assert after.startswith(b"default\t") and after not in (b"default\t3\n", b"default\t5\n")
    resp, _ = request(server, "/?max_threads=4&no_such_setting=1", b"SELECT 1")
    assert (resp.status, resp.getheader("X-ClickHouse-Exception-Code")) == (404, "115")
    assert sql(server, "SELECT getSetting('max_threads')") != b"4\n"


def make_ca(dirpath, name):
    """A CA and a certificate it signs for 127.0.0.1 (openssl, as the Rust TLS tests make them)."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    ca, ca_key = os.path.join(dirpath, f"{name}-ca.pem"), os.path.join(dirpath, f"{name}-ca.key")
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
        "-subj", f"/CN={name} test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-keyout", ca_key, "-out", ca)
    key, csr, cert = (os.path.join(dirpath, f"{name}-server.{ext}") for ext in ("key", "csr", "pem"))
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", key, "-out", csr)
    ext = os.path.join(dirpath, f"{name}-server.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-set_serial", "2", "-days", "2",
        "-extfile", ext, "-out", cert)
    return ca, cert, key


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    certs = tmp_path_factory.mktemp("certs")
    ca, cert, key = make_ca(str(certs), "good")
    other_ca, _, _ = make_ca(str(certs), "other")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "clickhouse_http.py"),
         "--host", "127.0.0.1", "--port", "0", "--data", str(tmp_path_factory.mktemp("chdb_tls")),
         "--tls-cert", cert, "--tls-key", key],
        stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "listening on https://" in line, line
    port = int(line.split("https://127.0.0.1:")[1].split()[0])
    yield port, ca, other_ca
    proc.terminate()
    proc.wait(timeout=30)


def test_tls_mode_serves_https_verified_by_its_ca(tls_server):
    port, ca, other_ca = tls_server
    trusted = ssl.create_default_context(cafile=ca)
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=trusted)
    conn.request("POST", "/?default_format=JSONEachRow", body=b"SELECT 1 + 1 AS two")
    resp = conn.getresponse()
    assert (resp.status, json.loads(resp.read())) == (200, {"two": 2})
    conn.close()

    # Another CA does not vouch for the server's certificate: the client refuses it...
    untrusted = http.client.HTTPSConnection("127.0.0.1", port, timeout=30,
                                            context=ssl.create_default_context(cafile=other_ca))
    with pytest.raises(ssl.SSLCertVerificationError):
        untrusted.request("GET", "/ping")
    untrusted.close()
    # ...plain HTTP gets no answer...
    plain = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain.request("GET", "/ping")
        plain.getresponse()
    plain.close()
    # ...and the adapter goes on serving verified clients.
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=trusted)
    conn.request("GET", "/ping")
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, b"Ok.\n")
    conn.close()

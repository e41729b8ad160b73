"""ClickHouse's HTTP interface in front of the real ClickHouse engine (chdb), for tests only.

No modern ClickHouse server binary can be installed on these machines, but PyPI's chdb-core
is the ClickHouse 26.9 engine in-process; this server speaks the subset of the HTTP protocol
that the Rust `clickhouse` crate (0.15, lz4 + validation) uses, so the sink runs unchanged.

Usage: python clickhouse_http.py --host 127.0.0.1 --port 8123 --data DIR   (GET /ping -> "Ok.")
       add --tls-cert CERT.pem --tls-key KEY.pem to serve HTTPS instead (ClickHouse's https_port)

Deliberate limits (test support, not a server): every user/password is accepted (no
authentication or RBAC; `role` is ignored), sessions (`session_id`) are not kept, requests
are executed one at a time, and zstd-compressed request blocks are rejected.
"""

import argparse
import gzip
import json
import re
import signal
import ssl
import struct
import sys
import threading
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import chdb
import lz4.block
import lz4.frame
from clickhouse_cityhash.cityhash import CityHash128

# URL parameters that ClickHouse's HTTP handler consumes itself; all others are settings.
HTTP_PARAMS = {
    "query", "database", "default_format", "compress", "decompress", "wait_end_of_query",
    "user", "password", "quota_key", "query_id", "session_id", "session_timeout",
    "session_check", "buffer_size", "role", "stacktrace", "enable_http_compression",
    "http_zlib_compression_level", "send_progress_in_http_headers",
    "http_headers_progress_interval_ms", "client_protocol_version", "add_http_cors_header",
}

# ClickHouse's exceptionCodeToHTTPStatus (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp, 26.x),
# so clients see the same statuses as from a real server; anything else is 500.
STATUS_BY_CODE = {194: 401}
STATUS_BY_CODE.update({c: 403 for c in (192, 193, 497, 512, 516)})
STATUS_BY_CODE.update({c: 400 for c in (
    6, 8, 15, 25, 26, 27, 36, 37, 38, 41, 44, 53, 62, 72, 117, 123, 167, 168, 223, 321, 376,
    427, 441, 675, 676)})
STATUS_BY_CODE.update({c: 404 for c in (46, 47, 50, 56, 60, 63, 73, 78, 81, 115, 152, 336, 511)})
STATUS_BY_CODE.update({229: 413, 48: 501, 209: 503, 76: 503, 439: 503, 381: 411, 159: 408,
                       779: 415})

# Compression method bytes of ClickHouse's native block framing.
METHOD_NONE, METHOD_LZ4, METHOD_ZSTD = 0x02, 0x82, 0x90
BLOCK_META = 16 + 9  # CityHash128 checksum + method byte + two UInt32 sizes
OUT_BLOCK = 1 << 20

INSERT_WITH_FORMAT = re.compile(r"^\s*(INSERT\s+INTO\s.*?)\s+FORMAT\s+(\w+)\s*;?\s*$", re.I | re.S)
SET_STATEMENT = re.compile(r"(^|;)\s*SET\s", re.I)
IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
BINARY_FORMATS = ("rowbinary", "native", "parquet", "arrow", "orc", "avro", "protobuf", "msgpack")


class ClickHouseError(Exception):
    """An engine or protocol error, rendered the way ClickHouse renders exceptions."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def from_engine(cls, exc):
        # chdb's messages are ClickHouse's own ("Code: 60. DB::Exception: ..."), sometimes
        # behind a Python-side prefix such as "Streaming insert finish failed: ".
        text = str(exc)
        at = text.find("Code: ")
        if at >= 0:
            text = text[at:]
        m = re.match(r"Code: (\d+)\.", text)
        return cls(int(m.group(1)) if m else 1001, text if m else f"Code: 1001. DB::Exception: {text}")


def checksum(data):
    h = CityHash128(data)
    # The 128-bit hash is stored as two little-endian UInt64 words, high word first.
    return struct.pack("<QQ", h >> 64, h & 0xFFFFFFFFFFFFFFFF)


def decompress_blocks(body):
    """Decode a `decompress=1` body: a sequence of checksummed ClickHouse-compressed blocks."""
    out, pos = [], 0
    while pos < len(body):
        if len(body) - pos < BLOCK_META:
            raise ClickHouseError(271, "Code: 271. DB::Exception: Truncated compressed block header. (CANNOT_DECOMPRESS)")
        method, csize, usize = struct.unpack_from("<BII", body, pos + 16)
        end = pos + 16 + csize
        if csize < 9 or end > len(body):
            raise ClickHouseError(271, "Code: 271. DB::Exception: Truncated or invalid compressed block. (CANNOT_DECOMPRESS)")
        if checksum(body[pos + 16:end]) != body[pos:pos + 16]:
            raise ClickHouseError(40, "Code: 40. DB::Exception: Checksum doesn't match: corrupted data. (CHECKSUM_DOESNT_MATCH)")
        payload = body[pos + 25:end]
        if method == METHOD_LZ4:
            try:
                out.append(lz4.block.decompress(payload, uncompressed_size=usize))
            except lz4.block.LZ4BlockError as exc:
                raise ClickHouseError(271, f"Code: 271. DB::Exception: {exc}. (CANNOT_DECOMPRESS)") from None
        elif method == METHOD_NONE:
            out.append(payload)
        elif method == METHOD_ZSTD:
            raise ClickHouseError(89, "Code: 89. DB::Exception: zstd-compressed blocks (method 0x90) are not "
                                      "supported by this test adapter; use Compression::Lz4. (UNKNOWN_COMPRESSION_METHOD)")
        else:
            raise ClickHouseError(89, f"Code: 89. DB::Exception: Unknown compression method 0x{method:02x}. (UNKNOWN_COMPRESSION_METHOD)")
        pos = end
    return b"".join(out)


def compress_blocks(data):
    """Encode a `compress=1` response: LZ4 blocks in ClickHouse's native framing."""
    out = []
    for start in range(0, len(data), OUT_BLOCK):
        chunk = data[start:start + OUT_BLOCK]
        packed = lz4.block.compress(chunk, store_size=False)
        framed = struct.pack("<BII", METHOD_LZ4, 9 + len(packed), len(chunk)) + packed
        out.append(checksum(framed) + framed)
    return b"".join(out)


def quote(value):
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Engine:
    """The one process-wide chdb session, used by one request at a time."""

    def __init__(self, data_dir):
        self.conn = chdb.connect(f"file:{data_dir}")
        self.lock = threading.Lock()
        # chdb starts with a few settings already changed; a request must leave exactly those.
        self.baseline = self._changed_settings()

    def _q(self, sql, fmt="TabSeparated", params=None):
        try:
            return self.conn.query(sql, fmt, params=params or {})
        except Exception as exc:  # ChdbError / RuntimeError carrying ClickHouse's message
            raise ClickHouseError.from_engine(exc) from None

    def _changed_settings(self):
        rows = self._q("SELECT name, value FROM system.settings WHERE changed", "JSONEachRow").bytes()
        # `database` mirrors USE, which every request sets itself.
        return {r["name"]: r["value"] for r in map(json.loads, rows.splitlines()) if r["name"] != "database"}

    def _restore(self, url_settings, sql):
        # ClickHouse's HTTP requests are stateless, chdb's session is not: undo the URL
        # settings, and any SET statement in the SQL (found by the slower system.settings scan).
        names = set(url_settings)
        if sql is not None and SET_STATEMENT.search(sql):
            current = self._changed_settings()
            names |= {n for n in current if current.get(n) != self.baseline.get(n)}
            names |= {n for n in self.baseline if n not in current}
        for name in sorted(names):
            value = quote(self.baseline[name]) if name in self.baseline else "DEFAULT"
            try:
                self._q(f"SET {name} = {value}")
            except ClickHouseError:
                pass  # an unknown setting from the URL was never applied

    def execute(self, database, settings, sql, fmt, params, insert_data=None):
        """Run one request; returns (body bytes, X-ClickHouse-Summary dict)."""
        with self.lock:
            try:
                # Unqualified names resolve in the request's database, as in ClickHouse.
                self._q(f"USE {quote_ident(database)}")
                if settings:
                    self._q("SET " + ", ".join(f"{k} = {quote(v)}" for k, v in settings.items()))
                if insert_data is not None:
                    return b"", self._insert(sql, insert_data)
                res = self._q(sql, fmt, params)
                return res.bytes(), {
                    "read_rows": res.rows_read(), "read_bytes": res.bytes_read(),
                    "written_rows": res.rows_written(), "written_bytes": res.bytes_written(),
                    "elapsed_ns": int(res.elapsed() * 1e9)}
            finally:
                self._restore(settings, None if insert_data is not None else sql)

    def _insert(self, match, data):
        head, fmt = match.group(1), match.group(2)
        try:
            ins = self.conn.send_insert(head, fmt)
        except Exception as exc:
            raise ClickHouseError.from_engine(exc) from None
        try:
            # Appending in pieces keeps chdb's parser streaming instead of copying one huge buffer.
            for start in range(0, len(data), OUT_BLOCK):
                ins.append(data[start:start + OUT_BLOCK])
            res = ins.finish()
        except Exception as exc:
            ins.cancel()
            raise ClickHouseError.from_engine(exc) from None
        # Note: chdb reports rows_written even for a batch it dropped as a duplicate.
        return {"written_rows": res.rows_written, "written_bytes": res.bytes_written,
                "elapsed_ns": int(res.elapsed * 1e9)}

    def close(self):
        with self.lock:
            self.conn.close()


def quote_ident(name):
    if IDENT.match(name):
        return name
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def parse_multipart(body, content_type):
    """Fields of a multipart/form-data body, as the crate sends `.param()` queries."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise ClickHouseError(36, "Code: 36. DB::Exception: multipart body without boundary. (BAD_ARGUMENTS)")
    fields = {}
    for part in body.split(b"--" + m.group(1).encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, value = part.partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]*)"', head)
        if not name:
            continue
        if re.search(rb"filename=", head):
            raise ClickHouseError(48, "Code: 48. DB::Exception: external tables are not supported by this test adapter. (NOT_IMPLEMENTED)")
        fields[name.group(1).decode()] = value[:-2] if value.endswith(b"\r\n") else value
    return fields


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the crate pools connections
    # Headers and body go out in two writes; with Nagle on, keep-alive clients wait ~40 ms.
    disable_nagle_algorithm = True
    server_version = "pgfanout-clickhouse-http"
    engine = None
    verbose = False

    def log_message(self, fmt, *args):
        if self.verbose:
            super().log_message(fmt, *args)

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            # Here, in the connection's own thread, not in accept(): a client that stalls or
            # refuses the handshake holds up no one else.
            self.request.do_handshake()
        super().setup()

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            # http.server does not decode chunked request bodies; the crate streams inserts so.
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status, body, headers=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path in ("/ping", "/") and "query" not in dict(parse_qsl(url.query)):
            return self._send(200, b"Ok.\n", {"Content-Type": "text/plain; charset=UTF-8"})
        self._handle(url, b"")

    def do_POST(self):
        url = urlsplit(self.path)
        self._handle(url, self._read_body())

    def _handle(self, url, body):
        query_id = str(uuid.uuid4())
        try:
            try:
                payload, summary, params, fmt = self._run(dict(parse_qsl(url.query, keep_blank_values=True)), body)
            except ClickHouseError:
                raise
            except Exception as exc:  # a bug or malformed input: still answer like ClickHouse
                raise ClickHouseError(1001, f"Code: 1001. DB::Exception: {type(exc).__name__}: {exc}. (STD_EXCEPTION)") from exc
        except ClickHouseError as err:
            msg = err.message if err.message.endswith("\n") else err.message + "\n"
            if self.verbose:
                sys.stderr.write(msg)
            return self._send(STATUS_BY_CODE.get(err.code, 500), msg.encode(), {
                "Content-Type": "text/plain; charset=UTF-8",
                "X-ClickHouse-Exception-Code": str(err.code),
                "X-ClickHouse-Query-Id": query_id})
        headers = {
            "Content-Type": "application/octet-stream" if fmt.lower().startswith(BINARY_FORMATS)
            else "text/plain; charset=UTF-8",
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Summary": json.dumps({k: str(v) for k, v in summary.items()}),
        }
        if params.get("compress") == "1":
            payload = compress_blocks(payload)
        accept = self.headers.get("Accept-Encoding", "").lower()
        # ClickHouse 25.10+ compresses by default (enable_http_compression=1); the crate asks
        # for lz4 and decodes an LZ4 *frame*. An empty body is sent as is.
        if payload and params.get("enable_http_compression", "1") != "0":
            if "lz4" in accept:
                payload, headers["Content-Encoding"] = lz4.frame.compress(payload), "lz4"
            elif "gzip" in accept:
                payload, headers["Content-Encoding"] = gzip.compress(payload, 3), "gzip"
            elif "deflate" in accept:
                payload, headers["Content-Encoding"] = zlib.compress(payload, 3), "deflate"
        self._send(200, payload, headers)

    def _run(self, params, body):
        if params.get("decompress") == "1" and body:
            body = decompress_blocks(body)
        encoding = self.headers.get("Content-Encoding", "").lower()
        if body and encoding == "gzip":
            body = gzip.decompress(body)
        elif body and encoding == "lz4":
            body = lz4.frame.decompress(body)
        query_params = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
        sql = params.get("query", "")
        if self.headers.get("Content-Type", "").startswith("multipart/form-data"):
            fields = parse_multipart(body, self.headers["Content-Type"])
            body = fields.pop("query", b"")
            query_params.update({k[6:]: v.decode() for k, v in fields.items() if k.startswith("param_")})
        database = params.get("database") or self.headers.get("X-ClickHouse-Database") or "default"
        fmt = params.get("default_format") or self.headers.get("X-ClickHouse-Format") or "TabSeparated"
        settings = {k: v for k, v in params.items() if k not in HTTP_PARAMS and not k.startswith("param_")}
        for name in settings:
            if not IDENT.match(name):
                raise ClickHouseError(115, f"Code: 115. DB::Exception: Unknown setting '{name}'. (UNKNOWN_SETTING)")
        insert = INSERT_WITH_FORMAT.match(sql) if sql and body else None
        if insert:
            # `INSERT ... FORMAT X` in the URL and rows in the body: stream the rows into chdb.
            payload, summary = self.engine.execute(database, settings, insert, fmt, {}, insert_data=body)
        else:
            # ClickHouse concatenates the URL query and the body into one statement.
            text = "\n".join(p for p in (sql, body.decode("utf-8", "replace")) if p)
            if not text.strip():
                raise ClickHouseError(62, "Code: 62. DB::Exception: Empty query. (SYNTAX_ERROR)")
            payload, summary = self.engine.execute(database, settings, text, fmt, query_params)
        return payload, summary, params, fmt


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that refused our certificate (or spoke plain HTTP to the TLS port) ends the
        # handshake: its error, not the adapter's, so no traceback.
        if isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError)):
            if Handler.verbose:
                sys.stderr.write(f"{client_address}: TLS handshake failed: {sys.exc_info()[1]}\n")
            return
        super().handle_error(request, client_address)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8123, help="0 picks a free port (printed on start)")
    ap.add_argument("--data", required=True, help="chdb data directory (persistent)")
    ap.add_argument("--verbose", action="store_true", help="log every request and error")
    ap.add_argument("--tls-cert", help="PEM certificate (chain) to serve HTTPS with")
    ap.add_argument("--tls-key", help="PEM private key of --tls-cert")
    args = ap.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")

    Handler.engine = Engine(args.data)
    Handler.verbose = args.verbose
    server = Server((args.host, args.port), Handler)
    scheme = "http"
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        scheme = "https"

    def stop(*_):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"clickhouse_http listening on {scheme}://{args.host}:{server.server_address[1]} "
          f"(chdb {chdb.__version__}, data {args.data})", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
        # Closing the session flushes MergeTree state so --data can be reopened later.
        Handler.engine.close()


if __name__ == "__main__":
    main()

"""A loopback S3 API server for the benchmarks: moto in server mode behind a counting, delaying proxy.

Both run in processes of their own. The proxy sees every request any process sends (this one, and a cluster's
workers), so what it counts is what the server is asked for: requests by S3
operation, bytes uploaded (request bodies) and bytes downloaded (GetObject
response bodies). ``latency`` seconds are added to each request before it is
forwarded, to emulate a remote object store; requests are served concurrently,
so concurrent requests overlap their latency as they would against S3.
Requests are also counted by client (the first word of their User-Agent:
``aiobotocore`` for s3fs, ``dask-imgsink`` for our obstore copies), and the
requests of one client can be refused with 403 AccessDenied
(:meth:`S3Proxy.deny`), as a store that does not accept that client would.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "expect"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def operation(method: str, path: str, query: str) -> str:
    """The S3 operation of a path-style request, as far as the benchmarks need to tell them apart."""
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    is_object = path.strip("/").count("/") >= 1
    if "uploads" in params:
        return "CreateMultipartUpload"
    if "uploadId" in params:
        return {"PUT": "UploadPart", "POST": "CompleteMultipartUpload", "DELETE": "AbortMultipartUpload",
                "GET": "ListParts"}.get(method, method)
    if method == "POST" and "delete" in params:
        return "DeleteObjects"
    if method == "GET":
        return "GetObject" if is_object else "ListObjects"
    return {"PUT": "PutObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(method, method)


class Counts:
    """What the proxy saw: requests per operation, bytes up (bodies sent) and down (objects read),
    the most requests it held at once, and the requests that arrived while it held none
    (``alone``, in order: the client waited for each by itself, so each costs a full latency)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.requests: dict[str, int] = {}
            self.bytes_up = 0
            self.bytes_down = 0
            self.in_flight = 0
            self.most_in_flight = 0
            self.alone: list[str] = []
            self.by_client: dict[str, dict[str, int]] = {}
            self.denied = 0

    def start(self, op: str) -> None:
        with self.lock:
            if not self.in_flight:
                self.alone.append(op)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)

    def add(self, op: str, up: int, down: int, client: str) -> None:
        with self.lock:
            self.in_flight -= 1
            self.requests[op] = self.requests.get(op, 0) + 1
            ops = self.by_client.setdefault(client, {})
            ops[op] = ops.get(op, 0) + 1
            self.bytes_up += up
            self.bytes_down += down if op == "GetObject" else 0

    def as_dict(self) -> dict:
        with self.lock:
            return {"requests": dict(self.requests), "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                    "most_in_flight": self.most_in_flight, "total": sum(self.requests.values()),
                    "alone": list(self.alone), "by_client": {c: dict(o) for c, o in self.by_client.items()},
                    "denied": self.denied}


class _Settings:
    latency = 0.0
    deny = ""  # refuse the requests of clients whose User-Agent holds this


_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
           b'<Message>Access Denied (refused by the test proxy for this client)</Message></Error>')


def _handler(backend_port: int, counts: Counts, settings: _Settings):
    local = threading.local()  # one kept-alive connection to the server per proxy thread

    def send(method: str, path: str, body: bytes, headers: dict) -> tuple[http.client.HTTPResponse, bytes]:
        for attempt in range(2):
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = http.client.HTTPConnection("127.0.0.1", backend_port, timeout=300)
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                return response, response.read()
            except (http.client.HTTPException, ConnectionError):
                conn.close()
                local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _reply(self, status: int, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _control(self, split) -> None:
            """``/__proxy__/counts`` (GET); ``/__proxy__/reset``, ``/__proxy__/latency?seconds=`` and
            ``/__proxy__/deny?agent=`` (POST)."""
            action = split.path.rsplit("/", 1)[-1]
            if action == "reset":
                counts.reset()
            elif action == "latency":
                settings.latency = float(urllib.parse.parse_qs(split.query)["seconds"][0])
            elif action == "deny":
                settings.deny = urllib.parse.parse_qs(split.query).get("agent", [""])[0]
            self._reply(200, json.dumps(counts.as_dict()).encode())

        def _forward(self) -> None:
            split = urllib.parse.urlsplit(self.path)
            if split.path.startswith("/__proxy__/"):
                return self._control(split)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            op = operation(self.command, split.path, split.query)
            if "x-amz-copy-source" in {k.lower() for k in headers}:
                op = "CopyObject" if op == "PutObject" else "UploadPartCopy"
            agent = self.headers.get("User-Agent", "")
            if settings.deny and settings.deny in agent:
                with counts.lock:
                    counts.denied += 1
                return self._reply(403, _DENIED)
            counts.start(f"{op} {'/'.join(split.path.split('/')[-2:])}")
            if settings.latency:
                time.sleep(settings.latency)
            response, data = send(self.command, self.path, body, headers)
            counts.add(op, len(body), len(data) if self.command != "HEAD" else 0, agent.split("/", 1)[0])
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in _HOP_HEADERS and key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)) if self.command != "HEAD"
                             else response.getheader("Content-Length", "0"))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Read when the constructor starts listening: socketserver's backlog of 5 drops the SYNs of a
    # client opening dozens of connections at once, and each dropped one stalls a request by 1 s.
    request_queue_size = 1024


def serve(backend_port: int, port_file: str) -> None:
    """Run the proxy in this process (``python s3proxy.py BACKEND_PORT PORT_FILE``) until killed."""
    server = _Server(("127.0.0.1", 0), _handler(backend_port, Counts(), _Settings()))
    with open(port_file + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(port_file + ".tmp", port_file)
    server.serve_forever()


def _wait_http(url: str) -> None:
    for _ in range(300):
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not start")


class S3Proxy:
    """moto's S3 server, and a counting, delaying proxy in front of it (``url``), each in its own process
    (so neither competes with the client for this process's GIL)."""

    def __init__(self, latency: float = 0.0) -> None:
        backend = free_port()
        self.procs = [subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(backend)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        _wait_http(f"http://127.0.0.1:{backend}")
        port_file = tempfile.mktemp(prefix="imgsink-proxy-")
        self.procs.append(subprocess.Popen([sys.executable, __file__, str(backend), port_file]))
        for _ in range(300):
            if os.path.exists(port_file):
                break
            time.sleep(0.05)
        with open(port_file) as f:
            self.url = f"http://127.0.0.1:{f.read()}"
        os.remove(port_file)
        self.set_latency(latency)

    def _control(self, action: str, method: str = "POST") -> dict:
        body = b"" if method == "POST" else None
        request = urllib.request.Request(f"{self.url}/__proxy__/{action}", method=method, data=body)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def counts(self) -> dict:
        """Requests by operation, ``bytes_up``, ``bytes_down``, ``most_in_flight``, ``total`` since the last reset."""
        return self._control("counts", "GET")

    def reset(self) -> None:
        self._control("reset")

    def set_latency(self, seconds: float) -> None:
        self._control(f"latency?seconds={seconds}")

    def deny(self, agent: str) -> None:
        """Refuse, with 403 AccessDenied, every request whose User-Agent holds ``agent`` ("": none)."""
        self._control(f"deny?agent={urllib.parse.quote(agent)}")

    def storage_options(self) -> dict:
        return {"key": "testing", "secret": "testing",
                "client_kwargs": {"endpoint_url": self.url, "region_name": "us-east-1"}}

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.url, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=name)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            proc.wait(30)

    def __enter__(self) -> "S3Proxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])

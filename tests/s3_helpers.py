"""A real S3 API for tests: moto's ``moto_server`` on 127.0.0.1 (a free port), and a
small fault proxy in front of it that fails some PUTs the way S3 does (500 InternalError)."""
from __future__ import annotations

import http.client
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def s3_env(home: Path | None, url: str | None, endpoint: str, **extra: str) -> dict[str, str]:
    """This process's environment without its AWS_/FLOWMAGIC_ settings, plus the test credentials,
    ``home`` as FLOWMAGIC_HOME (None: none) and ``url`` as FLOWMAGIC_STORE (None: a local store)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FLOWMAGIC_"))}
    env.update(CREDENTIALS, FLOWMAGIC_S3_ENDPOINT_URL=endpoint, PYTHONUNBUFFERED="1")
    if home is not None:
        env["FLOWMAGIC_HOME"] = str(home)
    if url:
        env["FLOWMAGIC_STORE"] = url
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``moto_server`` in its own process group, killed by :meth:`stop`."""

    def __init__(self, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        env = {**os.environ, **CREDENTIALS, **(extra_env or {})}
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self._wait()

    def _wait(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=2).read()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto_server did not start")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def make_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        s3 = self.client()
        out = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                out[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


class FaultProxy:
    """An HTTP proxy to ``target`` that answers every ``every``-th PUT (object or part)
    under ``/objects/`` with S3's 500 InternalError, and counts the PUTs that got through."""

    def __init__(self, target_port: int, every: int = 3) -> None:
        self.target_port, self.every = target_port, every
        self.seen = 0
        self.failed = 0
        self.puts: Counter[str] = Counter()   # path -> successful PUTs (completed uploads)
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                path = self.path.split("?", 1)[0]
                if self.command == "PUT" and "/objects/" in path and proxy._should_fail():
                    payload = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
                               b"<Message>injected fault</Message></Error>")
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=300)
                conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST")
                             else None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if self.command == "PUT" and resp.status == 200 and "uploadId=" not in self.path:
                    with proxy._lock:
                        proxy.puts[path] += 1
                if self.command == "POST" and resp.status == 200 and "uploadId=" in self.path:
                    with proxy._lock:   # a multipart upload completed
                        proxy.puts[path] += 1
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                if self.command != "HEAD":   # a HEAD's Content-Length is the object's size
                    self.send_header("Content-Length", str(len(data)))
                elif resp.getheader("Content-Length") is not None:
                    self.send_header("Content-Length", resp.getheader("Content-Length"))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _should_fail(self) -> bool:
        with self._lock:
            if self.every <= 0:
                return False
            self.seen += 1
            if self.seen % self.every == 0:
                self.failed += 1
                return True
            return False

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

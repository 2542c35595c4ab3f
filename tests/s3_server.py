"""A real S3-compatible server for tests: moto's standalone server as a subprocess on a free port.

The server speaks the S3 REST protocol over HTTP; clients (pyarrow.fs, Ray's storage, the
project's mirrors) reach it through the standard ``AWS_ENDPOINT_URL`` variable, as they would a
MinIO server, with throwaway credentials. Nothing in the project knows it is talking to moto.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(log_dir: Path) -> Iterator[Dict[str, str]]:
    """Start the server; yield the environment variables that point S3 clients at it."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(Path(log_dir) / "s3_server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the S3 server did not start: {(Path(log_dir) / 's3_server.log').read_text()}")
                time.sleep(0.2)
        yield {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


class StoreProxy:
    """A TCP proxy in front of the server that can go away and come back, as a store behind a
    network outage does: ``down()`` closes its port (new connections are refused) and cuts the open
    ones; ``up()`` listens on the same port again. The server keeps its buckets meanwhile."""

    def __init__(self, env: Dict[str, str]) -> None:
        host, port = env["AWS_ENDPOINT_URL"].rsplit("//", 1)[1].rsplit(":", 1)
        self.target = (host, int(port))
        self.port = _free_port()
        self.env = dict(env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.port}")
        self._lock = threading.Lock()
        self._open: set = set()
        self._listener = None
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            except OSError:
                pass
            listener.close()
        with self._lock:
            cut, self._open = list(self._open), set()
        for sock in cut:
            self._close(sock)

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            self._close(sock)
            with self._lock:
                self._open.discard(sock)

    @staticmethod
    def _close(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def create_bucket(env: Dict[str, str], bucket: str) -> None:
    from pyarrow import fs

    s3 = fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key=env["AWS_ACCESS_KEY_ID"],
                         secret_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_DEFAULT_REGION"],
                         allow_bucket_creation=True)
    s3.create_dir(bucket)


def download(env: Dict[str, str], uri: str, target: Path) -> Path:
    """Copy everything under ``uri`` (s3://bucket/prefix) into ``target`` with pyarrow alone."""
    from pyarrow import fs

    s3 = fs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key=env["AWS_ACCESS_KEY_ID"],
                         secret_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_DEFAULT_REGION"])
    target.mkdir(parents=True, exist_ok=True)
    fs.copy_files(uri.split("://", 1)[1], str(target), source_filesystem=s3,
                  destination_filesystem=fs.LocalFileSystem())
    return target


def apply(env: Dict[str, str]) -> None:
    os.environ.update(env)

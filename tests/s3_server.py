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

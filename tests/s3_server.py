"""A real S3 API on 127.0.0.1 for the tests: moto's server, reached by pyarrow and boto through the standard AWS
variables (AWS_ENDPOINT_URL, keys, region). Skips the test where boto3 or moto is not installed."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def moto_s3(log_dir: Path, bucket: str) -> Iterator[tuple[str, dict[str, str]]]:
    """Start moto's server on a free port with one empty bucket; yields (``s3://<bucket>``, the AWS_* environment
    that points at it). The server's output goes to ``log_dir/moto.log``."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(log_dir / "moto.log", "wb") as log_file:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=log_file,
        )
        try:
            endpoint = f"http://127.0.0.1:{port}"
            for _ in range(200):
                try:
                    urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            env = {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                         aws_secret_access_key="test").create_bucket(Bucket=bucket)  # fmt: skip
            yield f"s3://{bucket}", env
        finally:
            proc.terminate()
            proc.wait(timeout=10)

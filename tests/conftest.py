"""Shared fixtures: a real distributed.LocalCluster with worker processes."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(scope="session")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        silence_logs=logging.WARNING,
    ) as cluster:
        yield cluster


@pytest.fixture
def client(cluster):
    from distributed import Client

    with Client(cluster) as client:
        yield client


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 API server (moto in server mode) on loopback, for the test session; yields its URL."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the moto S3 server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_proxy_server():
    """Another loopback S3 server, behind the benchmarks' counting proxy (``benchmarks/s3proxy.py``):
    what a test reads from it is counted at the server, whichever process or filesystem instance sent it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    from s3proxy import S3Proxy

    with S3Proxy() as proxy:
        yield proxy


@pytest.fixture
def counted_s3(s3_proxy_server):
    """A fresh bucket on the counting server: ``(url prefix, storage_options, proxy)``, counts reset."""
    import uuid

    bucket = f"imgsink-{uuid.uuid4().hex[:12]}"
    s3_proxy_server.make_bucket(bucket)
    s3_proxy_server.set_latency(0)
    s3_proxy_server.deny("")
    s3_proxy_server.reset()
    yield f"s3://{bucket}", s3_proxy_server.storage_options(), s3_proxy_server


@pytest.fixture
def s3(s3_server):
    """A fresh bucket on the loopback S3 server: ``(url prefix, storage_options, s3fs filesystem)``."""
    import uuid

    import boto3
    import s3fs

    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}}
    bucket = f"imgsink-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)
    yield f"s3://{bucket}", options, fs

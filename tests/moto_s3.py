"""moto's real S3 server as a subprocess on 127.0.0.1, for the tests of the S3 store."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

import boto3
import pytest
from server_process import free_port

BUCKET = "loraplex-test"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_s3_server() -> Iterator[tuple[object, str]]:
    """(client, endpoint) of a fresh moto server holding BUCKET; AWS_* point every boto3 client (and child
    process) at it meanwhile."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as env:
            for key, value in {**AWS_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
                env.setenv(key, value)
            client = boto3.client("s3")
            deadline = time.time() + 60
            while True:
                try:
                    client.create_bucket(Bucket=BUCKET)
                    break
                except Exception:
                    if time.time() > deadline or server.poll() is not None:
                        raise
                    time.sleep(0.2)
            yield client, endpoint
    finally:
        server.kill()
        server.wait()


def keys(client, prefix: str) -> list[str]:
    """Every key under an s3://BUCKET/prefix location, relative to it."""
    bucket_prefix = prefix.removeprefix(f"s3://{BUCKET}/")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=bucket_prefix)
    return sorted(o["Key"].removeprefix(bucket_prefix + "/") for p in pages for o in p.get("Contents", []))

"""An S3 API on loopback for the tests: moto's server mode (`moto[server]`, a dev
dependency), in threads of the test process; no AWS account, no network.

Processes started by a test (workers) reach it through the `AWS_*` variables of `s3_env`,
which they inherit from the test's environment.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest


@contextmanager
def s3_server() -> Iterator[str]:
    """Serve the S3 API on a free 127.0.0.1 port; yields its endpoint URL."""
    server_module = pytest.importorskip("moto.server", reason="pip install 'moto[server]'")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point boto3 at `endpoint`, with dummy credentials,
    and keep it from reading this machine's AWS configuration."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def new_bucket() -> str:
    """A bucket of its own for one test, on the server the environment points at."""
    import boto3

    bucket = f"iwae-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return bucket

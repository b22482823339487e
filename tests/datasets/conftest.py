"""Fixtures of the data tests: a real S3-compatible server (moto's standalone server) on
loopback, and small raw datasets in every supported format."""

import os
import subprocess
import time
import urllib.request
import uuid

import pytest

from stoker.environment import patched_environ
from tests.ports import free_port


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """`moto_server` as a subprocess; the AWS chain finds its dummy credentials in the
    environment, which this fixture sets and restores (never in any config)."""
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    endpoint, process = _start_moto(log, os.environ)
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN",
             "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")
    dummy = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        with patched_environ({**dict.fromkeys(names), **dummy}):
            yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture
def bucket(s3_server):
    """A fresh bucket on the S3 server; yields (endpoint, bucket name, boto3 client)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    name = f"stoker-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=name)
    return s3_server, name, client


def keys(client, bucket: str, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


# The IAM set-up calls, made before moto starts checking credentials and permissions.
_SETUP_ACTIONS = 5


@pytest.fixture
def s3_with_auth(tmp_path):
    """A second moto server that authenticates and authorises every request after its first
    `_SETUP_ACTIONS` (moto's INITIAL_NO_AUTH_ACTION_COUNT): an `admin` user allowed everything
    owns a bucket with one CSV; a `nobody` user has valid keys and no permissions. Yields
    (endpoint, bucket, admin keys, nobody keys), keys as (id, secret)."""
    import boto3

    log = open(tmp_path / "moto-auth.log", "wb")
    endpoint, process = _start_moto(log, {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_ACTIONS)})
    try:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        keys_of = {}
        policy = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'
        iam.create_user(UserName="admin")  # 1
        iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=policy)  # 2
        for user in ("admin", "nobody"):
            if user == "nobody":
                iam.create_user(UserName="nobody")  # 4
            key = iam.create_access_key(UserName=user)["AccessKey"]  # 3, 5
            keys_of[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        # From here on every request is checked.
        admin = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                             aws_access_key_id=keys_of["admin"][0], aws_secret_access_key=keys_of["admin"][1])
        name = f"private-{uuid.uuid4().hex[:8]}"
        admin.create_bucket(Bucket=name)
        admin.put_object(Bucket=name, Key="raw/in.csv", Body=b"a,b,target\n" + b"".join(
            f"{i},{i * 2},{i % 3}\n".encode() for i in range(60)))
        yield endpoint, name, keys_of["admin"], keys_of["nobody"]
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def _start_moto(log, env) -> tuple[str, subprocess.Popen]:
    """`moto_server` on a free loopback port, once it answers; (endpoint, process)."""
    port = free_port()
    process = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            return endpoint, process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto_server did not start on {endpoint}") from None
            time.sleep(0.2)

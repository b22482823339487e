"""Wrong credentials and unreadable buckets, against a moto server that enforces IAM auth:
`stoker data prepare` exits 2 with one line naming the S3 path, and writes nothing.

A user with valid keys and no permissions cannot be told apart here: moto's signature check
rejects s3fs's first listing request (its encoded `prefix=.../` query) before it looks at
permissions, so that case reads as a bad signature too; a missing bucket is in test_s3.py."""

import os
import subprocess
import sys

import pytest
import yaml


def prepare_cli(tmp_path, endpoint, bucket, key_id, secret):
    config = {
        "name": "auth", "storage": str(tmp_path / "runs"),
        "data": {"source": f"s3://{bucket}/raw/in.csv", "label": "target",
                 "output": str(tmp_path / "out"), "s3": {"endpoint_url": endpoint}},
        "model": {"name": "mlp"}, "train": {"epochs": 1},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION="us-east-1",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    return subprocess.run([sys.executable, "-m", "stoker", "data", "prepare", str(path)],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("who", ["unknown key", "wrong secret"])
def test_bad_credentials_exit_2_naming_the_path(s3_with_auth, tmp_path, who):
    endpoint, bucket, admin, _ = s3_with_auth
    key_id, secret = {
        "unknown key": ("AKIAUNKNOWN000000000", "x" * 40),
        "wrong secret": (admin[0], "not-the-secret"),
    }[who]
    done = prepare_cli(tmp_path, endpoint, bucket, key_id, secret)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"stoker: error: data.source: s3://{bucket}/raw/in.csv: "), lines[0]
    assert "access denied" in lines[0] and "AWS credentials" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_the_bucket_is_readable_with_the_right_credentials(s3_with_auth, tmp_path):
    # The control for the test above, through stoker itself: the same command with the right
    # keys from the environment prepares the data, so the refusals above were the credentials
    # (a stoker that sent none, or the wrong ones, would fail here too).
    endpoint, bucket, admin, _ = s3_with_auth
    done = prepare_cli(tmp_path, endpoint, bucket, *admin)
    assert done.returncode == 0, done.stderr
    assert "prepared " in done.stdout and "train 42, validation 9, test 9 rows" in done.stdout, done.stdout
    assert (tmp_path / "out" / "manifest.json").is_file()

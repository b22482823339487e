"""The one S3 helper (`s3_access`) behind the three filesystems storage.py builds: fsspec's for
listing and bytes, pyarrow's for Ray Data reads, s3fs-in-pyarrow for Ray Train's storage.
Against moto's S3 server on loopback; credentials only from the environment (the AWS chain)."""

import pickle

import pyarrow.fs as pafs

from stoker.datasets.config import S3Config
from stoker.datasets.storage import arrow_filesystem, filesystem, ray_filesystem, s3_access
from stoker.environment import patched_environ

NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
                  "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
                  "AWS_EC2_METADATA_DISABLED": "true"}


def test_s3_access_takes_endpoint_and_region_from_the_config_and_credentials_only_when_carried(s3_server):
    config = S3Config(endpoint_url=s3_server, region="eu-west-1")
    plain = s3_access(config)
    assert (plain.endpoint, plain.region, plain.key) == (s3_server, "eu-west-1", None)
    carried = s3_access(config, carry_credentials=True)
    assert (carried.key, carried.secret, carried.region) == ("testing", "testing", "eu-west-1")
    # Without a configured region, the carried one is the AWS chain's (AWS_DEFAULT_REGION).
    assert s3_access(S3Config(endpoint_url=s3_server), carry_credentials=True).region == "us-east-1"
    assert s3_access(S3Config(endpoint_url=s3_server)).region is None
    with patched_environ({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1"}):
        assert s3_access(None).endpoint == "http://127.0.0.1:1"


def test_local_paths_get_no_s3_filesystem(tmp_path):
    assert arrow_filesystem(str(tmp_path)) is None
    assert ray_filesystem(str(tmp_path)) is None
    assert filesystem(tmp_path).protocol[0] == "file"


def test_the_three_filesystems_reach_one_bucket_and_the_carried_ones_keep_their_credentials(bucket):
    endpoint, name, client = bucket
    config = S3Config(endpoint_url=endpoint)
    filesystem(f"s3://{name}/a.txt", config).pipe(f"{name}/a.txt", b"one")
    arrow = arrow_filesystem(f"s3://{name}/a.txt", config)
    ray = ray_filesystem(f"s3://{name}/a.txt", config)
    # Pickled as Ray ships them to workers, then read where the environment has no credentials.
    arrow, ray = pickle.loads(pickle.dumps(arrow)), pickle.loads(pickle.dumps(ray))
    with patched_environ(NO_CREDENTIALS):
        with arrow.open_input_stream(f"{name}/a.txt") as handle:
            assert handle.read() == b"one"
        with ray.open_output_stream(f"{name}/b.txt") as handle:
            handle.write(b"two")
        assert ray.get_file_info(f"{name}/b.txt").type == pafs.FileType.File
    assert client.get_object(Bucket=name, Key="b.txt")["Body"].read() == b"two"


def test_apply_reads_new_rows_from_s3_with_the_typed_s3_config(bucket, tmp_path):
    import pandas as pd
    import pyarrow.parquet as pq

    from stoker.datasets.apply import apply
    from stoker.datasets.config import DataConfig
    from stoker.datasets.prepare import prepare

    endpoint, name, client = bucket
    raw = pd.DataFrame({"x": [float(i % 7) for i in range(120)], "target": [i % 2 for i in range(120)]})
    raw.to_csv(tmp_path / "raw.csv", index=False)
    prepare(DataConfig(source=str(tmp_path / "raw.csv"), label="target", output=str(tmp_path / "out")))
    client.put_object(Bucket=name, Key="new/rows.csv", Body=raw.head(30).to_csv(index=False).encode())
    summary = apply(str(tmp_path / "out"), f"s3://{name}/new/rows.csv", tmp_path / "enc.parquet",
                    s3=S3Config(endpoint_url=endpoint))
    assert summary["rows"] == 30 and pq.read_table(tmp_path / "enc.parquet").num_rows == 30

"""Shards on an S3-compatible object store: moto's S3 server on 127.0.0.1 (a plain-http endpoint, as MinIO
and most on-premise stores are), reached the standard way (AWS environment variables). mrl-prepare-data
writes to an s3:// prefix, mrl-train streams from it, a killed run resumes from it; a wrong bucket,
refused or missing credentials, an unreachable endpoint and a prefix that already holds data are each
one clear paragraph, within seconds."""

from __future__ import annotations

import urllib.request

import pytest
from moto.server import ThreadedMotoServer

from support import comparable, kill_run, read_results, shard_args, start, wait_until_stopped


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on a free loopback port for this module, with a bucket ``bucket``."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=url, **CREDENTIALS_ARGS).create_bucket(Bucket="bucket")
    yield url
    server.stop()


CREDENTIALS_ARGS = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}


def aws_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables of a job that reaches the store at ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def train_args(uri: str, cache) -> list[str]:
    return [*shard_args(uri), f"data.cache_dir={cache}", "checkpoint_every_n_steps=4"]


@pytest.mark.slow
def test_prepare_to_s3_then_train_kill_and_resume_from_it(run_cli, tiny_image_tree, s3_endpoint, tmp_path):
    env = aws_env(s3_endpoint)
    uri = "s3://bucket/imagenet-shards"
    made = run_cli("mrl-prepare-data", f"root={tiny_image_tree}", f"output_dir={uri}", "max_side=64", env=env)
    assert made.returncode == 0, made.output[-3000:]
    assert f"mrl-train data=shards data.input_dir={uri}" in made.output
    assert "botocore" not in made.output  # boto3's lookups stay quiet
    again = run_cli("mrl-prepare-data", f"root={tiny_image_tree}", f"output_dir={uri}", env=env)
    assert again.returncode == 1 and "never writes over existing data" in again.stderr

    args = train_args(uri, tmp_path / "cache")
    reference = run_cli("mrl-train", *args, "hydra.run.dir=ref", env=env)
    assert reference.returncode == 0, reference.output[-3000:]
    expected = read_results(tmp_path / "ref")
    assert {"val/acc@64", "test/acc@64"} <= set(expected)

    # killed at step 6 of the first epoch (12 steps), after its step-4 checkpoint; resumed from the store
    run_dir = tmp_path / "crashed"
    run = start(tmp_path, *args, f"hydra.run.dir={run_dir}", env=env, stop_at="6")
    try:
        wait_until_stopped(run)
    finally:
        kill_run(run)
    assert not (run_dir / "results.json").exists()
    resumed = run_cli("mrl-train", f"resume={run_dir}", env=env)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert comparable(read_results(run_dir)) == pytest.approx(comparable(expected), abs=1e-6)


def _auth(endpoint: str, count: str) -> None:
    """moto's switch for checking credentials: "0" checks every request from now on, "inf" none."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=count.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    urllib.request.urlopen(request).read()


CASES = {
    "wrong_bucket": "has no bucket 'no-such-bucket'",
    "refused_credentials": "refused the credentials",
    "no_credentials": "No credentials for the object store",
    "unreachable": "Cannot reach the object store at http://127.0.0.1:9",
    "not_shards": "holds no mrl_shards.json",
}


@pytest.mark.parametrize(("case", "message"), CASES.items(), ids=CASES)
def test_a_store_that_cannot_serve_the_shards_is_one_paragraph(run_main, s3_endpoint, case, message):
    uri = "s3://no-such-bucket/shards" if case == "wrong_bucket" else "s3://bucket/nothing-here"
    env = aws_env(s3_endpoint)
    if case == "no_credentials":
        del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
        env |= {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
    if case == "unreachable":
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # the discard port: nothing listens
    if case == "refused_credentials":
        _auth(s3_endpoint, "0")
    try:
        result = run_main("mrl-train", "data=shards", f"data.input_dir={uri}", "logger=none", env=env)
    finally:
        if case == "refused_credentials":
            _auth(s3_endpoint, "inf")
    assert result.returncode == 1, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not list(result.log_dir.glob("train/runs/*/checkpoints"))


def test_prepare_refuses_a_prefix_that_holds_data(run_main, s3_endpoint, tiny_image_tree):
    import boto3

    store = boto3.client("s3", endpoint_url=s3_endpoint, **CREDENTIALS_ARGS)
    store.put_object(Bucket="bucket", Key="taken/readme.txt", Body=b"someone's data")
    env = aws_env(s3_endpoint)
    result = run_main("mrl-prepare-data", f"root={tiny_image_tree}", "output_dir=s3://bucket/taken", env=env)
    assert result.returncode == 1 and "already holds objects" in result.stderr
    keys = [o["Key"] for o in store.list_objects_v2(Bucket="bucket", Prefix="taken/")["Contents"]]
    assert keys == ["taken/readme.txt"]  # nothing written beside it

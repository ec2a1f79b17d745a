"""Shards on an S3-compatible object store (``s3://bucket/prefix``): what mrl adds to LitData's reader.

The endpoint and credentials are taken the standard way: the AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, a profile)
or ``data.storage_options`` (boto3 client arguments: ``endpoint_url``, ``aws_access_key_id``, ...), which
mrl hands to LitData as they are.

- :func:`read_text` reads one object (the shard metadata), :func:`check_empty` and :func:`upload_dir`
  serve ``mrl-prepare-data output_dir=s3://...``, all with a client that gives up within seconds and
  says what is wrong (:func:`store_errors`): no such bucket, credentials refused or missing, an endpoint
  that does not answer. LitData's own client retries up to 1000 times, so a wrong endpoint would hang
  the job instead.
- :func:`allow_plain_http`: LitData (0.2.76) downloads chunks through obstore with a client built
  without ``allow_http``, which refuses an ``http://`` endpoint (MinIO, moto and most on-premise
  stores) with "Generic S3 error ... BadScheme". For such an endpoint mrl turns that option on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mrl.errors import MRLError

# what a short check of the store may take: a few seconds, not LitData's retries
CHECK_CONFIG = {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 2, "mode": "standard"}}
REFUSED_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403")
CREDENTIALS_HINT = (
    "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for this store, or give "
    "data.storage_options='{aws_access_key_id: ..., aws_secret_access_key: ...}'."
)


def is_s3(uri: str) -> bool:
    return urlparse(str(uri)).scheme == "s3"


def endpoint(storage_options: dict[str, Any] | None = None) -> str | None:
    """The S3 endpoint boto3 will use: ``data.storage_options.endpoint_url``, else the environment's."""
    options = storage_options or {}
    return (
        options.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


def allow_plain_http(storage_options: dict[str, Any] | None = None) -> None:
    """Let LitData's chunk downloads (obstore) reach an ``http://`` endpoint (module docstring). The
    setting is process-wide and inherited by loader workers; an ``https://`` endpoint changes nothing."""
    url = endpoint(storage_options)
    if not url or urlparse(url).scheme != "http":
        return
    try:
        from litdata.streaming import downloader
    except ImportError:  # no LitData: the shards' own error says which extra to install
        return
    options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if isinstance(options, dict):
        options["allow_http"] = True


def client(storage_options: dict[str, Any] | None = None):
    """A boto3 S3 client for quick checks (:data:`CHECK_CONFIG`), with ``storage_options``."""
    import boto3
    import botocore.config

    options = dict(storage_options or {})
    config = botocore.config.Config(**CHECK_CONFIG)
    return boto3.session.Session().client("s3", config=config, **options)


def split_uri(uri: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``."""
    parsed = urlparse(str(uri))
    return parsed.netloc, parsed.path.lstrip("/")


@contextlib.contextmanager
def store_errors(uri: str, what: str, storage_options: dict[str, Any] | None = None) -> Iterator[None]:
    """Turn a failure to ``what`` (e.g. "read s3://b/k") into an :class:`MRLError` that names the store and
    what to change; a missing object stays ``FileNotFoundError``."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    bucket, _ = split_uri(uri)
    where = endpoint(storage_options) or "AWS S3"
    try:
        yield
    except NoCredentialsError:
        raise MRLError(
            f"No credentials for the object store at {where} (to {what}). {CREDENTIALS_HINT}"
        ) from None
    except EndpointConnectionError as err:
        raise MRLError(_unreachable(where, what, err)) from None
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404"):
            raise FileNotFoundError(uri) from None
        if code == "NoSuchBucket":
            raise MRLError(
                f"The object store at {where} has no bucket {bucket!r} (to {what}). Check the bucket in the "
                "s3:// path, and that the endpoint is the store that holds it (AWS_ENDPOINT_URL or "
                "data.storage_options.endpoint_url)."
            ) from None
        if code in REFUSED_CREDENTIALS:
            raise MRLError(
                f"The object store at {where} refused the credentials (to {what}: {code}). {CREDENTIALS_HINT}"
            ) from None
        raise MRLError(f"The object store at {where} failed to {what} ({code}: {err}).") from None
    except BotoCoreError as err:  # timeouts, a malformed endpoint, ...
        raise MRLError(_unreachable(where, what, err)) from None


def read_text(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """The object at ``s3://bucket/key`` as text (:func:`store_errors` for what can go wrong)."""
    bucket, key = split_uri(uri)
    with store_errors(uri, f"read {uri}", storage_options):
        return client(storage_options).get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def check_empty(uri: str) -> None:
    """Refuse to write under an ``s3://`` prefix that holds objects (or that cannot be reached)."""
    bucket, key = split_uri(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    with store_errors(uri, f"list {uri}"):
        found = client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0)
    if found:
        raise MRLError(
            f"output_dir={uri} already holds objects: mrl-prepare-data never writes over existing data. "
            "Choose a new prefix, or delete that one first (e.g. `aws s3 rm --recursive <prefix>`)."
        )


def upload_dir(local: Path, uri: str, last: str) -> None:
    """Upload every file under ``local`` to the prefix ``uri``, the file named ``last`` after all others
    (readers take the prefix for shards once it is there). A failed or interrupted upload deletes what it
    uploaded, so the prefix is empty again."""
    bucket, key = split_uri(uri)
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p)))
    store, done = client(), []
    try:
        with store_errors(uri, f"upload the shards to {uri}"):
            for path in files:
                target = "/".join(filter(None, [key.rstrip("/"), path.relative_to(local).as_posix()]))
                store.upload_file(str(path), bucket, target)
                done.append(target)
    except BaseException:
        with contextlib.suppress(Exception):
            for start in range(0, len(done), 1000):
                objects = [{"Key": k} for k in done[start : start + 1000]]
                store.delete_objects(Bucket=bucket, Delete={"Objects": objects})
        raise


def _unreachable(where: str, what: str, err: Exception) -> str:
    return (
        f"Cannot reach the object store at {where} to {what} ({err}). Check the endpoint "
        "(AWS_ENDPOINT_URL or data.storage_options.endpoint_url: scheme, host and port) and that the store "
        "is up and reachable from this machine."
    )

"""Object-store options written once (`NEXTBEST_STORAGE_OPTIONS`), spelled per library.

A user writes one JSON object with object_store's names (`endpoint`, `access_key_id`,
`secret_access_key`, `session_token`, `region`, `allow_http`, ...; an `aws_`/`AWS_`
prefix is accepted too). deltalake, LanceDB and obstore (model artifacts, the S3
compaction lock) all sit on the Rust `object_store` crate but spell the keys, and
split client from store options, differently; this module is the one place that knows.

Safe concurrent Delta commits on S3: delta-rs commits a log entry with a put-if-absent
(`If-None-Match: *`) when `conditional_put` is `etag` (its default since
delta-io/delta-rs#3091; set here explicitly so a changed default cannot undo it). AWS S3,
MinIO, R2 and SeaweedFS (tests/storage/test_s3.py checks it) refuse the second writer with
412, which delta-rs turns into a conflict check and a retry. A user who configures a
DynamoDB locking provider or `AWS_S3_ALLOW_UNSAFE_RENAME` keeps that choice.
"""

from collections.abc import Mapping
from typing import Any

from obstore.store import LocalStore, ObjectStore, S3Store, from_url

# Canonical (object_store) name -> deltalake's environment-style name.
_DELTA = {
    "endpoint": "AWS_ENDPOINT_URL",
    "access_key_id": "AWS_ACCESS_KEY_ID",
    "secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "session_token": "AWS_SESSION_TOKEN",
    "region": "AWS_REGION",
    "allow_http": "AWS_ALLOW_HTTP",
    "virtual_hosted_style_request": "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
}
# Lance reads object_store's `aws_*` keys and a few client keys of its own.
_LANCE = {
    "endpoint": "aws_endpoint",
    "access_key_id": "aws_access_key_id",
    "secret_access_key": "aws_secret_access_key",
    "session_token": "aws_session_token",
    "region": "aws_region",
    "allow_http": "allow_http",
    "virtual_hosted_style_request": "aws_virtual_hosted_style_request",
}
# obstore keeps HTTP client options apart and panics on an S3 key it does not know.
_CLIENT = frozenset(
    {"allow_http", "allow_invalid_certificates", "connect_timeout", "timeout", "user_agent"}
)
_S3 = frozenset(
    {
        "endpoint",
        "access_key_id",
        "secret_access_key",
        "session_token",
        "region",
        "conditional_put",
        "virtual_hosted_style_request",
        "skip_signature",
        "unsigned_payload",
        "checksum_algorithm",
    }
)
_ALIASES = {"endpoint_url": "endpoint", "default_region": "region", "token": "session_token"}
_UNSAFE = ("AWS_S3_LOCKING_PROVIDER", "AWS_S3_ALLOW_UNSAFE_RENAME")


def canonical(options: Mapping[str, Any]) -> dict[str, str]:
    """Lower-case object_store names without the `aws_` prefix, values as strings."""
    out: dict[str, str] = {}
    for key, value in options.items():
        name = key.lower().removeprefix("aws_")
        name = _ALIASES.get(name, name)
        out[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def is_local(uri: str) -> bool:
    return uri.startswith("file://") or "://" not in uri


def _is_s3(uri: str) -> bool:
    return uri.split("://", 1)[0].lower() in ("s3", "s3a")


def delta_options(uri: str, options: Mapping[str, Any]) -> dict[str, str]:
    """deltalake `storage_options` for a table under `uri`."""
    if is_local(uri) or not options:
        return {k: str(v) for k, v in options.items()}
    given = canonical(options)
    out = {_DELTA.get(k, k): v for k, v in given.items()}
    if _is_s3(uri) and not any(k.upper() in _UNSAFE for k in options):
        out.setdefault("conditional_put", "etag")
    return out


def lance_options(uri: str, options: Mapping[str, Any]) -> dict[str, str] | None:
    """LanceDB `storage_options` for a database at `uri` (None: none given)."""
    if not options:
        return None
    if is_local(uri):
        return {k: str(v) for k, v in options.items()}
    return {_LANCE.get(k, k): v for k, v in canonical(options).items()}


def open_store(uri: str, options: Mapping[str, Any]) -> ObjectStore:
    """An obstore store rooted at `uri` (a folder or a bucket prefix)."""
    if is_local(uri):
        return LocalStore(uri.removeprefix("file://"), mkdir=True)
    given = canonical(options)
    client = {k: v for k, v in given.items() if k in _CLIENT}
    if _is_s3(uri):
        config = {k: v for k, v in given.items() if k in _S3}
        config.setdefault("conditional_put", "etag")
        bucket, _, prefix = uri.split("://", 1)[1].partition("/")
        return S3Store(
            bucket,
            prefix=prefix.strip("/") or None,
            config=config,  # type: ignore[arg-type]
            client_options=client,  # type: ignore[arg-type]
        )
    config = {k: v for k, v in given.items() if k not in _CLIENT}
    return from_url(uri, config=config, client_options=client)  # type: ignore[arg-type]

"""Storage fixtures: the SeaweedFS S3 server (tests/support/s3.py) for object-store tests."""

from tests.support.s3 import s3_server

__all__ = ["s3_server"]

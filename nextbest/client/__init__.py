"""The Python client of the nextbest API (`Client`, `AsyncClient`), and the paced
senders behind `nextbest replay` and `nextbest simulate` (`replay.py`).

Modules: `sync.py` and `aio.py` (the two clients), `protocol.py` (what they share:
requests, event ids, batches), `retry.py` (when to retry, errors), `results.py` (typed
answers mirroring the API's schemas).
"""

from nextbest.client.aio import AsyncClient
from nextbest.client.replay import (
    SendReport,
    check_jsonl,
    live_demo_events,
    read_jsonl,
    send_events,
)
from nextbest.client.results import (
    Action,
    Decision,
    Erasure,
    FailedBatch,
    Feature,
    FeedbackResult,
    Rejection,
    SendResult,
    UserFeatures,
    UserState,
)
from nextbest.client.retry import ApiError, ApiUnreachable, NextbestError, RetryPolicy
from nextbest.client.sync import Client

__all__ = [
    "Action",
    "ApiError",
    "ApiUnreachable",
    "AsyncClient",
    "Client",
    "Decision",
    "Erasure",
    "FailedBatch",
    "Feature",
    "FeedbackResult",
    "NextbestError",
    "Rejection",
    "RetryPolicy",
    "SendReport",
    "SendResult",
    "UserFeatures",
    "UserState",
    "check_jsonl",
    "live_demo_events",
    "read_jsonl",
    "send_events",
]

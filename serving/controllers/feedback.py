"""POST /v1/feedback: the outcome of a decision, appended to the log for the stream.

With consent declared (spec `privacy.consent`), feedback of a user without consent is
appended without the user id and keyed by the decision id (it still joins the logged
decision on decision_id), so the id is stored nowhere and no per-user state learns
from it. A consent read that fails counts as no consent.
"""

import json
from typing import Annotated

from litestar import Controller, post
from litestar.exceptions import ServiceUnavailableException
from litestar.openapi import ResponseSpec
from litestar.params import Body

from nextbest.ingest.consent import allowed
from nextbest.ingest.limits import Limits
from serving import examples
from serving.controllers.common import AUTH_AND_UNAVAILABLE, BODY_REFUSED, SECURITY
from serving.door import check_feedback
from serving.runtime import ServingRuntime
from serving.schemas import ErrorOut, FeedbackIn, FeedbackOut


class FeedbackController(Controller):
    path = "/v1/feedback"
    tags = ["decisions"]
    security = SECURITY

    @post(
        "/",
        operation_id="recordFeedback",
        summary="Record an impression, click, conversion or dismissal for a decision",
        description=(
            "Appends a `record: feedback` entry (key = user_id; decision_id, without the "
            "user id, for a user without consent) to the event log; the "
            "stream writes it to the Delta feedback table where it joins the decision "
            "log on decision_id. 202 once durable."
        ),
        status_code=202,
        sync_to_thread=True,
        opt={"scope": "decide"},
        raises=AUTH_AND_UNAVAILABLE,
        responses={
            202: ResponseSpec(FeedbackOut, description="Recorded", examples=examples.FEEDBACK_OUT),
            **BODY_REFUSED,
            422: ResponseSpec(
                ErrorOut,
                description="A value outside the bounds",
                examples=examples.OUT_OF_BOUNDS,
                generate_examples=False,
            ),
        },
    )
    def feedback(
        self,
        data: Annotated[FeedbackIn, Body(examples=examples.FEEDBACK_IN)],
        runtime: ServingRuntime,
        limits: Limits,
    ) -> FeedbackOut:
        ts = check_feedback(data, limits)
        user_id = data.user_id if _consents(runtime, data.user_id) else None
        record = {
            "record": "feedback",
            "decision_id": data.decision_id,
            "user_id": user_id,
            "outcome": data.outcome,
            "action_id": data.action_id,
            "item_id": data.item_id,
            "ts": ts.isoformat(),
            "value": data.value,
        }
        try:
            key = user_id if user_id is not None else data.decision_id
            runtime.sink.append([(key, json.dumps(record).encode())])
        except Exception as exc:
            raise ServiceUnavailableException(
                f"the event log did not accept the feedback ({type(exc).__name__}); retry"
            ) from exc
        runtime.metrics.feedback.labels(data.outcome).inc()
        return FeedbackOut(accepted=True, decision_id=data.decision_id)


def _consents(runtime: ServingRuntime, user_id: str | None) -> bool:
    cache, consent = runtime.consent, runtime.spec.privacy.consent
    if user_id is None or cache is None or consent is None:
        return True
    try:
        return allowed(cache, user_id, consent)
    except Exception:  # a store outage must not keep the id by accident
        return False

"""POST /v1/decide: the next-best actions for one user, cached + real-time.

Before deciding, the body is held to the door's bounds (`nextbest.ingest.limits`): the user
id and excluded ids, context values, and the surface, which must be one the spec
declares (a typo used to be served silently as `default`, and minted a metric label).
An optional `candidates` list re-ranks the caller's items (`nextbest.decide.rerank`);
without it the hot path is untouched.
"""

from typing import Annotated

from litestar import Controller, post
from litestar.openapi import ResponseSpec
from litestar.params import Body

from nextbest.decide.rerank import known_items
from nextbest.ingest.limits import LimitExceeded, Limits
from serving import examples
from serving.controllers.common import AUTH_ERRORS, BODY_REFUSED, SECURITY
from serving.decisions import decide_request
from serving.door import check_decide, unprocessable
from serving.runtime import ServingRuntime
from serving.schemas import DecideIn, DecideOut, ErrorOut


class DecideController(Controller):
    path = "/v1/decide"
    tags = ["decisions"]
    security = SECURITY

    @post(
        "/",
        operation_id="decide",
        summary="Decide the next best actions for a user",
        description=(
            "Blends the promoted item model applied to the user's fresh history, vector "
            "similarity to the current session, trending items and the precomputed "
            "(cached) decision; applies the spec's eligibility rules, caps and diversity; "
            "returns the top k with provenance. `user_id` may be `anon:<anonymous_id>`. "
            "With `candidates` (Metarank `/rank`), only those items are scored and "
            "returned, by the same policy (rules, caps, diversity and exploration still "
            "apply; given items no source proposed rank last, by popularity); ids neither "
            "the model nor the catalogue knows are ignored and listed in "
            "`unknown_candidates`. "
            "The surface (field `surface` or `context.surface`) selects the policy and "
            "must be one the spec declares (422 lists them); "
            "offers are decided on surfaces whose policy lists them. Within the policy's "
            "latency budget it answers real-time, else cached, else popular-in-context: "
            "a well-formed request always gets a 200. Ids, context values and numbers "
            "outside the configured bounds get a 422 naming the field."
        ),
        status_code=200,
        opt={"scope": "decide"},
        raises=AUTH_ERRORS,
        responses={
            200: ResponseSpec(DecideOut, description="Decision", examples=examples.DECIDE_OUT),
            **BODY_REFUSED,
            422: ResponseSpec(
                ErrorOut,
                description="Unknown surface, or a value outside the bounds",
                examples=examples.UNKNOWN_SURFACE + examples.OUT_OF_BOUNDS,
                generate_examples=False,
            ),
        },
    )
    async def decide(
        self,
        data: Annotated[DecideIn, Body(examples=examples.DECIDE_IN)],
        runtime: ServingRuntime,
        limits: Limits,
    ) -> DecideOut:
        check_decide(data, runtime.spec, limits)
        if data.candidates is None:
            return await decide_request(runtime, data)
        known, unknown = _candidates(runtime, data.candidates, limits)
        out = await decide_request(runtime, data, frozenset(known))
        out.unknown_candidates = unknown
        return out


def _candidates(
    runtime: ServingRuntime, ids: list[str], limits: Limits
) -> tuple[list[str], list[str]]:
    """(the given ids the model or the catalogue knows, the others): the others are
    ignored, not a 422, so a caller's list with a new or retired item still ranks."""
    try:
        for i, item in enumerate(ids):
            limits.check_id(f"candidates[{i}]", item)
    except LimitExceeded as exc:
        raise unprocessable(exc) from None
    assets = runtime.assets
    return known_items(ids, assets.model, assets.attributes)

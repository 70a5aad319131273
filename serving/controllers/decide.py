"""POST /v1/decide: the next-best actions for one user, cached + real-time."""

from typing import Annotated

from litestar import Controller, post
from litestar.openapi import ResponseSpec
from litestar.params import Body

from serving import examples
from serving.controllers.common import AUTH_ERRORS, SECURITY
from serving.decisions import decide_request
from serving.runtime import ServingRuntime
from serving.schemas import DecideIn, DecideOut


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
            "The surface (field `surface` or `context.surface`) selects the policy; "
            "offers are decided on surfaces whose policy lists them. Within the policy's "
            "latency budget it answers real-time, else cached, else popular-in-context: "
            "a well-formed request always gets a 200."
        ),
        status_code=200,
        opt={"scope": "decide"},
        raises=AUTH_ERRORS,
        responses={
            200: ResponseSpec(DecideOut, description="Decision", examples=examples.DECIDE_OUT)
        },
    )
    async def decide(
        self,
        data: Annotated[DecideIn, Body(examples=examples.DECIDE_IN)],
        runtime: ServingRuntime,
    ) -> DecideOut:
        return await decide_request(runtime, data)

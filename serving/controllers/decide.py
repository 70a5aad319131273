"""POST /v1/decide: the next-best actions for one user, cached + real-time.

Before deciding, the body is held to the door's bounds (`nextbest.limits`): the user
id and excluded ids, context values, and the surface, which must be one the spec
declares (a typo used to be served silently as `default`, and minted a metric label).
"""

from typing import Annotated, Any

from litestar import Controller, post
from litestar.exceptions import HTTPException
from litestar.openapi import ResponseSpec
from litestar.params import Body
from litestar.status_codes import HTTP_422_UNPROCESSABLE_ENTITY

from nextbest.limits import LimitExceeded, Limits
from nextbest.spec import Spec
from serving import examples
from serving.controllers.common import AUTH_ERRORS, SECURITY
from serving.decisions import decide_request
from serving.runtime import ServingRuntime
from serving.schemas import DecideIn, DecideOut, ErrorOut


def known_surfaces(spec: Spec) -> list[str]:
    """Surfaces a decide may name: the policies' and the ones actions are offered on
    (those without a policy of their own are served by the default policy)."""
    named = [p.surface for p in spec.policies.values()]
    named += [s for a in spec.actions.values() for s in a.surfaces]
    return sorted(set(named))


def unprocessable(exc: LimitExceeded, **extra: Any) -> HTTPException:
    """422 whose detail starts with the field (`LimitExceeded` messages do)."""
    field = str(exc).split(":", 1)[0]
    return HTTPException(
        status_code=HTTP_422_UNPROCESSABLE_ENTITY, detail=str(exc), extra={"field": field, **extra}
    )


def check_decide(body: DecideIn, spec: Spec, limits: Limits) -> None:
    try:
        limits.check_actor_ref("user_id", body.user_id)
        for i, item in enumerate(body.exclude):
            limits.check_id(f"exclude[{i}]", item)
        if len(body.context) > limits.max_array_length:
            raise LimitExceeded(f"context: more than {limits.max_array_length} entries")
        for name, value in body.context.items():
            if isinstance(value, str):
                limits.check_id(f"context.{name}", value)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                limits.check_number(f"context.{name}", float(value))
    except (LimitExceeded, OverflowError) as exc:
        raise unprocessable(LimitExceeded(str(exc))) from None
    field, surface = "surface", body.surface
    if surface is None:
        field, value = "context.surface", body.context.get("surface")
        surface = value if isinstance(value, str) and value else None
    if surface is not None:
        known = known_surfaces(spec)
        if surface not in known:
            shown = surface if len(surface) <= 64 else surface[:64] + "..."
            exc = LimitExceeded(f"{field}: unknown surface {shown!r}; known: {', '.join(known)}")
            raise unprocessable(exc, known=known)


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
            400: ResponseSpec(
                ErrorOut,
                description="Malformed body",
                examples=examples.BODY_REFUSED,
                generate_examples=False,
            ),
            413: ResponseSpec(
                ErrorOut, description="Request body too large", generate_examples=False
            ),
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
        return await decide_request(runtime, data)

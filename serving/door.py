"""Request bodies held to the door's bounds (`nextbest.ingest.limits.Limits`) before a
controller acts on them: each violation is a 422 whose detail starts with the field
(and whose `extra.field` names it), so clients can tell which value to fix.
"""

from datetime import UTC, datetime
from typing import Any

from litestar.exceptions import HTTPException
from litestar.status_codes import HTTP_422_UNPROCESSABLE_ENTITY

from nextbest.ingest.limits import LimitExceeded, Limits
from nextbest.spec.models import Spec
from serving.schemas import DecideIn, FeedbackIn


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


def check_feedback(data: FeedbackIn, limits: Limits) -> datetime:
    """The feedback's UTC ts (now when absent), or a 422 naming the offending field."""
    try:
        limits.check_actor_ref("user_id", data.user_id)
        limits.check_id("action_id", data.action_id)
        limits.check_id("item_id", data.item_id)
        limits.check_number("value", data.value)
        return limits.check_ts("ts", data.ts) if data.ts is not None else datetime.now(UTC)
    except LimitExceeded as exc:
        raise unprocessable(exc) from None

"""Shared bits of the controllers: the runtime dependency and documented errors."""

from litestar.datastructures import State
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    PermissionDeniedException,
    ServiceUnavailableException,
    TooManyRequestsException,
)
from litestar.openapi import ResponseSpec

from serving import examples
from serving.runtime import ServingRuntime
from serving.schemas import ErrorOut

SECURITY: list[dict[str, list[str]]] = [{"ApiKey": []}]
AUTH_ERRORS: list[type[HTTPException]] = [
    NotAuthorizedException,
    PermissionDeniedException,
    TooManyRequestsException,
]
AUTH_AND_UNAVAILABLE: list[type[HTTPException]] = [*AUTH_ERRORS, ServiceUnavailableException]


def provide_runtime(state: State) -> ServingRuntime:
    return state.runtime


# What the body guard (serving/bodyguard.py) answers before a handler runs, for every
# route that takes a body.
BODY_REFUSED: dict[int, ResponseSpec] = {
    400: ResponseSpec(
        ErrorOut,
        description="Malformed body",
        examples=examples.BODY_REFUSED,
        generate_examples=False,
    ),
    413: ResponseSpec(ErrorOut, description="Request body too large", generate_examples=False),
}

# A path user id that is too long, has a control character or names a system key.
BAD_USER_ID: dict[int, ResponseSpec] = {
    422: ResponseSpec(
        ErrorOut,
        description="user_id: too long, a control character, or a system key (item:, ~nc:)",
        generate_examples=False,
    ),
}

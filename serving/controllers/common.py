"""Shared bits of the controllers: the runtime dependency and documented errors."""

from litestar.datastructures import State
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    PermissionDeniedException,
    ServiceUnavailableException,
    TooManyRequestsException,
)

from serving.runtime import ServingRuntime

SECURITY: list[dict[str, list[str]]] = [{"ApiKey": []}]
AUTH_ERRORS: list[type[HTTPException]] = [
    NotAuthorizedException,
    PermissionDeniedException,
    TooManyRequestsException,
]
AUTH_AND_UNAVAILABLE: list[type[HTTPException]] = [*AUTH_ERRORS, ServiceUnavailableException]


def provide_runtime(state: State) -> ServingRuntime:
    return state.runtime

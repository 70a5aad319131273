"""Per-user reads and erasure: online features with their ages, erasure jobs."""

from datetime import UTC, datetime
from typing import Annotated

from litestar import Controller, delete, get
from litestar.exceptions import HTTPException, NotFoundException
from litestar.openapi import ResponseSpec
from litestar.params import Parameter

from nextbest.ingest.limits import LimitExceeded, Limits
from serving import examples
from serving.controllers.common import AUTH_ERRORS, BAD_USER_ID, SECURITY
from serving.door import unprocessable
from serving.erasure import start_erasure, subject_of
from serving.runtime import ServingRuntime
from serving.schemas import ErasureOut, FeatureOut, StateOut, UserFeaturesOut
from storage.online.models import now_ms
from storage.online.serving import ErasureJob

UserId = Annotated[str, Parameter(min_length=1, max_length=256, description="User id or anon:<id>")]


def _checked(user_id: str, limits: Limits) -> str:
    """The path id held to the door's rules for a user reference (a user id or
    `anon:<id>`): a system key (`item:<id>`, `~nc:...`, `anon:item:...`) or a control
    character is a 422 naming `user_id`, so no request reads or erases the system's rows."""
    try:
        limits.check_actor_ref("user_id", user_id)
    except LimitExceeded as exc:
        raise unprocessable(exc) from None
    return user_id


def _dt(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)


def _erasure_out(job: ErasureJob, user_id: str) -> ErasureOut:
    status = job.status if job.status in ("running", "pending", "done", "failed") else "pending"
    return ErasureOut(
        job_id=job.job_id,
        user_id=user_id,
        status=status,  # type: ignore[arg-type]
        stores=job.stores,
        created_at=datetime.fromtimestamp(job.created_at_ms / 1000, tz=UTC),
        updated_at=datetime.fromtimestamp(job.updated_at_ms / 1000, tz=UTC),
    )


class UsersController(Controller):
    path = "/v1/users"
    tags = ["users"]
    security = SECURITY

    @get(
        "/{user_id:str}/features",
        operation_id="getUserFeatures",
        summary="A user's online features with event time, write time and age",
        description=(
            "Reads what the stream wrote for the user (anonymous ids resolve to the "
            "linked user): every window feature value with `event_ts` (newest event in "
            "it), `updated_at` (when the stream wrote it) and `age_ms` (now - event_ts), "
            "plus the session state. 404 when the online store knows nothing of them."
        ),
        sync_to_thread=True,
        opt={"scope": "decide"},
        raises=[*AUTH_ERRORS, HTTPException, NotFoundException],
        responses={
            200: ResponseSpec(
                UserFeaturesOut, description="Features", examples=examples.FEATURES_OUT
            ),
            **BAD_USER_ID,
        },
    )
    def features(self, user_id: UserId, runtime: ServingRuntime, limits: Limits) -> UserFeaturesOut:
        _checked(user_id, limits)
        resolved = runtime.serving.resolve(user_id)
        rows = runtime.online.get_features(resolved)
        state = runtime.online.get_state(resolved)
        if not rows and state is None:
            raise NotFoundException(f"no online features for user {user_id!r}")
        now = now_ms()
        features = [
            FeatureOut(
                feature=r.feature,
                group=r.group_key,
                value=r.value,
                value_json=r.value_json,
                event_ts=datetime.fromtimestamp(r.event_ts_ms / 1000, tz=UTC),
                updated_at=_dt(r.updated_at_ms),
                age_ms=max(0, now - r.event_ts_ms),
            )
            for r in rows
        ]
        state_out = None
        if state is not None:
            session_id = state.session.session_id
            state_out = StateOut(
                recent_items=list(state.recent_items),
                session_id=session_id,
                has_session_vector=state.session_vector is not None,
                event_ts=datetime.fromtimestamp(state.event_ts_ms / 1000, tz=UTC),
                updated_at=_dt(state.updated_at_ms),
                age_ms=max(0, now - state.event_ts_ms),
            )
        return UserFeaturesOut(user_id, resolved, features, state_out)

    @delete(
        "/{user_id:str}",
        operation_id="eraseUser",
        summary="Erase a user (starts an erasure job)",
        description=(
            "Removes the user from the online store, cached decisions and the API's "
            "memory at once; with the embedded event log, rewrites the log without "
            "their records, then appends an erase request the stream acts on: Bytewax "
            "state and recovery snapshots, LanceDB users, Delta events, decisions, "
            "feedback and dead letters, then the silver/gold tables derived from them "
            "(history purged). Each store is reported as done, pending or failed; with "
            "Kafka, `eventlog` is `retention: ...` (records age out or are compacted "
            "away) and the job `pending`. Poll GET .../erasure."
        ),
        status_code=202,
        sync_to_thread=True,
        opt={"scope": "admin"},
        raises=[*AUTH_ERRORS, HTTPException],
        responses={
            202: ResponseSpec(ErasureOut, description="Job started", examples=examples.ERASURE_OUT),
            **BAD_USER_ID,
        },
    )
    def erase(self, user_id: UserId, runtime: ServingRuntime, limits: Limits) -> ErasureOut:
        _checked(user_id, limits)
        return _erasure_out(start_erasure(runtime, user_id), user_id)

    @get(
        "/{user_id:str}/erasure",
        operation_id="getErasureStatus",
        summary="Status of the latest erasure job for a user, per store",
        sync_to_thread=True,
        opt={"scope": "admin"},
        raises=[*AUTH_ERRORS, HTTPException, NotFoundException],
        responses={
            200: ResponseSpec(ErasureOut, description="Job", examples=examples.ERASURE_OUT),
            **BAD_USER_ID,
        },
    )
    def erasure_status(
        self, user_id: UserId, runtime: ServingRuntime, limits: Limits
    ) -> ErasureOut:
        _checked(user_id, limits)
        job = runtime.serving.latest_erasure_job(subject_of(runtime, user_id))
        if job is None:
            raise NotFoundException(f"no erasure job for user {user_id!r}")
        return _erasure_out(job, user_id)

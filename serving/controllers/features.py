"""POST /v1/features: online features of many entities at once (Feast's
`get_online_features`), read in one snapshot with one query per table
(`storage.online.batch`).

Values by feature kind: a window feature is its number, or `{group: number}` when it
has `group_by`; a `last_n` feature the list of item ids; the session vector its list
of floats. A value the stream has not written is null, as is every value of an
entity the store does not know (`found`: any value stored): absence is an answer, not an error.
Unknown feature names, or ones of the other entity, are a 422 listing them.
"""

from datetime import UTC, datetime
from typing import Annotated, Any

from litestar import Controller, post
from litestar.exceptions import HTTPException
from litestar.openapi import ResponseSpec
from litestar.params import Body
from litestar.status_codes import HTTP_422_UNPROCESSABLE_ENTITY

from nextbest.ingest.events import item_actor
from nextbest.ingest.limits import LimitExceeded, Limits
from nextbest.spec.models import LastNFeature, SessionVectorFeature, Spec, WindowFeature
from serving import examples
from serving.controllers.common import AUTH_ERRORS, BODY_REFUSED, SECURITY
from serving.door import unprocessable
from serving.runtime import ServingRuntime
from serving.schemas import (
    MAX_FEATURE_ENTITIES,
    EntityFeaturesOut,
    ErrorOut,
    FeaturesIn,
    FeaturesOut,
)
from storage.online.batch import EntityRows, read_entities
from storage.online.models import FeatureRow


def _entity_of(spec: Spec, name: str) -> str:
    feature = spec.features[name]
    return feature.entity if isinstance(feature, WindowFeature) else "user"


def _unprocessable(detail: str, **extra: Any) -> HTTPException:
    return HTTPException(status_code=HTTP_422_UNPROCESSABLE_ENTITY, detail=detail, extra=extra)


def _entities(data: FeaturesIn, spec: Spec, limits: Limits) -> tuple[str, str, list[str]]:
    """(entity kind "user"/"item", its key name, the ids), checked."""
    keys = {"user": spec.entities.user.key, "item": spec.entities.item.key}
    if isinstance(data.entities, dict):
        names = list(data.entities)
        columns = data.entities
    else:
        names = list(dict.fromkeys(k for row in data.entities for k in row))
        columns = {n: [row[n] for row in data.entities if n in row] for n in names}
        if any(len(row) != 1 for row in data.entities):
            raise _unprocessable("entities: each row names exactly one key", field="entities")
    if len(names) != 1 or names[0] not in keys.values():
        raise _unprocessable(
            f"entities: name exactly one entity key, {keys['user']!r} or {keys['item']!r}",
            field="entities",
            known=sorted(keys.values()),
        )
    key = names[0]
    kind = "user" if key == keys["user"] else "item"
    ids = columns[key]
    if not ids:
        raise _unprocessable(f"entities.{key}: at least one id", field=f"entities.{key}")
    if len(ids) > MAX_FEATURE_ENTITIES:
        raise _unprocessable(
            f"entities.{key}: at most {MAX_FEATURE_ENTITIES} ids per request",
            field=f"entities.{key}",
        )
    try:
        for i, value in enumerate(ids):
            if kind == "user":
                limits.check_actor_ref(f"entities.{key}[{i}]", value)
            else:
                limits.check_id(f"entities.{key}[{i}]", value)
    except LimitExceeded as exc:
        raise unprocessable(exc) from None
    return kind, key, ids


def _feature_names(data: FeaturesIn, spec: Spec, kind: str) -> list[str]:
    own = [n for n in spec.features if _entity_of(spec, n) == kind]
    if data.features is None:
        return own
    names = list(dict.fromkeys(data.features))
    unknown = [n for n in names if n not in spec.features]
    if unknown:
        shown = ", ".join(repr(n[:64]) for n in unknown[:20])
        raise _unprocessable(
            f"features: unknown {shown}; known for {kind}s: {', '.join(own)}",
            field="features",
            unknown=unknown,
            known=own,
        )
    other = [n for n in names if _entity_of(spec, n) != kind]
    if other:
        raise _unprocessable(
            f"features: {', '.join(other)} belong to the other entity; known for {kind}s: "
            f"{', '.join(own)}",
            field="features",
            unknown=other,
            known=own,
        )
    return names


def _ts(ms: int | None) -> datetime | None:
    return None if not ms else datetime.fromtimestamp(ms / 1000, tz=UTC)


def _values(
    spec: Spec, names: list[str], rows: list[FeatureRow], read: EntityRows, key: str
) -> tuple[dict[str, Any], dict[str, datetime | None]]:
    by_name: dict[str, list[FeatureRow]] = {}
    for r in rows:
        by_name.setdefault(r.feature, []).append(r)
    state = read.states.get(key)
    recent = next((n for n, f in spec.features.items() if isinstance(f, LastNFeature)), None)
    values: dict[str, Any] = {}
    stamps: dict[str, datetime | None] = {}
    for name in names:
        feature = spec.features[name]
        found = by_name.get(name, [])
        value: Any = None
        ts: int | None = None
        if isinstance(feature, WindowFeature) and found:
            if feature.group_by is None:
                value = found[0].value
            else:
                value = {r.group_key: r.value for r in found}
            ts = max(r.event_ts_ms for r in found)
        elif isinstance(feature, LastNFeature):
            if found:
                value, ts = found[0].value_json, found[0].event_ts_ms
            elif name == recent and state is not None:
                value, ts = list(state.recent_items), state.event_ts_ms
        elif isinstance(feature, SessionVectorFeature) and state and state.session_vector:
            value, ts = list(state.session_vector), state.event_ts_ms
        values[name] = value
        stamps[name] = _ts(ts)
    return values, stamps


class FeaturesController(Controller):
    path = "/v1/features"
    tags = ["users"]
    security = SECURITY

    @post(
        "/",
        operation_id="getOnlineFeatures",
        summary="Online features of many users or items at once",
        description=(
            "Feast-style `get_online_features`: `entities` names one key, the spec's user "
            "key (ids may be `anon:<id>`, read as the linked user) or item key, with up to "
            f"{MAX_FEATURE_ENTITIES} ids; `features` names the features (all of the "
            "entity's when absent). One result per id, in order, with each feature's value "
            "and the event time of its newest event. Unknown entities and unwritten values "
            "are null, not errors. 422: unknown features (listed in `extra.unknown`), "
            "features of the other entity, a bad id, more ids than the limit."
        ),
        status_code=200,
        sync_to_thread=True,
        opt={"scope": "decide"},
        raises=AUTH_ERRORS,
        responses={
            200: ResponseSpec(
                FeaturesOut, description="Features", examples=examples.FEATURES_MANY_OUT
            ),
            **BODY_REFUSED,
            422: ResponseSpec(
                ErrorOut,
                description="Unknown features, a bad entity key or id, too many ids",
                examples=examples.UNKNOWN_FEATURES,
                generate_examples=False,
            ),
        },
    )
    def features(
        self,
        data: Annotated[FeaturesIn, Body(examples=examples.FEATURES_MANY_IN)],
        runtime: ServingRuntime,
        limits: Limits,
    ) -> FeaturesOut:
        spec = runtime.spec
        kind, key_name, ids = _entities(data, spec, limits)
        names = _feature_names(data, spec, kind)
        keys = ids if kind == "user" else [item_actor(i) for i in ids]
        in_rows = [n for n in names if not isinstance(spec.features[n], SessionVectorFeature)]
        with_state = any(
            isinstance(spec.features[n], LastNFeature | SessionVectorFeature) for n in names
        )
        read = read_entities(
            runtime.online,
            keys,
            features=in_rows,
            with_state=with_state,
            resolve_anonymous=kind == "user",
        )
        results = []
        for entity_id, key in zip(ids, keys, strict=True):
            resolved = read.resolved.get(key, key)
            rows = read.features.get(resolved, [])
            values, stamps = _values(spec, names, rows, read, resolved)
            found = any(v is not None for v in values.values())
            shown = resolved if kind == "user" else entity_id
            results.append(EntityFeaturesOut(entity_id, shown, found, values, stamps))
        return FeaturesOut(key_name, names, results)

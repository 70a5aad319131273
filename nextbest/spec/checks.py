"""Checks that cross sections of the spec: every reference must name something declared.

Each check yields `(path, message)` pairs; the loader adds file and line. They run on
whichever sections validated structurally, so one broken section does not hide the
problems of the others.
"""

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from nextbest.spec.models import (
    Action,
    Consent,
    Entities,
    EventType,
    LastNFeature,
    Policy,
    SessionVectorFeature,
    WindowFeature,
)

Path = tuple[str | int, ...]
Problem = tuple[Path, str]

_BUILTIN_FIELDS = {"value", "weight", "item_id"}
_NUMERIC = {"int", "float"}
_NO_PROPS = EventType()


class Section(dict[str, Any]):
    """Validated entries of a section; `unchecked` names were declared but are invalid.

    They count as declared (`in` is true) so a reference to them is not reported
    twice, but they are not inspected.
    """

    def __init__(self, valid: Mapping[str, Any], unchecked: Iterable[str] = ()) -> None:
        super().__init__(valid)
        self.unchecked = set(unchecked) - set(valid)

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key) or key in self.unchecked


def _unchecked(section: Mapping[str, Any] | None) -> set[str]:
    return section.unchecked if isinstance(section, Section) else set()


def _names(known: Iterable[str] | None) -> str:
    return ", ".join(sorted(known)) if known else "(none declared)"


def check_features(
    features: Mapping[str, Any], events: Mapping[str, EventType] | None, entities: Entities | None
) -> Iterator[Problem]:
    item_attrs = entities.item.attributes if entities else None
    for name, feature in features.items():
        base: Path = ("features", name)
        if events is not None:
            for i, ev in enumerate(feature.events):
                if ev not in events:
                    yield (
                        (*base, "events", i),
                        f"unknown event type {ev!r}; declared event types: {_names(events)}",
                    )
        if not isinstance(feature, WindowFeature):
            continue
        if feature.agg == "count" and feature.field is not None:
            yield ((*base, "field"), "count takes no field; remove it or use agg: sum")
        if feature.agg != "count" and feature.field is None:
            yield (
                (*base, "field"),
                f"agg {feature.agg} needs a field: value, weight, item_id, "
                "an event property or an item attribute",
            )
        if feature.field is not None and events is not None and item_attrs is not None:
            yield from _check_field(base, feature, events, item_attrs)
        if feature.group_by is not None and item_attrs is not None:
            if feature.group_by not in item_attrs:
                yield (
                    (*base, "group_by"),
                    f"group_by {feature.group_by!r} is not an item attribute; "
                    f"item attributes: {_names(item_attrs)}",
                )
            if feature.entity != "user":
                yield ((*base, "group_by"), "group_by is only for user features")


def _check_field(
    base: Path, feature: WindowFeature, events: Mapping[str, EventType], item_attrs: Mapping
) -> Iterator[Problem]:
    field = feature.field
    assert field is not None
    if field in _BUILTIN_FIELDS:
        if feature.agg in ("sum", "mean") and field == "item_id":
            yield ((*base, "field"), f"agg {feature.agg} needs a number; item_id is not one")
        return
    if field in item_attrs:
        if feature.agg in ("sum", "mean") and item_attrs[field].type not in _NUMERIC:
            yield (
                (*base, "field"),
                f"agg {feature.agg} needs a number; item attribute {field!r} "
                f"is {item_attrs[field].type}",
            )
        return
    holders = [
        ev
        for ev in feature.events
        if ev in events and field in events.get(ev, _NO_PROPS).properties
    ]
    if any(ev in _unchecked(events) for ev in feature.events):
        return
    if not holders:
        yield (
            (*base, "field"),
            f"unknown field {field!r}: not value, weight, item_id, an item attribute "
            f"({_names(item_attrs)}) or a property of events {feature.events}",
        )
        return
    if feature.agg in ("sum", "mean"):
        for ev in holders:
            if events[ev].properties[field].type not in _NUMERIC:
                yield (
                    (*base, "field"),
                    f"agg {feature.agg} needs a number; property {field!r} of {ev!r} "
                    f"is {events[ev].properties[field].type}",
                )


def check_events(events: Mapping[str, EventType]) -> Iterator[Problem]:
    for name, ev in events.items():
        if ev.identify and ev.entity is not None:
            yield (
                ("events", name, "entity"),
                "an identify event links users, not items; set entity: null",
            )


def check_actions(
    actions: Mapping[str, Action],
    features: Mapping[str, Any] | None,
    events: Mapping[str, EventType] | None,
    entities: Entities | None,
) -> Iterator[Problem]:
    for name, action in actions.items():
        base: Path = ("actions", name, "eligibility")
        if events is not None:
            for i, ev in enumerate(action.eligibility.exclude_seen):
                if ev not in events:
                    yield (
                        (*base, "exclude_seen", i),
                        f"unknown event type {ev!r}; declared event types: {_names(events)}",
                    )
        for i, cond in enumerate(action.eligibility.where):
            scope, _, attr = cond.attr.partition(".")
            path = (*base, "where", i, "attr")
            if scope == "item" and entities is not None:
                if action.kind != "item":
                    yield (path, f"{action.kind} actions have no item; use user.* or context.*")
                elif attr not in entities.item.attributes:
                    yield (
                        path,
                        f"unknown item attribute {attr!r}; item attributes: "
                        f"{_names(entities.item.attributes)}",
                    )
            if scope == "user" and features is not None and entities is not None:
                windowed = {n for n, f in features.items() if isinstance(f, WindowFeature)}
                known = windowed | set(entities.user.attributes) | _unchecked(features)
                if attr not in known:
                    yield (
                        path,
                        f"unknown feature {attr!r}; declare it under features or use one of: "
                        f"{_names(windowed | set(entities.user.attributes))}",
                    )
            if cond.op in ("in", "not_in") and not isinstance(cond.value, list):
                yield ((*base, "where", i, "value"), f"op {cond.op} needs a list value")


def check_policies(
    policies: Mapping[str, Policy],
    actions: Mapping[str, Action] | None,
    features: Mapping[str, Any] | None,
    entities: Entities | None,
) -> Iterator[Problem]:
    surfaces: dict[str, str] = {}
    for name, policy in policies.items():
        base: Path = ("policies", name)
        if policy.surface in surfaces:
            yield (
                (*base, "surface"),
                f"surface {policy.surface!r} already served by policy {surfaces[policy.surface]!r}",
            )
        surfaces.setdefault(policy.surface, name)
        if actions is not None:
            for i, act in enumerate(policy.actions):
                if act not in actions:
                    yield (
                        (*base, "actions", i),
                        f"unknown action {act!r}; declared actions: {_names(actions)}",
                    )
        for i, cand in enumerate(policy.candidates):
            if (
                cand.source == "trending"
                and features is not None
                and cand.feature not in _unchecked(features)
            ):
                feat = features.get(cand.feature or "")
                if cand.feature is None:
                    yield ((*base, "candidates", i, "feature"), "trending needs a feature")
                elif not (isinstance(feat, WindowFeature) and feat.entity == "item"):
                    yield (
                        (*base, "candidates", i, "feature"),
                        f"trending feature {cand.feature!r} must be a windowed item feature",
                    )
        if (
            policy.group_by is not None
            and entities is not None
            and policy.group_by not in entities.item.attributes
        ):
            yield (
                (*base, "group_by"),
                f"group_by {policy.group_by!r} is not an item attribute; "
                f"item attributes: {_names(entities.item.attributes)}",
            )


def check_singletons(features: Mapping[str, Any]) -> Iterator[Problem]:
    for kind, label in ((LastNFeature, "last_n"), (SessionVectorFeature, "session_vector")):
        named = [n for n, f in features.items() if isinstance(f, kind)]
        for extra in named[1:]:
            yield (
                ("features", extra, "kind"),
                f"only one {label} feature is allowed; {named[0]!r} is already declared",
            )


def check_privacy(consent: Consent, events: Mapping[str, EventType] | None) -> Iterator[Problem]:
    """The consent event must be declared, user-level, not an identify event, and carry
    the boolean property (in clear: a hashed PII value is no longer a boolean)."""
    if events is None or consent.event in _unchecked(events):
        return
    name, base = consent.event, ("privacy", "consent")
    if name not in events:
        yield (
            (*base, "event"),
            f"unknown event type {name!r}; declare it under events (entity: null, "
            f"properties: {{{consent.property}: {{type: bool, required: true}}}}) "
            f"or use one of: {_names(events)}",
        )
        return
    ev = events[name]
    where = f"{name!r} is the consent event (privacy.consent.event)"
    if ev.entity is not None:
        yield (("events", name, "entity"), f"{where}: consent is per user; set entity: null")
    if ev.identify:
        yield (("events", name, "identify"), f"{where}: it cannot link identities too")
    prop = ev.properties.get(consent.property)
    if prop is None:
        yield (
            (*base, "property"),
            f"event {name!r} declares no property {consent.property!r}; add "
            f"{consent.property}: {{type: bool, required: true}} under events.{name}.properties",
        )
        return
    if prop.type != "bool":
        yield (
            ("events", name, "properties", consent.property, "type"),
            f"{where}: property {consent.property!r} must be bool, not {prop.type}",
        )
    if prop.pii:
        yield (
            ("events", name, "properties", consent.property, "pii"),
            f"{where}: property {consent.property!r} is read at ingest; remove pii: true",
        )

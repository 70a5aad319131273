"""Online features of many entities at once (`POST /v1/features`), in one snapshot.

One connection, and one query per table whatever the number of entities (in
`CHUNK_ROWS` pieces): the aliases of the anonymous ids, the feature rows (only the
features asked for), and the state rows when a state-held feature is asked for.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa

from nextbest.ingest.events import anonymous_of
from storage.online.models import FEATURES, STATES, FeatureRow, UserState, state_record
from storage.online.sql import id_chunks, linked_users
from storage.online.store import OnlineStore


@dataclass(frozen=True, slots=True)
class EntityRows:
    """`resolved`: each requested key -> the key its rows are stored under."""

    resolved: dict[str, str]
    features: dict[str, list[FeatureRow]] = field(default_factory=dict)
    states: dict[str, UserState] = field(default_factory=dict)


def read_entities(
    store: OnlineStore,
    keys: Sequence[str],
    *,
    features: Sequence[str],
    with_state: bool,
    resolve_anonymous: bool = True,
) -> EntityRows:
    """Feature rows of `features` and (with `with_state`) state rows of `keys`; with
    `resolve_anonymous`, `anon:<id>` keys read the user an identify event linked."""
    with store.engine.connect() as conn:
        resolved = {k: k for k in keys}
        if resolve_anonymous:
            anonymous = {k: a for k in keys if (a := anonymous_of(k)) is not None}
            links = linked_users(conn, anonymous.values()) if anonymous else {}
            for k, a in anonymous.items():
                resolved[k] = links.get(a, k)
        targets = list(dict.fromkeys(resolved.values()))
        rows: dict[str, list[FeatureRow]] = {}
        states: dict[str, UserState] = {}
        for ids in id_chunks(targets):
            if features:
                stmt = (
                    sa.select(FEATURES)
                    .where(FEATURES.c.user_id.in_(ids), FEATURES.c.feature.in_(list(features)))
                    .order_by(FEATURES.c.user_id, FEATURES.c.feature, FEATURES.c.group_key)
                )
                for m in conn.execute(stmt).mappings():
                    rows.setdefault(m["user_id"], []).append(FeatureRow(**m))
            if with_state:
                stmt = sa.select(STATES).where(STATES.c.user_id.in_(ids))
                states.update(
                    (m["user_id"], state_record(m)) for m in conn.execute(stmt).mappings()
                )
    return EntityRows(resolved, rows, states)

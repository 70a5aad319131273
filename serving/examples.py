"""OpenAPI examples, one place, so controllers stay about behaviour."""

from litestar.openapi.spec import Example

EVENT = {
    "event_id": "e-1001",
    "type": "view",
    "user_id": "u42",
    "item_id": "i17",
    "ts": "2025-01-06T12:00:00Z",
    "context": {"session_id": "s9", "device": "mobile"},
    "properties": {"referrer": "search"},
}

EVENTS_IN = [
    Example(
        summary="Two events, one of them invalid",
        value={"events": [EVENT, {"type": "view", "user_id": "u42"}]},
    )
]
EVENTS_OUT = [
    Example(
        summary="One accepted, one rejected",
        value={
            "accepted": 1,
            "rejected": [{"index": 1, "reason": "'view' events need item_id", "event_id": None}],
            "event_ids": ["e-1001"],
        },
    )
]
EVENTS_NONE = [
    Example(
        summary="Nothing valid",
        value={
            "accepted": 0,
            "rejected": [
                {"index": 0, "reason": "an event must be a JSON object", "event_id": None}
            ],
            "event_ids": [],
        },
    )
]

DECIDE_IN = [
    Example(
        summary="Home page, five items",
        value={"user_id": "u42", "k": 5, "context": {"device": "mobile"}, "exclude": ["i3"]},
    ),
    Example(
        summary="Checkout offers",
        value={"user_id": "u42", "k": 2, "surface": "checkout", "context": {"device": "desktop"}},
    ),
    Example(
        summary="Re-rank the caller's candidates (Metarank /rank)",
        value={"user_id": "u42", "k": 3, "candidates": ["i18", "i3", "i27", "i40"]},
    ),
]
DECIDE_OUT = [
    Example(
        summary="Real-time decision",
        value={
            "decision_id": "3f2b8c1e9a7d4e0f8b6a5c4d3e2f1a0b",
            "user_id": "u42",
            "surface": "default",
            "actions": [
                {
                    "action_id": "recommend",
                    "item_id": "i18",
                    "score": 1.62,
                    "source": "item_model",
                    "reasons": ["item_model: 0.412 because of i17", "vector: similarity 0.871"],
                    "title": "Blender 600 W",
                    "attributes": {
                        "category": "kitchen",
                        "price": 49.9,
                        "in_stock": True,
                        "title": "Blender 600 W",
                    },
                }
            ],
            "served_from": "realtime",
            "model_version": "m-20250106",
            "feature_age_ms": 850,
            "degraded": [],
        },
    )
]

FEEDBACK_IN = [
    Example(
        summary="A click on a recommended item",
        value={
            "decision_id": "3f2b8c1e9a7d4e0f8b6a5c4d3e2f1a0b",
            "user_id": "u42",
            "outcome": "click",
            "action_id": "recommend",
            "item_id": "i18",
        },
    )
]
FEEDBACK_OUT = [
    Example(
        summary="Recorded",
        value={"accepted": True, "decision_id": "3f2b8c1e9a7d4e0f8b6a5c4d3e2f1a0b"},
    )
]

FEATURES_OUT = [
    Example(
        summary="Online features with their ages",
        value={
            "user_id": "u42",
            "resolved_user_id": "u42",
            "features": [
                {
                    "feature": "views_1h",
                    "group": "",
                    "value": 3.0,
                    "value_json": None,
                    "event_ts": "2025-01-06T12:00:00Z",
                    "updated_at": "2025-01-06T12:00:00.120000Z",
                    "age_ms": 1200,
                }
            ],
            "state": {
                "recent_items": ["i17", "i4"],
                "session_id": "s9",
                "has_session_vector": True,
                "event_ts": "2025-01-06T12:00:00Z",
                "updated_at": "2025-01-06T12:00:00.120000Z",
                "age_ms": 1200,
            },
        },
    )
]

ERASURE_OUT = [
    Example(
        summary="The API's part done, the stream's stores in progress",
        value={
            "job_id": "9c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f",
            "user_id": "u42",
            "status": "running",
            "stores": {
                "online": "done: 14 rows",
                "cached_decisions": "done: 1 rows",
                "eventlog": "running: 120 records removed",
                "lance_users": "done: 1 rows",
                "stream_state": "pending: stream",
                "delta_events": "done: 118 rows",
                "delta_decisions": "pending: stream",
                "delta_feedback": "pending: stream",
                "delta_dead_letters": "pending: stream",
                "delta_silver_sessions": "pending: stream",
                "delta_gold_interactions": "pending: stream",
                "delta_gold_user_features": "pending: stream",
                "delta_gold_training_set": "pending: stream",
            },
            "created_at": "2025-01-06T12:00:00Z",
            "updated_at": "2025-01-06T12:00:00.200000Z",
        },
    )
]

HEALTH_OUT = [Example(summary="Alive", value={"status": "ok"})]
READY_OUT = [
    Example(
        summary="Ready",
        value={
            "ready": True,
            "checks": {
                "online_store": "ok",
                "event_log": "ok",
                "vector_store": "ok",
                "model": "ok",
            },
            "model_version": "m-20250106",
        },
    ),
    Example(
        summary="Not ready",
        value={
            "ready": False,
            "checks": {
                "online_store": "ok",
                "event_log": "ok",
                "vector_store": "ok",
                "model": "no promoted model in the registry",
            },
            "model_version": None,
        },
    ),
]
METRICS_OUT = [
    Example(
        summary="Prometheus text",
        value='nextbest_decisions_total{served_from="realtime",surface="default"} 42.0\n',
    )
]

UNKNOWN_SURFACE = [
    Example(
        summary="A surface the spec does not declare",
        value={
            "status_code": 422,
            "detail": "context.surface: unknown surface 'hmoe'; known: checkout, default",
            "extra": {"field": "context.surface", "known": ["checkout", "default"]},
        },
    )
]
OUT_OF_BOUNDS = [
    Example(
        summary="A value outside the configured bounds",
        value={
            "status_code": 422,
            "detail": "ts: more than 300 s ahead of the server clock",
            "extra": {"field": "ts"},
        },
    )
]
BODY_REFUSED = [
    Example(
        summary="Nested too deep (checked before decoding)",
        value={"status_code": 400, "detail": "request body: nested deeper than 32 levels"},
    )
]

FEATURES_MANY_IN = [
    Example(
        summary="Two users, two features (Feast entity columns)",
        value={
            "entities": {"user_id": ["u42", "u7"]},
            "features": ["views_1h", "category_affinity_1h"],
        },
    ),
    Example(
        summary="Entity rows, every feature of the item entity",
        value={"entities": [{"item_id": "i17"}, {"item_id": "i18"}]},
    ),
]
FEATURES_MANY_OUT = [
    Example(
        summary="One known user, one unknown",
        value={
            "entity": "user_id",
            "features": ["views_1h", "category_affinity_1h"],
            "results": [
                {
                    "id": "u42",
                    "resolved_id": "u42",
                    "found": True,
                    "values": {"views_1h": 3.0, "category_affinity_1h": {"kitchen": 2.0}},
                    "event_ts": {
                        "views_1h": "2025-01-06T12:00:00Z",
                        "category_affinity_1h": "2025-01-06T12:00:00Z",
                    },
                },
                {
                    "id": "u7",
                    "resolved_id": "u7",
                    "found": False,
                    "values": {"views_1h": None, "category_affinity_1h": None},
                    "event_ts": {"views_1h": None, "category_affinity_1h": None},
                },
            ],
        },
    )
]
UNKNOWN_FEATURES = [
    Example(
        summary="A feature the spec does not declare",
        value={
            "status_code": 422,
            "detail": "features: unknown 'views_1d'; known for users: views_1h, cart_adds_1h",
            "extra": {
                "field": "features",
                "unknown": ["views_1d"],
                "known": ["views_1h", "cart_adds_1h"],
            },
        },
    )
]

ITEMS_IN = [
    Example(
        summary="Out of stock, a new price, one invalid",
        value={
            "items": [
                {"item_id": "i17", "attributes": {"in_stock": False}},
                {"item_id": "i18", "attributes": {"price": 39.9}},
                {"item_id": "i19", "attributes": {"colour": "red"}},
            ]
        },
    )
]
ITEMS_OUT = [
    Example(
        summary="Two applied, one rejected",
        value={
            "accepted": 2,
            "rejected": [
                {
                    "index": 2,
                    "reason": "attributes.colour: not an item attribute of the spec "
                    "(declared: category, in_stock, price, title)",
                    "item_id": "i19",
                }
            ],
            "update_id": "5d0c3b1a9e8f4d2c8b7a6f5e4d3c2b1a",
            "version": 12,
        },
    )
]
ITEMS_NONE = [
    Example(
        summary="Nothing valid",
        value={
            "accepted": 0,
            "rejected": [
                {
                    "index": 0,
                    "reason": "attributes.price: must be a number (float)",
                    "item_id": "i17",
                }
            ],
            "update_id": None,
            "version": None,
        },
    )
]
SIMILAR_OUT = [
    Example(
        summary="Neighbours from the promoted model",
        value={
            "item_id": "i17",
            "source": "model",
            "model_version": "m-20250106",
            "items": [
                {
                    "item_id": "i18",
                    "score": 0.91,
                    "title": "Blender 600 W",
                    "attributes": {
                        "category": "kitchen",
                        "price": 49.9,
                        "in_stock": True,
                        "title": "Blender 600 W",
                    },
                }
            ],
        },
    )
]
UNKNOWN_ITEM = [
    Example(
        summary="An item without a vector",
        value={"status_code": 404, "detail": "unknown item 'i999': no vector for it"},
    )
]

"""Decision rows for Delta: the JSON columns keep numbers numbers (numpy scalars
included) with sorted keys, as `json.dumps(sort_keys=True)` wrote them before the
encoder became msgspec (issue #13: it was the stream's top cost per decision)."""

import json
from datetime import UTC, datetime

import numpy as np

from storage.delta.schemas import decisions_to_table


def test_decision_json_columns_keep_numbers_and_sorted_keys() -> None:
    features = {
        "z": np.float64(0.25),
        "a": [np.float32(1.5), np.int64(3)],
        "when": datetime(2025, 1, 1),
    }
    row = {
        "decision_id": "d1",
        "user_id": "u1",
        "ts": datetime(2025, 1, 2, tzinfo=UTC),
        "served_from": "realtime",
        "actions": [{"item_id": "i1", "score": np.float64(0.5)}],
        "candidates": None,
        "features": features,
    }
    table = decisions_to_table([row])
    text = table.column("features")[0].as_py()
    assert list(json.loads(text)) == ["a", "when", "z"]
    assert json.loads(text)["z"] == 0.25 and json.loads(text)["a"] == [1.5, 3]
    assert json.loads(table.column("actions")[0].as_py()) == [{"item_id": "i1", "score": 0.5}]
    assert table.column("candidates")[0].as_py() is None

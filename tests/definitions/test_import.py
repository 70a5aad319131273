"""History import: validation with line numbers, idempotent appends, items, MovieLens."""

import json
from pathlib import Path

from definitions.batch.importer import import_events, import_items, import_movielens
from nextbest.settings import Settings
from storage.delta.store import DeltaStore


def _event(i: int, **over) -> dict:
    base = {
        "event_id": f"e{i}",
        "type": "view",
        "user_id": f"u{i % 3}",
        "item_id": f"i{i % 5}",
        "ts": 1_736_000_000 + i,
        "context": {"session_id": "s1"},
    }
    base.update(over)
    return base


def test_jsonl_rejects_bad_rows_with_line_numbers_and_is_idempotent(
    settings: Settings, spec, tmp_path: Path
) -> None:
    lines = [json.dumps(_event(i)) for i in range(5)]
    lines.insert(2, "{not json")  # line 3
    lines.append(json.dumps(_event(9, type="teleport")))  # line 7
    lines.append(json.dumps(_event(10, type="rate")))  # line 8: rate needs a value
    lines.append("")  # blank lines are skipped, not rejected
    lines.append(json.dumps(_event(1)))  # line 10: repeated event id
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")

    summary = import_events(settings, spec, path, progress=False)
    assert (summary.read, summary.accepted, summary.written) == (9, 5, 5)
    assert [line for line, _ in summary.rejected] == [3, 7, 8, 10]
    reasons = dict(summary.rejected)
    assert "not JSON" in reasons[3]
    assert "unknown event type 'teleport'" in reasons[7]
    assert "need a numeric value" in reasons[8]
    assert "repeated" in reasons[10]
    assert any("line 7" in text for text in summary.lines())

    store = DeltaStore.from_settings(settings)
    assert store.count("events") == 5
    again = import_events(settings, spec, path, progress=False)
    assert (again.accepted, again.written) == (5, 0)
    assert store.count("events") == 5  # same file, same transaction id: nothing appended


def test_csv_with_json_columns(settings: Settings, spec, tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text(
        "event_id,type,user_id,anonymous_id,item_id,ts,value,context,properties\n"
        'c1,purchase,u1,,i1,2025-01-06T10:00:00Z,,"{""session_id"": ""s""}","{""quantity"": 2}"\n'
        "c2,rate,u1,,i1,1736160000,4.5,,\n"
        'c3,view,u2,,i2,2025-01-06T10:00:00Z,,"{broken",\n'
        "c4,rate,u2,,i2,2025-01-06T10:00:00Z,lots,,\n"
    )
    summary = import_events(settings, spec, path, progress=False)
    assert summary.accepted == 2
    assert [line for line, _ in summary.rejected] == [4, 5]
    rows = DeltaStore.from_settings(settings).read("events").sort_by("event_id").to_pylist()
    assert json.loads(rows[0]["properties"]) == {"quantity": 2}
    assert rows[0]["session_id"] == "s"
    assert rows[1]["value"] == 4.5 and rows[1]["ts"].timestamp() == 1736160000


def test_items_upsert_by_id(settings: Settings, spec, tmp_path: Path) -> None:
    first = tmp_path / "items.jsonl"
    first.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"item_id": "i1", "category": "shoes", "price": 10, "in_stock": True, "title": "A"},
                {"item_id": "i2", "category": "hats", "price": 5.5, "in_stock": False},
                {"category": "nameless"},
                {"item_id": "i3", "colour": "red"},
            ]
        )
    )
    summary = import_items(settings, spec, first)
    assert summary.accepted == 2 and [line for line, _ in summary.rejected] == [3, 4]
    second = tmp_path / "items.csv"
    second.write_text(
        "item_id,category,price,in_stock,title\ni2,hats,6,yes,B\ni4,bags,20,0,C\ni5,bags,x,1,D\n"
    )
    summary = import_items(settings, spec, second)
    assert summary.accepted == 2 and summary.rejected[0][0] == 4
    rows = {r["item_id"]: r for r in DeltaStore.from_settings(settings).read("items").to_pylist()}
    assert sorted(rows) == ["i1", "i2", "i4"]
    assert rows["i2"]["price"] == 6.0 and rows["i2"]["in_stock"] is True
    assert rows["i4"]["in_stock"] is False and rows["i1"]["title"] == "A"


def test_movielens_layout(settings: Settings, spec, tmp_path: Path) -> None:
    ml = tmp_path / "ml-100k"
    ml.mkdir()
    flags = ["0"] * 19
    comedy = flags.copy()
    comedy[5] = "1"
    drama_war = flags.copy()
    drama_war[8] = drama_war[17] = "1"
    (ml / "u.item").write_bytes(
        "\n".join(
            [
                "1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(comedy),
                "2|Caf\xe9 War (1996)|01-Jan-1996||http://y|" + "|".join(drama_war),
            ]
        ).encode("latin-1")
    )
    (ml / "u.data").write_text("196\t1\t3\t881250949\n186\t2\t5\t891717742\n22\t1\n")
    result = import_movielens(settings, spec, ml, progress=False)
    assert result["items"].written == 2
    assert result["events"].accepted == 2 and result["events"].rejected[0][0] == 3
    store = DeltaStore.from_settings(settings)
    items = {r["item_id"]: r for r in store.read("items").to_pylist()}
    assert items["1"]["category"] == "comedy" and items["2"]["category"] == "drama"
    assert items["2"]["title"] == "Caf\xe9 War (1996)" and items["2"]["in_stock"] is True
    events = store.read("events")
    assert set(events.column("type").to_pylist()) == {"rate"}
    assert sorted(events.column("value").to_pylist()) == [3.0, 5.0]
    assert min(events.column("ts").to_pylist()).year == 1997
    again = import_movielens(settings, spec, ml, progress=False)
    assert again["events"].written == 0 and store.count("events") == 2


def test_pii_properties_are_pseudonymized_before_they_reach_delta(
    settings: Settings, spec, tmp_path: Path
) -> None:
    email = "import-canary@example.com"
    identify = _event(1, type="identify", anonymous_id="a1", item_id=None)
    identify["properties"] = {"email": email}
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(identify) + "\n")
    summary = import_events(settings, spec, path, progress=False)
    assert summary.written == 1
    files = [p for p in Path(settings.delta_root).rglob("*") if p.is_file()]
    assert files and not any(email.encode() in p.read_bytes() for p in files)
    rows = DeltaStore.from_settings(settings).read("events").to_pylist()
    assert str(rows[0]["properties"]).count("h:") == 1  # the keyed hash, not the address

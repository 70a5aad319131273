"""A deterministic demo shop whose users drift, so real-time state visibly beats batch.

Each user has sparse long-term tastes (1-3 favourite categories), but a session's
intent is a favourite only ~40% of the time; within a session most views stay in the
intent category. The last few events therefore predict the next one far better than
last night's profile, which is the effect the streaming path exists to capture.

Output is seeded and streamed: `iter_events` / `iter_event_dicts` (and the Arrow
batches of `nextbest.demo.arrow`) produce the same globally time-ordered events in
bounded memory, from a few thousand events up to the 10M-event preset. The only I/O
is `write_demo`.
"""

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nextbest.demo.config import DemoConfig
from nextbest.demo.sessions import (
    CART,
    EVENT_TYPES,
    IDENTIFY,
    PURCHASE,
    REFERRERS,
    VIEW,
    Cols,
    iter_chunks,
)
from nextbest.demo.world import CATALOG, DEVICES, REGIONS, World, world_for
from nextbest.ingest.events import Event

__all__ = [
    "CATEGORIES",
    "DEVICES",
    "EVENT_TYPES",
    "HIDDEN_PREFIX",
    "REFERRERS",
    "REGIONS",
    "DemoConfig",
    "generate_items",
    "generate_users",
    "iter_event_dicts",
    "iter_events",
    "iter_items",
    "iter_users",
    "public_user",
    "write_demo",
]

CATEGORIES = tuple(CATALOG)
HIDDEN_PREFIX = "hidden_"
"""User keys starting with this are ground truth for evaluation, not spec attributes."""
DEFAULT_CHUNK = 65_536


def iter_items(cfg: DemoConfig) -> Iterator[dict[str, Any]]:
    """Catalog rows `{"item_id", "category", "price", "in_stock", "title"}` in id order."""
    world = world_for(cfg)
    cat = world.catalog
    ids = world.item_ids.tolist()
    categories = cat.item_category.tolist()
    prices = cat.price.tolist()
    stock = cat.in_stock.tolist()
    for i, item_id in enumerate(ids):
        yield {
            "item_id": item_id,
            "category": cat.categories[categories[i]],
            "price": prices[i],
            "in_stock": stock[i],
            "title": cat.title(i),
        }


def generate_items(cfg: DemoConfig) -> list[dict[str, Any]]:
    return list(iter_items(cfg))


def iter_users(cfg: DemoConfig) -> Iterator[dict[str, Any]]:
    """User rows: `user_id`, `home_region`, and the hidden truth under `hidden_*` keys.

    `hidden_favourite_categories` (strongest first) with `hidden_category_weights`, and
    `hidden_preferred_device`: what an evaluation may compare a model against; strip
    them with `public_user` before loading users as entity attributes.
    """
    world = world_for(cfg)
    users, names = world.users, world.catalog.categories
    ids = world.user_ids.tolist()
    fav, fav_w = users.favourites.tolist(), users.favourite_w.tolist()
    region, device = users.region.tolist(), users.device.tolist()
    for u, user_id in enumerate(ids):
        keep = [j for j, c in enumerate(fav[u]) if c >= 0]
        yield {
            "user_id": user_id,
            "home_region": REGIONS[region[u]],
            "hidden_favourite_categories": [names[fav[u][j]] for j in keep],
            "hidden_category_weights": [round(fav_w[u][j], 4) for j in keep],
            "hidden_preferred_device": DEVICES[device[u]],
        }


def generate_users(cfg: DemoConfig) -> list[dict[str, Any]]:
    return list(iter_users(cfg))


def public_user(row: dict[str, Any]) -> dict[str, Any]:
    """A user row without the hidden evaluation keys."""
    return {k: v for k, v in row.items() if not k.startswith(HIDDEN_PREFIX)}


def iso_ms(ts_ms: np.ndarray) -> np.ndarray:
    """Epoch ms -> ISO 8601 text exactly as `Event.to_json` writes it ('...Z')."""
    seconds = np.datetime_as_string(ts_ms.astype("datetime64[ms]").astype("datetime64[s]"))
    frac = np.mod(ts_ms, 1000)
    tail = np.strings.add(np.strings.add(".", np.strings.zfill(frac.astype("U"), 3)), "000Z")
    return np.strings.add(seconds, np.where(frac == 0, "Z", tail))


def _on(mask: np.ndarray, make: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`make(rows)` where `mask` holds, '' elsewhere: format only the rows that need it."""
    rows = np.flatnonzero(mask)
    part = make(rows)
    out = np.full(len(mask), "", dtype=part.dtype if len(part) else "U1")
    out[rows] = part
    return out


def text_columns(cfg: DemoConfig, world: World, c: Cols) -> dict[str, np.ndarray]:
    """Vectorised string columns of a chunk ('' where the event has no such value)."""
    add = np.strings.add
    seed = str(cfg.seed)
    kind = c["type"]
    # Per-session text once per session, then gathered: ~8 events share each.
    uniq, inverse = np.unique(c["sess"], return_inverse=True)
    uniq_text = uniq.astype("U")
    sess = uniq_text[inverse]
    sess_pos = add(add(sess, "-"), c["pos"].astype("U"))
    user, item, referrer = c["user"], c["item"], c["referrer"]
    user_ids = _on(user >= 0, lambda r: world.user_ids[user[r]])
    return {
        "event_id": add(f"ev{seed}-", sess_pos),
        "type": np.asarray(EVENT_TYPES)[kind],
        "user_id": user_ids,
        "anonymous_id": _on(c["anonymous"], lambda r: add(f"anon{seed}-", sess[r])),
        "item_id": _on(item >= 0, lambda r: world.item_ids[item[r]]),
        "ts": iso_ms(c["ts"]),
        "session_id": add(f"s{seed}-", uniq_text)[inverse],
        "geo": np.asarray(REGIONS)[c["geo"]],
        "device": np.asarray(DEVICES)[c["device"]],
        "order_id": _on(kind == PURCHASE, lambda r: add(f"o{seed}-", sess_pos[r])),
        "email": _on(kind == IDENTIFY, lambda r: add(user_ids[r], "@example.com")),
        "referrer": _on(referrer >= 0, lambda r: np.asarray(REFERRERS)[referrer[r]]),
    }


def _properties(kind: int, quantity: int, referrer: str, order_id: str, email: str) -> dict:
    if kind == VIEW:
        return {"referrer": referrer} if referrer else {}
    if kind == CART:
        return {"quantity": quantity}
    if kind == PURCHASE:
        return {"quantity": quantity, "order_id": order_id}
    if kind == IDENTIFY:
        return {"email": email}
    return {}


def iter_event_dicts(
    cfg: DemoConfig, *, chunk_size: int = DEFAULT_CHUNK
) -> Iterator[dict[str, Any]]:
    """Events as JSON-ready dicts in the `Event` wire shape (ts as ISO text), by ts.

    Key order and values match `Event.to_json`, so `json.dumps(d, separators=(",", ":"))`
    is byte-identical to it, without paying for pydantic on bulk loads.
    """
    world = world_for(cfg)
    for c in iter_chunks(world, chunk_size):
        t = {k: v.tolist() for k, v in text_columns(cfg, world, c).items()}
        kinds, quantity = c["type"].tolist(), c["quantity"].tolist()
        values = c["value"].tolist()
        for i, kind in enumerate(kinds):
            yield {
                "event_id": t["event_id"][i],
                "type": t["type"][i],
                "user_id": t["user_id"][i] or None,
                "anonymous_id": t["anonymous_id"][i] or None,
                "item_id": t["item_id"][i] or None,
                "ts": t["ts"][i],
                "value": float(values[i]) if values[i] else None,
                "context": {
                    "session_id": t["session_id"][i],
                    "geo": t["geo"][i],
                    "device": t["device"][i],
                },
                "properties": _properties(
                    kind, quantity[i], t["referrer"][i], t["order_id"][i], t["email"][i]
                ),
            }


def iter_events(cfg: DemoConfig, *, chunk_size: int = DEFAULT_CHUNK) -> Iterator[Event]:
    """Validated `Event`s, globally ordered by ts (ties: session, then position)."""
    for d in iter_event_dicts(cfg, chunk_size=chunk_size):
        yield Event.model_validate(d)


def write_demo(out_dir: str | Path, cfg: DemoConfig) -> dict[str, int]:
    """Write `items.jsonl`, `users.jsonl` (with hidden keys) and `events.jsonl`.

    Streams line by line, so even the large preset needs little memory. Returns counts
    `{"items", "users", "events"}`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    sources: dict[str, Iterator[dict[str, Any]]] = {
        "items": iter_items(cfg),
        "users": iter_users(cfg),
        "events": iter_event_dicts(cfg),
    }
    for name, rows in sources.items():
        n = 0
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, separators=(",", ":")))
                fh.write("\n")
                n += 1
        counts[name] = n
    return counts

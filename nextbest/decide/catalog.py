"""Item attribute updates (`PUT /v1/items`) checked against the spec, item by item.

Like events, each item is judged on its own: a bad one comes back with its index and
a reason naming the field, the others go on. An update names the item and some of
its declared attributes (`{"item_id": "i17", "attributes": {"in_stock": false}}`);
attributes it does not name keep their values, `null` clears one. Types follow the
spec: `int` takes integers, `float` any finite number, `bool` true/false, `string`
text without control characters.
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nextbest.ingest.limits import LimitExceeded, Limits
from nextbest.spec.models import Spec

MAX_TEXT = 4096
"""Longest string attribute value (titles and descriptions included)."""
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_FIELDS = frozenset({"item_id", "attributes"})


@dataclass(frozen=True, slots=True)
class RejectedItem:
    index: int
    reason: str
    item_id: str | None = None


def validate_item_updates(
    raw: Sequence[Any], spec: Spec, limits: Limits
) -> tuple[dict[str, dict[str, Any]], list[RejectedItem]]:
    """({item_id: attributes to set}, rejections). An item named twice gets both
    updates merged in order (the later value of an attribute wins)."""
    declared = spec.entities.item.attributes
    accepted: dict[str, dict[str, Any]] = {}
    rejected: list[RejectedItem] = []
    for index, entry in enumerate(raw):
        item_id = entry.get("item_id") if isinstance(entry, dict) else None
        item_id = item_id if isinstance(item_id, str) else None
        try:
            attrs = _one(entry, declared, limits)
        except LimitExceeded as exc:
            rejected.append(RejectedItem(index, str(exc), item_id))
            continue
        assert item_id is not None
        accepted[item_id] = {**accepted.get(item_id, {}), **attrs}
    return accepted, rejected


def _one(entry: Any, declared: Mapping[str, Any], limits: Limits) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise LimitExceeded("an item update must be a JSON object")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise LimitExceeded(f"{unknown[0]}: unknown field; an update has item_id and attributes")
    item_id = entry.get("item_id")
    if not isinstance(item_id, str) or not item_id:
        raise LimitExceeded("item_id: required, a non-empty string")
    limits.check_id("item_id", item_id)
    attrs = entry.get("attributes")
    if not isinstance(attrs, dict) or not attrs:
        raise LimitExceeded("attributes: required, an object naming at least one attribute")
    out: dict[str, Any] = {}
    for name, value in attrs.items():
        field = f"attributes.{name}"
        attr = declared.get(name)
        if attr is None:
            known = ", ".join(sorted(declared)) or "none"
            raise LimitExceeded(f"{field}: not an item attribute of the spec (declared: {known})")
        out[name] = _typed(field, attr.type, value, limits)
    return out


def _typed(field: str, kind: str, value: Any, limits: Limits) -> Any:
    if value is None:
        return None
    if kind == "bool":
        if not isinstance(value, bool):
            raise LimitExceeded(f"{field}: must be true or false")
        return value
    if kind == "string":
        if not isinstance(value, str):
            raise LimitExceeded(f"{field}: must be a string")
        if len(value) > MAX_TEXT:
            raise LimitExceeded(f"{field}: longer than {MAX_TEXT} characters")
        if _CONTROL.search(value):
            raise LimitExceeded(f"{field}: control characters are not allowed")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LimitExceeded(f"{field}: must be a number ({kind})")
    try:
        number = float(value)
    except OverflowError:
        raise LimitExceeded(f"{field}: number out of range") from None
    if kind == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise LimitExceeded(f"{field}: must be an integer")
            value = int(value)
        limits.check_number(field, number)
        return value
    limits.check_number(field, number)
    return number

"""Eligibility rules of the spec, evaluated without I/O.

A `Condition` names `item.<attribute>`, `user.<feature or attribute>` or
`context.<key>`. The serving path evaluates them against in-memory item attributes,
the user's online features and the request context; the batch side can reuse the same
functions to precompute decisions that obey the same rules.

Missing values: a window feature the user has no row for is 0 for counting
aggregations (count, sum, distinct_count), because "no events in the window" is
exactly what the missing row means; for anything else a missing value satisfies only
the negative operators (`ne`, `not_in`).
"""

from collections.abc import Mapping
from typing import Any

from nextbest.spec.models import Condition, Spec, WindowFeature

_COUNTING = frozenset({"count", "sum", "distinct_count"})


def compare(op: str, left: Any, right: Any) -> bool:
    """`left <op> right`; incomparable values (None, str vs number) are simply False."""
    if op == "eq":
        return left == right
    if op == "ne":
        return left != right
    if op in ("in", "not_in"):
        options = right if isinstance(right, list | tuple | set | frozenset) else [right]
        return (left in options) == (op == "in")
    if left is None or right is None:
        return False
    try:
        if op == "lt":
            return left < right
        if op == "lte":
            return left <= right
        if op == "gt":
            return left > right
        if op == "gte":
            return left >= right
    except TypeError:
        return False
    raise ValueError(f"unknown operator {op!r}")


def user_value(spec: Spec, name: str, features: Mapping[str, float | None]) -> Any:
    """The value of `user.<name>`: an ungrouped online feature, else a user attribute."""
    if name in features:
        return features[name]
    feature = spec.features.get(name)
    if isinstance(feature, WindowFeature) and feature.agg in _COUNTING:
        return 0.0
    return None


def condition_value(
    spec: Spec,
    condition: Condition,
    *,
    item: Mapping[str, Any] | None,
    user: Mapping[str, float | None],
    context: Mapping[str, Any],
) -> Any:
    scope, _, name = condition.attr.partition(".")
    if scope == "item":
        return None if item is None else item.get(name)
    if scope == "user":
        return user_value(spec, name, user)
    return context.get(name)


def describe(condition: Condition, actual: Any) -> str:
    """Human-readable reason: 'user.cart_adds_1h gte 1 (is 2.0)'."""
    return f"{condition.attr} {condition.op} {condition.value!r} (is {actual!r})"


def check(
    spec: Spec,
    conditions: list[Condition],
    *,
    item: Mapping[str, Any] | None,
    user: Mapping[str, float | None],
    context: Mapping[str, Any],
) -> tuple[bool, list[str]]:
    """(all hold, a reason per condition); stops at the first failing condition."""
    reasons: list[str] = []
    for condition in conditions:
        actual = condition_value(spec, condition, item=item, user=user, context=context)
        reasons.append(describe(condition, actual))
        if not compare(condition.op, actual, condition.value):
            return False, reasons
    return True, reasons


def item_rules(conditions: list[Condition]) -> list[Condition]:
    return [c for c in conditions if c.attr.startswith("item.")]


def request_rules(conditions: list[Condition]) -> list[Condition]:
    """Conditions that do not depend on the item: evaluated once per decision."""
    return [c for c in conditions if not c.attr.startswith("item.")]

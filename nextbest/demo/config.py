"""Configuration of the demo shop generator (`nextbest.demo.shop`).

A frozen dataclass so a config can key caches and be compared in tests; every knob of
the behaviour model is a field so a benchmark can switch the drift off (e.g.
`favourite_intent=1.0, in_intent=0.0`) and show what the real-time path gains from it.
"""

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Self

DEFAULT_START = datetime(2025, 1, 6, tzinfo=UTC)


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Sizes, time span and behaviour of one deterministic demo shop."""

    seed: int = 7
    n_users: int = 200
    n_items: int = 300
    n_events: int = 5_000
    days: int = 14
    start: datetime = field(default=DEFAULT_START)
    end: datetime | None = None
    """When set, the history ends at `end`: it starts `days` before (overriding `start`)
    and the few events of sessions running past `end` are clamped to it. Same seed and
    `end`, same events; another `end` shifts every timestamp and nothing else."""
    mean_session_events: float = 8.0
    """Sessions = n_events / this; session lengths are geometric around it (min 2)."""
    favourite_intent: float = 0.4
    """Probability that a session's intent is one of the user's long-term favourites."""
    taste_shift_days: float | None = None
    """When set, every user's favourite categories move on to others each this many
    days (a drifting taste, so old history predicts less); None: tastes never change."""
    in_intent: float = 0.85
    """Probability that a view stays in the session's intent category."""
    cart_rate: float = 0.10
    """P(view is followed by add_to_cart of the same item)."""
    purchase_rate: float = 0.30
    """P(add_to_cart is followed by purchase of the same item)."""
    rating_rate: float = 0.25
    """P(purchase is followed by a rate event, value 1-5)."""
    anonymous_rate: float = 0.10
    """Share of sessions that start anonymous (anonymous_id, no user_id)."""
    identify_rate: float = 0.5
    """Share of anonymous sessions (with >= 3 events) that log in midway (`identify`)."""

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items", "days"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_events < 0:
            raise ValueError(f"DemoConfig.n_events must be >= 0, got {self.n_events}")
        if self.seed < 0:
            raise ValueError(f"DemoConfig.seed must be >= 0, got {self.seed}")
        if self.taste_shift_days is not None and not self.taste_shift_days > 0:
            raise ValueError("DemoConfig.taste_shift_days must be > 0 (or None: no drift)")
        if self.mean_session_events < 2:
            raise ValueError("DemoConfig.mean_session_events must be >= 2")
        for name in (
            "favourite_intent",
            "in_intent",
            "cart_rate",
            "purchase_rate",
            "rating_rate",
            "anonymous_rate",
            "identify_rate",
        ):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"DemoConfig.{name} is a probability, got {v}")
        start = self.start if self.start.tzinfo else self.start.replace(tzinfo=UTC)
        object.__setattr__(self, "start", start.astimezone(UTC))
        if self.end is not None:
            end = (self.end if self.end.tzinfo else self.end.replace(tzinfo=UTC)).astimezone(UTC)
            object.__setattr__(self, "end", end)
            object.__setattr__(self, "start", end - timedelta(days=self.days))

    @property
    def start_ms(self) -> int:
        return round(self.start.timestamp() * 1000)

    @property
    def end_ms(self) -> int | None:
        return None if self.end is None else round(self.end.timestamp() * 1000)

    def ending_at(self, now: datetime | None = None) -> Self:
        """This shop with its history ending at `now` (default: the current second), as
        `nextbest demo` writes it, so the first decision's features are fresh."""
        end = now if now is not None else datetime.now(UTC).replace(microsecond=0)
        return self.replace(end=end)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    @classmethod
    def small(cls, **overrides: Any) -> Self:
        """~5k events, 200 users, 300 items over 14 days: tests and quick demos."""
        return cls(**{"n_users": 200, "n_items": 300, "n_events": 5_000, "days": 14, **overrides})

    @classmethod
    def medium(cls, **overrides: Any) -> Self:
        """~200k events, 10k users, 5k items over 30 days: a laptop demo with real signal."""
        sizes = {"n_users": 10_000, "n_items": 5_000, "n_events": 200_000, "days": 30}
        return cls(**{**sizes, **overrides})

    @classmethod
    def large(cls, **overrides: Any) -> Self:
        """10M events, 1M users, 100k items over 30 days: scale benchmarks (stream it)."""
        sizes = {"n_users": 1_000_000, "n_items": 100_000, "n_events": 10_000_000, "days": 30}
        return cls(**{**sizes, **overrides})

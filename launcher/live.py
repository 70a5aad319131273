"""What `nextbest status` reads from the running processes' Prometheus endpoints: the
stream's (`pipelines.metrics`, addresses recorded under `<home>/run/`) and the API's
`/metrics` (`serving.metrics`), so lag, epoch time, events/s and freshness show even
when nobody calls decide."""

import math
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from nextbest.settings import Settings

Sample = tuple[str, dict[str, str], float]
TIMEOUT_S = 2.0


def scrape(url: str) -> list[Sample] | None:
    """Every sample of an endpoint; None when it cannot be read."""
    try:
        response = httpx.get(url, timeout=TIMEOUT_S)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    out: list[Sample] = []
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            out.append((s.name, dict(s.labels), float(s.value)))
    return out


def total(samples: Iterable[Sample], name: str, **labels: str) -> float:
    return sum(
        v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())
    )


def quantile(samples: Iterable[Sample], name: str, q: float, **labels: str) -> float | None:
    """`histogram_quantile` over cumulative `<name>_bucket` samples (summed over the
    other labels), interpolating linearly inside the bucket like Prometheus does."""
    buckets: dict[float, float] = {}
    for n, lab, v in samples:
        if n != f"{name}_bucket" or not all(lab.get(k) == x for k, x in labels.items()):
            continue
        le = float(lab["le"])
        buckets[le] = buckets.get(le, 0.0) + v
    if not buckets or buckets.get(math.inf, 0.0) <= 0:
        return None
    bounds = sorted(buckets)
    rank = q * buckets[math.inf]
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = le, count
    return lower


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


def stream_info(settings: Settings) -> dict[str, Any]:
    """Live figures of the home's stream processes, summed over a cluster."""
    from pipelines.metrics import stream_endpoints

    endpoints = stream_endpoints(settings)
    if not endpoints:
        return {"stream_metrics": "no stream running"}
    samples: list[Sample] = []
    urls = []
    for endpoint in endpoints:
        got = scrape(str(endpoint["url"]))
        urls.append(str(endpoint["url"]) + ("" if got is not None else " (unreachable)"))
        samples.extend(got or [])
    lag: dict[str, float] = {}
    for n, lab, v in samples:
        if n == "nextbest_stream_lag_records":  # a cluster may report a partition twice
            lag[lab["partition"]] = max(lag.get(lab["partition"], 0.0), v)
    epochs = total(samples, "nextbest_stream_epoch_duration_seconds_count")
    epoch_sum = total(samples, "nextbest_stream_epoch_duration_seconds_sum")
    fresh = [v for n, _, v in samples if n == "nextbest_stream_event_to_online_last_seconds"]
    writes = [v for n, _, v in samples if n == "nextbest_stream_last_write_timestamp_seconds"]
    return {
        "stream_metrics": ", ".join(urls),
        "stream_events_per_s": round(total(samples, "nextbest_stream_events_per_second"), 1),
        "stream_events_in": int(total(samples, "nextbest_stream_events_total")),
        "stream_dead_letters_in": int(total(samples, "nextbest_stream_dead_letters_written_total")),
        "stream_lag_live": int(sum(lag.values())),
        "stream_lag_live_by_partition": {p: int(v) for p, v in sorted(lag.items())},
        "stream_epoch": (
            f"mean {_ms(epoch_sum / epochs)}, p99 "
            f"{_ms(quantile(samples, 'nextbest_stream_epoch_duration_seconds', 0.99))}"
            if epochs
            else "n/a"
        ),
        "stream_freshness": _ms(max(fresh)) if fresh and max(writes, default=0) > 0 else "n/a",
        "stream_last_write": (
            datetime.fromtimestamp(max(writes), tz=UTC).isoformat(timespec="seconds")
            if writes and max(writes) > 0
            else None
        ),
        "stream_state_keys": {
            lab["state"]: int(v) for n, lab, v in samples if n == "nextbest_stream_state_keys"
        },
    }


def api_info(settings: Settings) -> dict[str, Any]:
    """Totals and decide latency from the running API's /metrics."""
    samples = scrape(f"{settings.api_url}/metrics")
    if samples is None:
        return {"api_metrics": f"{settings.api_url}/metrics unreachable"}
    route = {"route": "/v1/decide"}
    p50 = quantile(samples, "nextbest_http_request_duration_seconds", 0.5, **route)
    p99 = quantile(samples, "nextbest_http_request_duration_seconds", 0.99, **route)
    return {
        "api_events_accepted": int(total(samples, "nextbest_events_accepted_total")),
        "api_events_rejected": int(total(samples, "nextbest_events_rejected_total")),
        "api_decisions": int(total(samples, "nextbest_decisions_total")),
        "api_fallbacks": int(total(samples, "nextbest_decision_fallbacks_total")),
        "api_decide_latency": f"p50 {_ms(p50)}, p99 {_ms(p99)}",
    }

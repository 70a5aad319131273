"""Garbage-collector settings for a stream worker process.

The stream keeps every active user's and item's state in memory (a few dozen small
containers each) and allocates several long-lived tuples per event. With CPython's
default thresholds (700, 10, 10) that heap is walked by full collections again and
again: measured on the demo flow, the collector took a quarter of the worker's CPU
(`benchmarks/stream_cpu.py`), in pauses of 100-400 ms that land straight on
event-to-online freshness. Almost none of it is cyclic garbage: state is freed by
reference counting when it is replaced.

So: freeze what exists once the flow is built (modules, the spec, the catalog: never
garbage) out of every later collection, and collect the young generation every
`YOUNG` allocations instead of 700. Cycles are still found, just later.
"""

import gc

YOUNG = 50_000
"""Allocations between young collections (CPython default: 700)."""


def tune_for_stream() -> None:
    """Call once per process, after building the flow and before running it."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG, middle, old)

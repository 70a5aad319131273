"""Keep the stream worker from crowding the API off a small machine's cores.

The stream's Delta commits, LanceDB merges and Arrow conversions run on native thread
pools sized to every core by default (Arrow's CPU pool, the Tokio runtimes of
deltalake and lance, Rayon, BLAS/OpenMP). At each epoch end they wake together, and on
a 2-core machine they take both cores from the API for tens of milliseconds, which is
a decision's whole latency budget. The stream's work is sequential per epoch anyway,
so `stream_threads` (default 1) bounds them. The variables only act on pools not yet
created, so `share_cpu` runs before the flow is built (first store use); an operator's
own setting of any of them wins.
"""

import logging
import os

from nextbest.settings import Settings

log = logging.getLogger(__name__)

THREAD_VARIABLES = (
    "TOKIO_WORKER_THREADS",  # deltalake's and lancedb's Tokio runtimes
    "LANCE_CPU_THREADS",
    "RAYON_NUM_THREADS",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
)


def share_cpu(settings: Settings) -> None:
    """Bound this process's native thread pools and apply `stream_nice`."""
    threads = str(settings.stream_threads)
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, threads)
    import pyarrow as pa

    pa.set_cpu_count(settings.stream_threads)
    pa.set_io_thread_count(max(2, settings.stream_threads))
    if settings.stream_nice:
        try:
            os.nice(settings.stream_nice)
        except OSError as exc:  # not permitted: run at the inherited priority
            log.warning("cannot lower the stream's priority: %s", exc)

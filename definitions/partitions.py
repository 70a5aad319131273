"""Day partitions of the history assets, so a range of days can be backfilled.

Keyed by the UTC event date (the `event_date` partition column of bronze). The start
is early enough for public data sets such as MovieLens 100k (1997-1998); one run can
cover a whole range (`BackfillPolicy.single_run`).
"""

import dagster as dg

DAILY = dg.DailyPartitionsDefinition(start_date="1995-01-01", end_offset=1)
"""UTC days from 1995-01-01 up to and including today."""

IO_RETRY = dg.RetryPolicy(max_retries=3, delay=2, backoff=dg.Backoff.EXPONENTIAL)
"""Retries for steps that hit storage: transient object-store or lock errors pass."""

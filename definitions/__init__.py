"""The nextbest Dagster code location: `dagster dev` in the project finds it through
pyproject's `[tool.dagster]` (location `nextbest`); elsewhere `dagster dev -m definitions`.

`defs` is lazy: nothing is read until Dagster loads the location; `build_definitions`
is the factory tests and the CLI call with explicit settings.
"""

import dagster as dg

from definitions.location import build_definitions


@dg.definitions
def defs() -> dg.Definitions:
    """Settings and spec from the `NEXTBEST_*` environment of the Dagster process."""
    return build_definitions()


__all__ = ["build_definitions", "defs"]

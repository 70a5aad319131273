"""Tests of the `nextbest` package (named `core` so it cannot shadow `nextbest` itself)."""

"""Whole-stack tests: real processes (API, stream, Dagster) working together."""

"""Batch library code the Dagster assets call (no Dagster imports)."""

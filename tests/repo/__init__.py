"""Checks on the repository itself: the layer rule (tools/) and docs/architecture.md."""

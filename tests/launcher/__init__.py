"""Tests of launcher."""

"""Tests of definitions."""

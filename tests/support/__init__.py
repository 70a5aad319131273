"""Helpers shared by the tests (not tests themselves): the one place to import them from."""

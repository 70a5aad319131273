"""The declarative spec: pydantic models, the located loader, cross-checks."""

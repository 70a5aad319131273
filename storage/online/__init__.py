"""The SQL online store (SQLite embedded, PostgreSQL at scale)."""

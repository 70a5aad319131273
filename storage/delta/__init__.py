"""Delta Lake tables: store, schemas, maintenance, erasure, locks."""

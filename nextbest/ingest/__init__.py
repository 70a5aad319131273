"""One ingest path: the event model, validation and pseudonymization, consent rules."""

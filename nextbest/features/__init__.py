"""Feature semantics shared by stream and batch: windows and per-entity folds."""

"""The command line's store-facing parts (status, doctor, keys): above every layer,
imported by `launcher.cli` inside its command functions only (DESIGN.md)."""

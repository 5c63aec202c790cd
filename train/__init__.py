"""Training loop and per-task entry points."""

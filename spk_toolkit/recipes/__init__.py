"""Corpus preparation recipes (kept apart from the core, as lhotse does)."""

"""Corpus, audio, trial and embedding I/O."""

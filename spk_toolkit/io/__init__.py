"""Corpus, audio, trial and storage I/O.

Storage (:mod:`spk_toolkit.io.storage`): Writer/Reader pairs by name (``npz``, ``kaldi_ark``, ``hdf5``,
``npy_dir``); atomic commits (:mod:`spk_toolkit.io.atomic`); :func:`spk_toolkit.io.readers.load_embeddings`
for a plain dict of embeddings.
"""

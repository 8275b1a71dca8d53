"""Speaker embeddings for ESPnet TTS recipes on the engine: ESPnet2's ``tts.sh`` stage 3 and ESPnet3's x-vector runner.

ESPnet2 (``egs2/TEMPLATE/tts1/pyscripts/utils/extract_spk_embed.py in_folder out_folder``) writes, per data dir::

    out_folder/<tag>.ark, <tag>.scp          one embedding (D,) float32 per utterance, in the key order of
                                              in_folder/text (ESPnet's iterable loader reads the scp and text
                                              line by line and refuses another order: "Keys are mismatched")
    out_folder/spk_<tag>.ark, spk_<tag>.scp  one speaker mean (D,) float32 per speaker, in spk2utt order

:func:`extract_tts_embeddings` writes exactly these, from one run of :func:`spk_toolkit.engine.extract` in
``out_folder`` (whose ``plan.json``, ``shards/``, ``embeddings.npz``, ``errors.tsv`` and ``summary.json`` make the
run resumable and the errors visible): the corpus is handed to the engine as records in ``text`` order, so the
engine's input order is ``text`` order; the speaker means are :func:`spk_toolkit.scoring.speaker_means` of the
stored utterance embeddings. An utterance listed in ``text`` that has no embedding (its audio failed, or it is
missing from ``wav.scp``) is an error: ESPnet's loader would fail on it later, so nothing is exported and the
message names the utterances and ``errors.tsv``.

scp entries name the ark the way ESPnet's own script does (``scp_paths="espnet"``): ``<out_folder>/<tag>.ark:<offset>``
with ``out_folder`` exactly as given, so a relative ``out_folder`` (``tts.sh`` passes ``dump/xvector/<dset>``)
gives entries relative to the working directory, which resolve where ESPnet reads them (the recipe directory);
``scp_paths="absolute"`` writes absolute paths, readable from anywhere. spk_toolkit's own Kaldi reader resolves a
relative entry against the scp's directory and its parents first, then the working directory
(:class:`spk_toolkit.io.storage.KaldiArkReader`).

ESPnet3 (``training_config.yaml``'s ``xvector:`` block, :func:`read_espnet3_xvector_config`,
:func:`extract_espnet3_xvectors`): every split's manifest TSV is one engine run; each split gets the files above
and, optionally, ESPnet3's layout ``{save_path}/{spk_embed_tag}/{split}/{utt_id}.pt`` (:func:`write_pt_layout`).

Tools for existing dumps: :func:`check_scp_order` (``check_spk_embed_scp``) and :func:`convert_to_average`
(``convert_to_avg_spk_embed``).
"""
from __future__ import annotations

from spk_toolkit.tts.export import (  # noqa: F401
    SCP_PATHS, SPK_MEANS, TTSCorpus, TTSExport, TTSExportError, check_tag, export_tts, pt_path, remove_tts_outputs, tts_output_paths, write_pt_layout)
from spk_toolkit.tts.espnet2 import (  # noqa: F401
    default_options_of, extract_tts_embeddings, load_tts_corpus, read_keys)
from spk_toolkit.io.scp import read_scp_entries  # noqa: F401  (the one scp reader, spk_toolkit.io.scp)
from spk_toolkit.tts.espnet3 import (  # noqa: F401
    XVECTOR_KEYS, XVectorConfig, extract_espnet3_xvectors, load_manifest_corpus, read_espnet3_xvector_config, resolve_interpolations)
from spk_toolkit.tts.scp import (  # noqa: F401
    ScpReport, check_scp_order, convert_to_average, find_text_for)

__all__ = [
    "SCP_PATHS",
    "SPK_MEANS",
    "ScpReport",
    "TTSCorpus",
    "TTSExport",
    "TTSExportError",
    "XVECTOR_KEYS",
    "XVectorConfig",
    "check_scp_order",
    "check_tag",
    "convert_to_average",
    "default_options_of",
    "export_tts",
    "extract_espnet3_xvectors",
    "extract_tts_embeddings",
    "find_text_for",
    "load_manifest_corpus",
    "load_tts_corpus",
    "pt_path",
    "read_espnet3_xvector_config",
    "read_keys",
    "read_scp_entries",
    "remove_tts_outputs",
    "resolve_interpolations",
    "tts_output_paths",
    "write_pt_layout",
]

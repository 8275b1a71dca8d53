"""The run summary's human form (spk_toolkit.engine.merge.format_summary): speaker embeddings are "embedded",
a feature extractor's outputs are "computed", in the words of what the run made."""
from __future__ import annotations

from spk_toolkit.engine.merge import format_summary


def _summary(kinds: dict, dim: int, toolkit: str) -> dict:
    return {"utterances": 10, "embedded": 9, "errors": 1, "speakers": 2, "audio_hours": 0.01, "embedding_dim": dim,
            "model": {"toolkit": toolkit}, "kinds": kinds, "shards": 2, "shards_resumed": 1, "shards_run": 1,
            "computed_utterances": 4, "computed_audio_seconds": 12.0, "wall_seconds": 3.0,
            "throughput_x_realtime": 4.0, "utterances_per_second": 1.3, "executor": "in-process",
            "outputs": {"npz": "o/embeddings.npz", "errors": "o/errors.tsv"}}


def test_a_speaker_model_run_reports_embeddings():
    text = format_summary(_summary({"embedding": {"kind": "vector", "dtype": "float32", "shape": [256]}}, 256,
                                   "resemblyzer"))
    assert "utterances : 10 (9 embedded, 1 errors, see o/errors.tsv)" in text
    assert "this run   : 4 embedded" in text and "model      : resemblyzer (dim 256)" in text
    assert "computed" not in text


def test_a_feature_run_reports_features_not_embeddings():
    s = _summary({"fbank": {"kind": "sequence", "dtype": "float16", "shape": [80]}}, 0, "fbank")
    text = format_summary(s)
    assert "utterances : 10 (9 with features computed, 1 errors, see o/errors.tsv)" in text
    assert "this run   : 4 computed" in text and "model      : fbank (fbank: sequence float16 (T', 80))" in text
    assert "embed" not in text.replace("embeddings.npz", "")
    s.update(computed_utterances=0, computed_audio_seconds=0.0)
    assert "nothing left to compute" in format_summary(s)

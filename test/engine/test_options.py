"""Unit tests of spk_toolkit.engine.options: the one error policy (--on_error / --max_errors) and the validation of
ExtractOptions fields."""
from __future__ import annotations

import math

import pytest

from spk_toolkit.engine.options import ErrorPolicy, ExtractionError, ExtractOptions


def rec(k: int):
    """The k-th failed utterance record (utt_id, path, reason)."""
    return (f"utt{k}", f"/data/utt{k}.wav", f"reason {k}")


# -------------------------------------------------------------------------------------------------- ErrorPolicy
def test_skip_without_limit_never_raises():
    """on_error=skip, max_errors=-1: any number of errors is counted and warned about, never raised."""
    warned = []
    p = ErrorPolicy("skip", -1, warn=warned.append)
    for k in range(500):
        p.record(rec(k))
    p.check()
    assert p.count == 500 and p.first == rec(0)
    assert warned == [rec(k) for k in range(500)]


@pytest.mark.parametrize("limit", [0, 1, 3])
def test_max_errors_raises_on_error_n_plus_one(limit):
    """max_errors=N: errors 1..N pass, error N+1 raises naming the count, the limit and the first failure."""
    p = ErrorPolicy("skip", limit)
    for k in range(limit):
        p.record(rec(k))
    assert p.count == limit
    with pytest.raises(ExtractionError) as e:
        p.record(rec(limit))
    msg = str(e.value)
    assert f"{limit + 1} utterance(s) failed" in msg and f"--max_errors {limit}" in msg
    assert "'utt0'" in msg and "/data/utt0.wav" in msg and "reason 0" in msg  # the first, not the last
    assert p.count == limit + 1


def test_raise_policy_raises_at_first_error_without_warning():
    """on_error=raise: the first record raises, naming that utterance, its path and the reason; no warning."""
    warned = []
    p = ErrorPolicy("raise", -1, warn=warned.append)
    with pytest.raises(ExtractionError) as e:
        p.record(("a/b", "/x/y.flac", "corrupt header"))
    assert str(e.value) == "utterance 'a/b' (/x/y.flac): corrupt header"
    assert warned == [] and p.count == 1 and p.first == ("a/b", "/x/y.flac", "corrupt header")


def test_raise_now_overrides_on_error():
    """raise_now=False counts without raising under on_error=raise; raise_now=True raises under skip."""
    p = ErrorPolicy("raise", 2)
    p.record(rec(0), raise_now=False)
    p.record(rec(1), raise_now=False)
    assert p.count == 2
    with pytest.raises(ExtractionError, match="more than --max_errors 2"):
        p.record(rec(2), raise_now=False)  # the limit still applies
    q = ErrorPolicy("skip", -1)
    with pytest.raises(ExtractionError, match=r"^utterance 'utt5' \(/data/utt5\.wav\): reason 5$"):
        q.record(rec(5), raise_now=True)


def test_record_many_in_order_and_stops_at_limit():
    """record_many records in order (lists accepted) and raises at the (N+1)-th, naming the list's first."""
    p = ErrorPolicy("skip", 2)
    with pytest.raises(ExtractionError, match=r"3 utterance\(s\) failed.*first: 'utt7'"):
        p.record_many([list(rec(7)), list(rec(8)), list(rec(9)), list(rec(10))])
    assert p.count == 3 and p.first == rec(7)
    assert isinstance(p.first, tuple)
    q = ErrorPolicy("skip", -1)
    q.record_many([])
    assert q.count == 0 and q.first is None


def test_record_many_accumulates_across_calls():
    """The limit is on the total over calls: 2 + 2 errors against max_errors=3 raise during the second call."""
    p = ErrorPolicy("skip", 3)
    p.record_many([rec(0), rec(1)])
    with pytest.raises(ExtractionError, match=r"4 utterance\(s\) failed, more than --max_errors 3 \(first: 'utt0'"):
        p.record_many([rec(2), rec(3)])


def test_check_alone():
    """check() passes with no errors or within the limit, and raises once the count exceeds it."""
    ErrorPolicy("skip", 0).check()
    p = ErrorPolicy("skip", 5)
    for k in range(5):
        p.record(rec(k))
    p.check()
    p.count = 6  # what a driver-side tally past the limit looks like
    with pytest.raises(ExtractionError, match="6 utterance"):
        p.check()
    ErrorPolicy("skip", -1).check()


# ------------------------------------------------------------------------------------------- ExtractOptions
@pytest.mark.parametrize("name,value", [
    ("on_error", "ignore"),
    ("batch_bins", 0),
    ("batch_bins", 1.5),
    ("batch_bins", True),
    ("num_workers", -1),
    ("max_errors", -2),
    ("model_streams", 0),
    ("crops", -1),
    ("max_batch_size", -1),
    ("min_duration", -0.1),
    ("shard_duration", 0.0),
    ("shard_duration", math.inf),
    ("crop_duration", math.nan),
    ("lock_timeout", -0.5),
    ("segment_overrun", "pad"),
    ("header_timeout", 0),
    ("pipe_timeout", "soon"),
    ("max_chunk_duration", -1.0),
])
def test_bad_option_raises_naming_it(name, value):
    """An out-of-range value is a ValueError whose message names the option."""
    with pytest.raises(ValueError, match=name):
        ExtractOptions(**{name: value})
    with pytest.raises(ValueError, match=name):
        ExtractOptions.check(name, value)


@pytest.mark.parametrize("name,value", [
    ("batch_bins", 1), ("num_workers", 0), ("max_errors", -1), ("min_duration", 0.0), ("lock_timeout", -1),
    ("lock_timeout", 0), ("segment_overrun", "clip"), ("on_error", "raise"), ("max_chunk_duration", 0.0),
])
def test_boundary_values_accepted(name, value):
    """The documented boundary values are accepted and stored as given."""
    assert getattr(ExtractOptions(**{name: value}), name) == value
    assert ExtractOptions.check(name, value) == value


def test_check_unknown_option():
    """ExtractOptions.check on a name that is no field raises, naming it."""
    with pytest.raises(ValueError, match="'batch_size' is not an extraction option"):
        ExtractOptions.check("batch_size", 4)


def test_chunks_and_crops_cannot_combine():
    """max_chunk_duration together with crops is refused, naming both."""
    with pytest.raises(ValueError, match="max_chunk_duration and crops"):
        ExtractOptions(crops=2, max_chunk_duration=5.0)


def test_output_affecting_leaves_out_batching():
    """output_affecting holds what changes stored values (crops, chunks), not batching or workers."""
    base = ExtractOptions(num_workers=0).output_affecting()
    assert ExtractOptions(batch_bins=123, num_workers=3, model_streams=2, torch_threads=1).output_affecting() == base
    assert base == {"min_duration": 0.1, "allow_pipes": False}
    assert ExtractOptions(crops=4, crop_duration=2.0).output_affecting() == {
        **base, "crops": 4, "crop_duration": 2.0, "average_crops": True}
    assert ExtractOptions(max_chunk_duration=30).output_affecting() == {**base, "max_chunk_duration": 30.0}

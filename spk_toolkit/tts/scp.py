"""Tools for existing TTS dumps: :func:`check_scp_order` (``check_spk_embed_scp``) and :func:`convert_to_average`
(``convert_to_avg_spk_embed``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from spk_toolkit.io.scp import read_scp_entries
from spk_toolkit.tts.espnet2 import read_keys

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ScpReport:
    """How one ``<tag>.scp`` compares with its data dir's ``text``.

    Attributes
    ----------
    scp, text : Path
    n_text, n_scp : int
        Keys in each.
    missing : list of str
        In ``text``, not in the scp (cannot be fixed here: extract them).
    extra : list of str
        In the scp, not in ``text`` (dropped by ``--fix``).
    out_of_order : int
        Positions where the common keys differ in order.
    first_mismatch : tuple or None
        ``(line, text key, scp key)`` of the first difference of the common keys (1-based line of ``text``).
    fixed : bool
        The scp was rewritten in ``text`` order.
    """

    scp: Path
    text: Path
    n_text: int
    n_scp: int
    missing: List[str]
    extra: List[str]
    out_of_order: int
    first_mismatch: Optional[tuple]
    fixed: bool = False

    @property
    def ok(self) -> bool:
        """True when the scp has exactly ``text``'s keys in ``text``'s order."""
        return not self.missing and not self.extra and not self.out_of_order

    def format(self) -> str:
        """A short human report (one line when aligned)."""
        head = f"{self.scp}: {self.n_scp} entries vs {self.n_text} in {self.text}"
        if self.ok:
            return head + ": aligned"
        lines = [head + ":"]
        if self.missing:
            lines.append(f"  missing {len(self.missing)} (in text, not in the scp), e.g. {self.missing[:5]}")
        if self.extra:
            lines.append(f"  extra   {len(self.extra)} (in the scp, not in text), e.g. {self.extra[:5]}")
        if self.out_of_order:
            ln, a, b = self.first_mismatch
            lines.append(f"  out of order at {self.out_of_order} position(s); first at text line {ln}: "
                         f"text {a!r}, scp {b!r}")
        if self.fixed:
            lines.append("  fixed: rewritten in text order" + (" without the extra entries" if self.extra else "")
                         + (f"; {len(self.missing)} still missing" if self.missing else ""))
        return "\n".join(lines)


def find_text_for(scp: Path, dumpdir: Path, tag: str) -> Optional[Path]:
    """The ``text`` a ``dumpdir/<tag>/<dset>/<tag>.scp`` must match.

    Parameters
    ----------
    scp : Path
        ``dumpdir/<tag>/<dset>/<tag>.scp``.
    dumpdir : Path
    tag : str

    Returns
    -------
    Path or None
        ``dumpdir/raw/<dset>/text`` (what ``tts.sh`` trains on after stage 4, which filters the scp with
        ``utils/filter_scp.pl``), else ``dumpdir/raw/org/<dset>/text`` (stage 3's), else a ``text`` next to the
        scp; None when none exists. Source: ESPnet ``egs2/TEMPLATE/tts1/tts.sh`` stages 3-4 and PR #6227's
        ``scripts/utils/sort_spk_embed_scp.sh``.
    """
    dset = scp.parent.name
    for cand in (dumpdir / "raw" / dset / "text", dumpdir / "raw" / "org" / dset / "text", scp.parent / "text"):
        if cand.is_file():
            return cand
    return None


def check_scp_order(scp: str | os.PathLike, text: str | os.PathLike, fix: bool = False) -> ScpReport:
    """Compare an scp's keys with ``text`` (missing, extra, out of order); with ``fix`` rewrite it in ``text`` order.

    ``fix`` keeps every entry's value as it is (relative ark paths included), drops the extra keys and
    writes atomically, keeping the original as ``<scp>.orig`` (``.bak`` is what ``tts.sh`` stage 4 writes).

    Parameters
    ----------
    scp, text : path
    fix : bool

    Returns
    -------
    ScpReport

    Raises
    ------
    CorpusError
        A key twice in ``text`` or in the scp (named).
    """
    from spk_toolkit.io.atomic import atomic_write_text

    scp, text = Path(scp), Path(text)
    tkeys = read_keys(text)
    rows = read_scp_entries(scp)
    entries: Dict[str, str] = dict(rows)
    order: List[str] = [k for k, _ in rows]
    tset = set(tkeys)
    missing = [k for k in tkeys if k not in entries]
    extra = [k for k in order if k not in tset]
    common_t = [k for k in tkeys if k in entries]
    common_s = [k for k in order if k in tset]
    line_of = {k: i for i, k in enumerate(tkeys, 1)}
    diffs = [(line_of[a], a, b) for a, b in zip(common_t, common_s) if a != b]
    rep = ScpReport(scp, text, len(tkeys), len(order), missing, extra, len(diffs), diffs[0] if diffs else None)
    if fix and (extra or diffs):
        import shutil

        shutil.copyfile(scp, scp.with_name(scp.name + ".orig"))
        atomic_write_text(scp, "".join(f"{k} {entries[k]}\n" for k in common_t))
        rep.fixed = True
    return rep


def convert_to_average(utt_embed_path: str | os.PathLike, spk_embed_path: str | os.PathLike,
                       spk_id: Optional[str] = None, utt2spk: Optional[str | os.PathLike] = None) -> Tuple[Path, int]:
    """Point every utterance of an scp at a speaker mean (ESPnet's ``convert_to_avg_spk_embed.py``, fixed).

    With ``spk_id`` every utterance gets that speaker's entry; with ``utt2spk`` each utterance gets its own
    speaker's (ESPnet's script raises ``KeyError: None`` here). The original scp is kept as
    ``<dir>/<name>.bak`` (ESPnet's intended name; its script writes a file literally called
    ``os.path.filename(utt_embed_path).bak``); ark files are untouched; the scp is rewritten atomically in its
    own order.

    Parameters
    ----------
    utt_embed_path : path
        ``dump/<tag>/<dset>/<tag>.scp``.
    spk_embed_path : path
        ``dump/<tag>/<dset>/spk_<tag>.scp``.
    spk_id : str, optional
    utt2spk : path, optional
        Exactly one of ``spk_id`` and ``utt2spk``.

    Returns
    -------
    (Path, int)
        The backup file and the number of utterances rewritten.

    Raises
    ------
    FileNotFoundError
        A given file does not exist (named).
    ValueError
        Neither or both of ``spk_id`` / ``utt2spk``; ``spk_id`` not in the speaker scp; utterances without a
        speaker in ``utt2spk`` or speakers without a mean (counts and examples); malformed lines.
    """
    import shutil

    from spk_toolkit.io.atomic import atomic_write_text
    from spk_toolkit.io.datadir import read_utt2spk

    if (spk_id is None) == (utt2spk is None):
        raise ValueError("give exactly one of --spk-id and --utt2spk")
    for p, flag in ((utt_embed_path, "--utt-embed-path"), (spk_embed_path, "--spk-embed-path"),
                    (utt2spk, "--utt2spk")):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"{flag} {p} does not exist")

    spk_rows = dict(read_scp_entries(spk_embed_path))
    utt_rows = read_scp_entries(utt_embed_path)
    if spk_id is not None:
        if spk_id not in spk_rows:
            raise ValueError(f"--spk-id {spk_id!r} is not in {spk_embed_path}")
        new = [(u, spk_rows[spk_id]) for u, _ in utt_rows]
    else:
        u2s = read_utt2spk(utt2spk)
        nospk = [u for u, _ in utt_rows if u not in u2s]
        if nospk:
            raise ValueError(f"{len(nospk)} utterance(s) of {utt_embed_path} are not in {utt2spk}, e.g. {nospk[:5]}")
        nomean = sorted({u2s[u] for u, _ in utt_rows if u2s[u] not in spk_rows})
        if nomean:
            raise ValueError(f"{len(nomean)} speaker(s) have no mean in {spk_embed_path}, e.g. {nomean[:5]}")
        new = [(u, spk_rows[u2s[u]]) for u, _ in utt_rows]
    p = Path(utt_embed_path)
    bak = p.with_name(p.name + ".bak")
    shutil.copyfile(p, bak)
    atomic_write_text(p, "".join(f"{u} {v}\n" for u, v in new))
    return bak, len(new)

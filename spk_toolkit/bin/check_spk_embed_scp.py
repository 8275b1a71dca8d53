"""Check that every ``<tag>.scp`` of an ESPnet dump matches its data dir's ``text`` (keys and order); ``--fix`` it.

What ESPnet's ``scripts/utils/sort_spk_embed_scp.sh`` (PR #6227) does, with a report instead of a silent sort::

    python -m spk_toolkit.bin.check_spk_embed_scp dump xvector          # report; exit 1 if any scp is off
    python -m spk_toolkit.bin.check_spk_embed_scp dump xvector --fix    # rewrite in text order (extra keys dropped)

Each ``<dumpdir>/<tag>/<dset>/<tag>.scp`` is compared with ``<dumpdir>/raw/<dset>/text`` (what ``tts.sh`` trains
on), else ``<dumpdir>/raw/org/<dset>/text``, else a ``text`` next to the scp; ``--text`` names one explicitly (then
``dumpdir`` may be the scp itself). Reported per scp: entries missing (in ``text``, not in the scp: extract them),
extra (dropped by ``--fix``), out of order (first position named). ``--fix`` keeps every entry's value, writes
atomically and keeps the original as ``<tag>.scp.orig``; it never touches ``text`` (ESPnet's script re-sorts the
data files too). Exit status: 0 all aligned (after ``--fix``: nothing missing), 1 not aligned, 2 usage error.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

PROG = "check_spk_embed_scp"
logger = logging.getLogger(PROG)


def get_parser() -> argparse.ArgumentParser:
    """The argparse parser (``dumpdir tag [--fix] [--text FILE]``)."""
    from spk_toolkit.bin.cli import add_verbosity, str2bool

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dumpdir", help="ESPnet dump dir (holding <tag>/<dset>/<tag>.scp and raw/), or one scp with --text")
    p.add_argument("tag", help="speaker-embedding tag (--spk_embed_tag)")
    p.add_argument("--fix", type=str2bool, nargs="?", const=True, default=False,
                   help="rewrite each scp in text order, without extra keys")
    p.add_argument("--text", default=None, help="compare with this text file (default: found per data set)")
    add_verbosity(p)
    return p


def find_scps(dumpdir: Path, tag: str) -> List[Path]:
    """``dumpdir/<tag>/*/<tag>.scp`` (sorted), or ``[dumpdir]`` when it is an scp file itself."""
    if dumpdir.is_file():
        return [dumpdir]
    return sorted((dumpdir / tag).glob(f"*/{tag}.scp"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (0 aligned, 1 not, 2 usage error)."""
    from spk_toolkit.bin.cli import parse_args, run_cli, setup_logging

    args = parse_args(get_parser(), argv)
    setup_logging(args.verbose, args.quiet)

    def body() -> int:
        from spk_toolkit.tts import check_scp_order, find_text_for

        dump = Path(args.dumpdir)
        if not dump.exists():
            raise FileNotFoundError(f"{dump} does not exist")
        scps = find_scps(dump, args.tag)
        if not scps:
            raise ValueError(f"no {args.tag}.scp under {dump / args.tag}/*/")
        bad = 0
        for scp in scps:
            text = Path(args.text) if args.text else find_text_for(scp, dump, args.tag)
            if text is None:
                print(f"{scp}: no text found (looked in {dump}/raw/{scp.parent.name}, {dump}/raw/org/"
                      f"{scp.parent.name}, {scp.parent}); pass --text", file=sys.stderr)
                bad += 1
                continue
            rep = check_scp_order(scp, text, fix=args.fix)
            print(rep.format())
            if not rep.ok and not (rep.fixed and not rep.missing):
                bad += 1
        return 1 if bad else 0

    return run_cli(PROG, body, args.verbose)


if __name__ == "__main__":
    sys.exit(main())

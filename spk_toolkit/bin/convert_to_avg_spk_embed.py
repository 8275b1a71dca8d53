"""Point every utterance of a speaker-embedding scp at a speaker mean (ESPnet's ``convert_to_avg_spk_embed.py``).

Same arguments as ESPnet's ``egs2/TEMPLATE/tts1/pyscripts/utils/convert_to_avg_spk_embed.py``::

    python -m spk_toolkit.bin.convert_to_avg_spk_embed --utt-embed-path dump/xvector/tr_no_dev/xvector.scp \\
        --spk-embed-path dump/xvector/tr_no_dev/spk_xvector.scp --utt2spk dump/raw/tr_no_dev/utt2spk
    python -m spk_toolkit.bin.convert_to_avg_spk_embed --utt-embed-path ... --spk-embed-path ... --spk-id SPK

with two bugs of ESPnet's script fixed: ``--utt2spk`` works (ESPnet's raises ``KeyError: None``: it never reads the
file), and the backup is ``<dir>/<name>.bak`` (ESPnet's is a file literally named
``os.path.filename(utt_embed_path).bak``). The scp keeps its order; ark files are untouched; every utterance must
have a speaker and every speaker a mean (errors name them, nothing is changed).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

PROG = "convert_to_avg_spk_embed"


def get_parser() -> argparse.ArgumentParser:
    """ESPnet's parser (``--utt-embed-path``, ``--spk-embed-path``, ``--spk-id`` | ``--utt2spk``); underscores work too."""
    from spk_toolkit.bin.cli import add_verbosity

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utt-embed-path", "--utt_embed_path", dest="utt_embed_path", required=True,
                   help="the <tag>.scp to rewrite")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--spk-id", "--spk_id", dest="spk_id", help="use this speaker's mean for every utterance")
    g.add_argument("--utt2spk", help="utt2spk: each utterance gets its own speaker's mean")
    p.add_argument("--spk-embed-path", "--spk_embed_path", dest="spk_embed_path", required=True,
                   help="the spk_<tag>.scp of the speakers")
    add_verbosity(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (0, or 2 for missing files / unknown speakers, named on stderr)."""
    from spk_toolkit.bin.cli import parse_args, run_cli, setup_logging

    args = parse_args(get_parser(), argv)
    setup_logging(args.verbose, args.quiet)

    def body() -> int:
        from spk_toolkit.tts import convert_to_average

        bak, n = convert_to_average(args.utt_embed_path, args.spk_embed_path, spk_id=args.spk_id, utt2spk=args.utt2spk)
        print(f"{args.utt_embed_path}: {n} utterances now point at speaker means "
              f"({'speaker ' + args.spk_id if args.spk_id else 'utt2spk ' + args.utt2spk}); original kept as {bak}")
        return 0

    return run_cli(PROG, body, args.verbose)


if __name__ == "__main__":
    sys.exit(main())

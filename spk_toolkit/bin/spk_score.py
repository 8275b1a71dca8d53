"""Score trial lists against embeddings: cosine / AS-norm / S-norm, EER, minDCF, Cllr, DET plots.

Example::

    python -m spk_toolkit.bin.spk_score --embeddings exp/emb/embeddings.npz \\
        --trials data/voxceleb1/veri_test2.txt --cohort exp/train_emb --asnorm_top_n 300 --output_dir exp/scores
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from spk_toolkit.bin.cli import add_verbosity, echo, number_type, open_run_log, parse_args, run_cli, setup_logging
from spk_toolkit.io.trials import TRIAL_FORMATS


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spk_score",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--embeddings", help="npz (ours or ESPnet, (n_crops, D) averaged), Kaldi .scp/.ark, or an output dir")
    p.add_argument("--trials", nargs="+", help="trial lists (VoxCeleb, Kaldi, ESPnet dir/trial.scp, 2-column)")
    p.add_argument("--trials_format", default="auto", choices=("auto",) + TRIAL_FORMATS)
    p.add_argument("--trials_root", default=None, help="prefix stripped from trial keys (inferred when omitted)")
    p.add_argument("--output_dir", help="where score files, metrics.json and plots go")
    p.add_argument("--cohort", default=None, help="cohort embeddings for AS-norm / S-norm")
    p.add_argument("--cohort_utt2spk", default=None, help="average the cohort per speaker (Kaldi utt2spk)")
    p.add_argument("--cohort_spk2utt", default=None, help="average the cohort per speaker (Kaldi spk2utt)")
    p.add_argument("--asnorm_top_n", type=number_type(int, lo=0, what="0 = S-norm"), default=300,
                   help="AS-norm top-N cohort scores (an integer >= 1); 0 = S-norm (the whole cohort)")
    p.add_argument("--mean_embeddings", default=None, help="embeddings whose mean is subtracted before scoring")
    p.add_argument("--enroll_spk2utt", default=None, help="enrollment models: 'enroll_id utt1 utt2 ...' averaged")
    p.add_argument("--p_targets", default="0.01,0.05", type=p_targets_type,
                   help="comma-separated P_target values for minDCF, each in (0, 1)")
    p.add_argument("--eer_method", default="interp", choices=("interp", "rocch", "espnet"))
    p.add_argument("--cllr", action="store_true", help="also report Cllr, minCllr, actDCF (for LLR scores)")
    p.add_argument("--missing", default="error", choices=("error", "drop"), help="trials with unknown keys")
    p.add_argument("--duplicates", default="keep", choices=("keep", "drop"),
                   help="trials listed more than once (reported with a count and examples): keep or drop repeats")
    p.add_argument("--score_style", default="kaldi", choices=("kaldi", "espnet"))
    p.add_argument("--no_plots", action="store_true", help="skip the DET and histogram PNGs")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                   help="matrix precision; float32 is ~2x faster for AS-norm (scores within ~1e-5)")
    add_verbosity(p)
    return p


def p_targets_type(text: str) -> list:
    """argparse ``type`` of ``--p_targets``: a comma list of finite numbers strictly between 0 and 1.

    Parameters
    ----------
    text : str

    Returns
    -------
    list of float

    Raises
    ------
    argparse.ArgumentTypeError
        An empty list, a value that is not a number, not finite, or outside (0, 1).
    """
    if isinstance(text, (list, tuple)):
        text = ",".join(map(str, text))
    one = number_type(float, lo=0.0, hi=1.0, lo_open=True, hi_open=True, what="a prior probability")
    vals = [one(x) for x in str(text).split(",") if x.strip()]
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated P_target values in (0, 1), got {text!r}")
    return vals


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``spk_score``; returns an exit status of :data:`spk_toolkit.bin.cli.EXIT_CODES` (README, "Exit codes").

    Expected failures (a missing or malformed trial list or embedding file, unknown trial keys, a full disk)
    end in one line on stderr naming the file (the traceback with ``-v``).
    """
    parser = get_parser()
    args = parse_args(parser, argv)
    for req in ("embeddings", "trials", "output_dir"):
        if not getattr(args, req):
            parser.error(f"--{req} is required (on the command line or in --config)")
    import logging

    setup_logging(args.verbose, args.quiet)
    log = logging.getLogger("spk_score")
    return run_cli("spk_score", lambda: _run(args, argv, log), verbose=args.verbose, output_dir=args.output_dir)


def _run(args, argv, log) -> int:
    """The work of :func:`main`; failures raise (:func:`spk_toolkit.bin.cli.run_cli` maps them to exit codes)."""
    from spk_toolkit.scoring import format_table, score

    run_log = open_run_log(args.output_dir, "spk_score", argv)
    result = score(
        args.embeddings,
        args.trials,
        args.output_dir,
        trials_format=args.trials_format,
        trials_root=args.trials_root,
        cohort=args.cohort,
        cohort_utt2spk=args.cohort_utt2spk,
        cohort_spk2utt=args.cohort_spk2utt,
        asnorm_top_n=args.asnorm_top_n,
        mean_embeddings=args.mean_embeddings,
        enroll_spk2utt=args.enroll_spk2utt,
        p_targets=args.p_targets,
        eer_method=args.eer_method,
        cllr=args.cllr,
        missing=args.missing,
        score_style=args.score_style,
        plots=not args.no_plots,
        dtype=args.dtype,
        duplicates=args.duplicates,
        log=echo(log, args.quiet),
    )
    table = format_table(result)
    log.info("scores:\n%s", table)
    if not args.quiet:
        print(table)
    plots = not args.no_plots and "plots_skipped" not in result
    print(f"outputs: {args.output_dir} (metrics.json, *.score" + (", *_det.png, *_hist.png" if plots else "") + ")"
          + (f"; log: {run_log}" if run_log and not args.quiet else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

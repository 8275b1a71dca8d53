"""Score trial lists against embeddings: cosine / AS-norm / S-norm, EER, minDCF, Cllr, DET plots.

Example::

    python -m spk_toolkit.bin.spk_score --embeddings exp/emb/embeddings.npz \\
        --trials data/voxceleb1/veri_test2.txt --cohort exp/train_emb --asnorm_top_n 300 --output_dir exp/scores
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from spk_toolkit.bin.cli import parse_args
from spk_toolkit.io.trials import TRIAL_FORMATS, MissingKeysError


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
    p.add_argument("--asnorm_top_n", type=int, default=300, help="AS-norm top-N; <= 0 means S-norm (whole cohort)")
    p.add_argument("--mean_embeddings", default=None, help="embeddings whose mean is subtracted before scoring")
    p.add_argument("--enroll_spk2utt", default=None, help="enrollment models: 'enroll_id utt1 utt2 ...' averaged")
    p.add_argument("--p_targets", default="0.01,0.05", help="comma-separated P_target values for minDCF")
    p.add_argument("--eer_method", default="interp", choices=("interp", "rocch", "espnet"))
    p.add_argument("--cllr", action="store_true", help="also report Cllr, minCllr, actDCF (for LLR scores)")
    p.add_argument("--missing", default="error", choices=("error", "drop"), help="trials with unknown keys")
    p.add_argument("--score_style", default="kaldi", choices=("kaldi", "espnet"))
    p.add_argument("--no_plots", action="store_true", help="skip the DET and histogram PNGs")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                   help="matrix precision; float32 is ~2x faster for AS-norm (scores within ~1e-5)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_parser()
    args = parse_args(parser, argv)
    for req in ("embeddings", "trials", "output_dir"):
        if not getattr(args, req):
            parser.error(f"--{req} is required (on the command line or in --config)")
    try:
        p_targets = [float(x) for x in str(args.p_targets).split(",") if x.strip()]
    except ValueError:
        parser.error(f"--p_targets must be comma-separated floats, got {args.p_targets!r}")
    from spk_toolkit.scoring import format_table, score

    try:
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
            p_targets=p_targets,
            eer_method=args.eer_method,
            cllr=args.cllr,
            missing=args.missing,
            score_style=args.score_style,
            plots=not args.no_plots,
            dtype=args.dtype,
        )
    except (MissingKeysError, ValueError, FileNotFoundError) as e:
        print(f"spk_score: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"outputs: {args.output_dir} (metrics.json, *.score" + ("" if args.no_plots else ", *_det.png, *_hist.png") + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())

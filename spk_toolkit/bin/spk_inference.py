"""Extract one speaker embedding per utterance of a corpus; optionally score a trial list.

Example::

    python -m spk_toolkit.bin.spk_inference --data_dir data/fillets --output_dir exp/fillets \\
        --trials data/fillets_trials.txt
    torchrun --nproc_per_node=2 -m spk_toolkit.bin.spk_inference --data_dir D --output_dir O
"""
from __future__ import annotations

import os

# Decoding workers and the model's OpenMP threads share the CPU cores; spinning OpenMP threads then stall the
# model whenever a worker runs (measured on 2 cores: pipeline/forward throughput 0.77 -> 0.91). Must be set
# before torch is imported; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json
import sys  # noqa: E402

import logging  # noqa: E402

from spk_toolkit.bin.cli import (  # noqa: F401  (choose_executor: re-exported under its former home)
    add_extraction_options,
    choose_executor,
    echo,
    extraction_options,
    open_run_log,
    option_type,
    parse_args,
    registry_help,
    resolve_config,
    run_cli,
    setup_logging,
    str2bool,
)


def _backend_names() -> list:
    from spk_toolkit.backends.base import available_backends

    return available_backends()


def get_parser() -> argparse.ArgumentParser:
    """The argparse parser; option defaults come from :class:`spk_toolkit.engine.ExtractOptions`."""
    from spk_toolkit.engine import ExtractOptions

    d = ExtractOptions()
    p = argparse.ArgumentParser(prog="spk_inference", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="Kaldi data dir, ESPnet3 manifest .tsv, or audio tree root")
    p.add_argument("--output_dir", required=True)
    registry_help(p.add_argument("--toolkit", default="resemblyzer",
                                 help="backend: resemblyzer (offline default), espnet, or another registered one"),
                  _backend_names)
    p.add_argument("--model", default=None,
                   help="the model by name, for any backend (instead of --toolkit and its files): a registry name "
                        "(resemblyzer, espnet, ...), espnet:<model_tag>, a packed ESPnet model (.zip / .tar.gz in "
                        "espnet_model_zoo's layout), an unpacked model or experiment directory, or its config.yaml")
    p.add_argument("--train_config", help="espnet: config.yaml of an ESPnet spk exp dir")
    p.add_argument("--model_file", help="espnet: *.pth checkpoint")
    p.add_argument("--model_tag", help="espnet: espnet_model_zoo tag (needs espnet_model_zoo and its cache)")
    add_extraction_options(p, output_format="npz")  # batching, storage, error policy, resume, lock, executor
    p.add_argument("--crops", type=option_type("crops", int), default=d.crops,
                   help="0 = whole utterances; N = ESPnet's N deterministic evaluation crops, averaged")
    p.add_argument("--crop_duration", type=option_type("crop_duration"), default=d.crop_duration,
                   help="seconds per crop")
    p.add_argument("--average_crops", type=str2bool, default=d.average_crops,
                   help="with --crops: store the crop mean (D,) or every crop (N, D)")
    p.add_argument("--trials", nargs="+", default=None, help="trial list(s) to score (any supported format)")
    from spk_toolkit.io.trials import TRIAL_FORMATS

    p.add_argument("--trials_format", default="auto", choices=("auto",) + tuple(TRIAL_FORMATS),
                   help="trial list format (auto-detected by default)")
    return p


def main(argv=None) -> int:
    """Run the CLI; returns an exit status of :data:`spk_toolkit.bin.cli.EXIT_CODES` (README, "Exit codes").

    Expected failures (a bad corpus or option, too many bad utterances, a full disk, Ctrl-C) end in one line on
    stderr naming the utterance, file or option (the traceback with ``-v``).
    """
    args = parse_args(get_parser(), argv)
    setup_logging(args.verbose, args.quiet)
    return run_cli("spk_inference", lambda: _run(args, argv), verbose=args.verbose, output_dir=args.output_dir)


def _run(args, argv) -> int:
    """The work of :func:`main`; failures raise (:func:`spk_toolkit.bin.cli.run_cli` maps them to exit codes)."""
    log = logging.getLogger("spk_inference")
    run_log = open_run_log(args.output_dir, "spk_inference", argv) if os.environ.get("RANK", "0") == "0" else None
    args.parallel = resolve_config(args.parallel)
    import spk_toolkit

    toolkit, model_kwargs = args.toolkit, {"device": args.device}
    if args.model:  # one spelling for every backend (spk_toolkit.models)
        from spk_toolkit.models import resolve_model

        toolkit, model_kwargs = resolve_model(args.model, device=args.device)
    elif args.toolkit == "espnet":
        model_kwargs.update(train_config=args.train_config, model_file=args.model_file, model_tag=args.model_tag)
    executor = choose_executor(args.executor, args.parallel, "spk_inference")
    trials = None
    if args.trials:  # read and checked before the corpus is extracted: a bad trial list costs no extraction
        from spk_toolkit.io.trials import read_trials

        trials = [read_trials(t, args.trials_format) for t in args.trials]
    summary = spk_toolkit.extract_embeddings(
        args.data_dir, args.output_dir, toolkit=toolkit, model_kwargs=model_kwargs,
        executor=executor, parallel=args.parallel, **extraction_options(args),
        crops=args.crops, crop_duration=args.crop_duration, average_crops=args.average_crops,
    )
    if summary is None:  # a non-zero torchrun rank: rank 0 reports
        return 0
    from spk_toolkit.engine import format_summary

    text = format_summary(summary)
    log.info("summary:\n%s", text)
    if args.quiet:
        print(f"outputs    : {args.output_dir}")
    else:
        print(text)
    if args.trials:
        # The same library call as `spk_score` (score files, metrics.json, DET plot under output_dir/scores).
        from spk_toolkit.scoring import format_table, score

        # the run directory: its summary.json names the main output, read by the storage registry (any format)
        emb_path = args.output_dir
        # a trial list naming utterances without an embedding is an input error (exit 2, count and examples)
        from spk_toolkit.io.rundir import RunDir

        result = score(emb_path, trials, RunDir(args.output_dir).scores_dir, trials_format=args.trials_format,
                       log=echo(log, args.quiet))
        table = format_table(result)
        log.info("scores:\n%s", table)
        if not args.quiet:
            print(table)
            for name, e in result["trials"].items():
                for k in ("det_png", "hist_png"):
                    if k in e:
                        print(f"{k:<11}: {e[k]}")
        print(f"metrics    : {result['metrics_json']}")
    if run_log and not args.quiet:
        print(f"log        : {run_log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cache per-utterance features or tokens of a corpus (fbank, MFCC, hidden states, k-means tokens) on the engine.

Every executor, resume, lock, error policy and summary of ``spk_inference``; read the cache back with
``spk_toolkit.open_cache(output_dir)``.

Example::

    python -m spk_toolkit.bin.cache_features --config conf/cache_fbank.yaml \
        --data_dir data/fillets --output_dir exp/cache_fbank
    torchrun --nproc_per_node=2 -m spk_toolkit.bin.cache_features --config conf/cache_fbank.yaml --data_dir D \
        --output_dir O
    python -m spk_toolkit.bin.cache_features --extractor kmeans_tokens \
        --extractor_conf '{codebook: exp/kmeans/codebook.npy, features: fbank}' --data_dir D --output_dir O
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as spk_inference: decoding workers share the cores

import argparse  # noqa: E402
import sys  # noqa: E402

import logging  # noqa: E402

from spk_toolkit.bin.cli import (  # noqa: E402
    add_extraction_options,
    choose_executor,
    extraction_options,
    open_run_log,
    parse_args,
    registry_help,
    resolve_config,
    run_cli,
    setup_logging,
)


def yaml_mapping(value) -> dict:
    """argparse type: a YAML / JSON mapping given on the command line (a mapping from ``--config`` as is).

    Raises
    ------
    argparse.ArgumentTypeError
        Not valid YAML, or not a mapping.
    """
    if isinstance(value, dict):
        return value
    import yaml

    try:
        obj = yaml.safe_load(value) if value else {}
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not valid YAML: {' '.join(str(e).split())}") from None
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"expected a mapping like '{{num_mel_bins: 80}}', got {value!r}")
    return obj


def _extractor_names() -> list:
    from spk_toolkit.features import available_extractors

    return available_extractors()


def get_parser() -> argparse.ArgumentParser:
    """The argparse parser (run options shared with ``spk_inference``; the extractor name is checked against the
    registry when the run starts; ``--help`` lists the registered extractors, plug-ins included)."""
    p = argparse.ArgumentParser(prog="cache_features", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="Kaldi data dir, ESPnet3 manifest .tsv, or audio tree root")
    p.add_argument("--output_dir", required=True, help="the cache directory")
    registry_help(p.add_argument("--extractor", default="fbank", help="feature extractor"), _extractor_names)
    p.add_argument("--extractor_conf", type=yaml_mapping, default={},
                   help="extractor options as a YAML mapping, e.g. '{num_mel_bins: 80, frame_shift: 10}'")
    p.add_argument("--name", default=None, help="output name (file stem; default: the extractor's, e.g. fbank)")
    p.add_argument("--dtype", default=None,
                   help="stored dtype: float32 | float16 (features), int16 | int32 (tokens); default: extractor's")
    p.add_argument("--writer_conf", type=yaml_mapping, default={},
                   help="writer options per format, e.g. '{hdf5: {compression: lzf}}'")
    add_extraction_options(p, output_format="hdf5")
    return p


def main(argv=None) -> int:
    """Run the CLI; returns an exit status of :data:`spk_toolkit.bin.cli.EXIT_CODES` (README, "Exit codes").

    Expected failures (a bad corpus, option or extractor config, a cache of another extractor in
    ``--output_dir``, too many bad utterances, a full disk, Ctrl-C) end in one line on stderr (the traceback
    with ``-v``).
    """
    args = parse_args(get_parser(), argv)
    setup_logging(args.verbose, args.quiet)
    return run_cli("cache_features", lambda: _run(args, argv), verbose=args.verbose, output_dir=args.output_dir)


def _run(args, argv) -> int:
    """The work of :func:`main` (failures raise; :func:`spk_toolkit.bin.cli.run_cli` maps them to exit codes)."""
    log = logging.getLogger("cache_features")
    run_log = open_run_log(args.output_dir, "cache_features", argv) if os.environ.get("RANK", "0") == "0" else None
    args.parallel = resolve_config(args.parallel)
    import spk_toolkit

    from spk_toolkit.features import available_extractors

    if args.extractor not in available_extractors():
        raise ValueError(f"--extractor {args.extractor!r} is not a registered feature extractor; choose from "
                         f"{', '.join(available_extractors())}")
    conf = dict(args.extractor_conf or {})
    if args.name:
        conf["output"] = args.name
    if args.dtype:
        conf["dtype"] = args.dtype
    summary = spk_toolkit.cache_features(
        args.data_dir, args.output_dir, extractor=args.extractor, extractor_conf=conf,
        writer_options=args.writer_conf, executor=choose_executor(args.executor, args.parallel, "cache_features"),
        parallel=args.parallel, device=args.device, **extraction_options(args))
    if summary is None:  # a non-zero torchrun rank: rank 0 reports
        return 0
    from spk_toolkit.engine import format_summary

    lines = [format_summary(summary)]
    for name, files in summary.get("outputs_by_name", {}).items():
        kind = summary["kinds"].get(name, {})
        shape = "".join(f", {d}" for d in kind.get("shape", []))
        lines.append(f"{name:<11}: {kind.get('dtype')} (T'{shape}) -> " + ", ".join(files.values()))
    text = "\n".join(lines)
    log.info("summary:\n%s", text)
    print(f"outputs    : {args.output_dir}" if args.quiet else text)
    if run_log and not args.quiet:
        print(f"log        : {run_log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

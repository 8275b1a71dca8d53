"""Extract one speaker embedding per utterance of a corpus; optionally score a trial list.

Example::

    python -m spk_toolkit.bin.spk_inference --data_dir data/fillets --output_dir exp/fillets \
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

from spk_toolkit.bin.cli import parse_args, setup_logging, str2bool


def get_parser() -> argparse.ArgumentParser:
    """The argparse parser; option defaults come from :class:`spk_toolkit.engine.ExtractOptions`."""
    from spk_toolkit.engine import ExtractOptions
    from spk_toolkit.io.writers import WRITERS
    from spk_toolkit.parallel import executor_names

    d = ExtractOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="Kaldi data dir, ESPnet3 manifest .tsv, or audio tree root")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--toolkit", default="resemblyzer", help="backend: resemblyzer (offline default) or espnet")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (torchrun ranks use their local rank)")
    p.add_argument("--train_config", help="espnet: config.yaml of an ESPnet spk exp dir")
    p.add_argument("--model_file", help="espnet: *.pth checkpoint")
    p.add_argument("--model_tag", help="espnet: espnet_model_zoo tag (needs espnet_model_zoo and its cache)")
    p.add_argument("--batch_bins", type=int, default=d.batch_bins, help="padded samples per batch (B*T)")
    p.add_argument("--num_workers", type=int, default=d.num_workers, help="decoding DataLoader workers")
    p.add_argument("--output_format", default="npz", help=f"comma list of {sorted(WRITERS)} (aliases: ark, h5, npy)")
    p.add_argument("--on_error", choices=["skip", "raise"], default=d.on_error)
    p.add_argument("--max_errors", type=int, default=d.max_errors, help="-1 = no limit")
    p.add_argument("--min_duration", type=float, default=d.min_duration, help="seconds")
    p.add_argument("--allow_pipes", type=str2bool, default=False, help="run wav.scp 'cmd |' entries")
    p.add_argument("--shard_duration", type=float, default=d.shard_duration, help="seconds of audio per shard")
    p.add_argument("--torch_threads", type=int, default=0, help="model intra-op threads (0 = torch default)")
    p.add_argument("--model_streams", type=int, default=d.model_streams,
                   help="concurrent model forwards, each with torch_threads/model_streams threads (CPU: try 2)")
    p.add_argument("--crops", type=int, default=d.crops,
                   help="0 = whole utterances; N = ESPnet's N deterministic evaluation crops, averaged")
    p.add_argument("--crop_duration", type=float, default=d.crop_duration, help="seconds per crop")
    p.add_argument("--average_crops", type=str2bool, default=d.average_crops,
                   help="with --crops: store the crop mean (D,) or every crop (N, D)")
    p.add_argument("--overwrite", type=str2bool, default=False,
                   help="remove every output of a previous run in output_dir first")
    p.add_argument("--lock_timeout", type=float, default=d.lock_timeout,
                   help="seconds to wait for another run holding output_dir (0 = refuse, -1 = wait)")
    p.add_argument("--executor", default=None, choices=executor_names(),
                   help="inprocess (default), torchrun (chosen automatically under torchrun), dask (--parallel)")
    p.add_argument("--parallel", default=None,
                   help="Dask parallel config YAML (env: local|local_gpu|slurm|pbs|sge, n_workers, options)")
    p.add_argument("--trials", nargs="+", default=None, help="trial list(s) to score (any supported format)")
    p.add_argument("--trials_format", default="auto")
    p.add_argument("--progress", type=str2bool, default=True)
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def choose_executor(executor, parallel, prog: str) -> str:
    """The executor of a CLI run: as given, ``dask`` with ``--parallel``, ``torchrun`` when launched by torchrun.

    A torchrun launch (``RANK``/``WORLD_SIZE`` set) is detected here, explicitly, and logged; a malformed
    ``WORLD_SIZE`` is an error (raised as ValueError naming the variable), never a silent single process.
    """
    import logging

    from spk_toolkit.parallel import torchrun_launch

    launch = torchrun_launch()
    if executor is None and parallel is None and launch is not None and launch["world_size"] > 1:
        logging.getLogger(prog).info("torchrun launch detected (rank %d of %d, local rank %d): executor torchrun",
                                     launch["rank"], launch["world_size"], launch["local_rank"])
        return "torchrun"
    return executor or ("dask" if parallel else "inprocess")


def main(argv=None) -> int:
    """Run the CLI; returns the exit status (1 on corpus, extraction or scoring errors, named in stderr)."""
    args = parse_args(get_parser(), argv)
    setup_logging(args.verbose)
    import spk_toolkit

    model_kwargs = {"device": args.device}
    if args.toolkit == "espnet":
        model_kwargs.update(train_config=args.train_config, model_file=args.model_file, model_tag=args.model_tag)
    try:
        executor = choose_executor(args.executor, args.parallel, "spk_inference")
        summary = spk_toolkit.extract_embeddings(
            args.data_dir, args.output_dir, toolkit=args.toolkit, model_kwargs=model_kwargs,
            executor=executor, parallel=args.parallel,
            batch_bins=args.batch_bins, num_workers=args.num_workers, output_format=args.output_format,
            on_error=args.on_error, max_errors=args.max_errors, min_duration=args.min_duration,
            allow_pipes=args.allow_pipes, shard_duration=args.shard_duration, overwrite=args.overwrite,
            progress=args.progress, torch_threads=args.torch_threads, model_streams=args.model_streams,
            crops=args.crops, crop_duration=args.crop_duration, average_crops=args.average_crops,
            lock_timeout=args.lock_timeout,
        )
    except (spk_toolkit.ExtractionError, spk_toolkit.CorpusError, ValueError) as e:
        print(f"spk_inference: error: {e}", file=sys.stderr)
        return 1
    if summary is None:  # a non-zero torchrun rank: rank 0 reports
        return 0
    from spk_toolkit.engine import format_summary

    print(format_summary(summary))
    if args.trials:
        # The same library call as `spk_score` (score files, metrics.json, DET plot under output_dir/scores).
        from spk_toolkit.scoring import format_table, score

        # the run directory: its summary.json names the main output, read by the storage registry (any format)
        emb_path = args.output_dir
        try:
            result = score(emb_path, args.trials, f"{args.output_dir}/scores", trials_format=args.trials_format)
        except (ValueError, FileNotFoundError) as e:  # e.g. trials naming utterances that have no embedding
            print(f"spk_inference: error scoring {' '.join(args.trials)}: {e}", file=sys.stderr)
            return 1
        print(format_table(result))
        for name, e in result["trials"].items():
            for k in ("det_png", "hist_png"):
                if k in e:
                    print(f"{k:<11}: {e[k]}")
        print(f"metrics    : {result['metrics_json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

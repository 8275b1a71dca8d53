#!/usr/bin/env python3
"""Speaker-embedding extraction over ESPnet trial iterators, on spk_toolkit's ``SpkTrainer.extract_embed``.

Same options as ``python -m espnet2.bin.spk_embed_extract`` (``--spk_train_config``, ``--spk_model_file``,
``--data_path_and_name_and_type``, ``--shape_file``, ``--output_dir``, ``--valid_batch_size``,
``--target_duration``, ``--num_eval``, ``--average_embd``, ...), plus ``--shard_duration`` and
``--overwrite``. Differences from ESPnet's:

* the extraction runs on spk_toolkit's engine (:func:`spk_toolkit.engine.extract`): the unique utterances are
  read from the trial lists (``trial.scp`` / ``trial2.scp``) without decoding anything, split into shards of
  about ``--shard_duration`` seconds of audio, and each rank decodes and embeds only its own shards (ESPnet has
  every rank decode every trial), in batches of at most ``--valid_batch_size`` utterances per process (ESPnet
  divides by ``--ngpu``, which fails on CPU); ``--num_workers`` decoding workers per process;
* ESPnet's ``--num_eval`` evaluation crops of ``--target_duration`` seconds are the engine's deterministic
  ``crops`` (same start points, same wrapping of short utterances); ``--average_embd`` stores their mean;
* shards are committed atomically and a rerun reuses the verified ones (``kill -9`` loses at most the shards in
  flight; a changed model or crop setting is refused: use another ``--output_dir``); rank 0 verifies that
  every unique utterance is present exactly once, merges, and writes ``<output_dir>/<set>_embeddings.npz``
  (``np.savez_compressed``; ``<set>`` = the parent folder of the first data file, as ESPnet: the engine's
  ``output_stem``, so ``summary.json`` names it and ``spk_toolkit.load_embeddings(output_dir)``, a rerun and
  ``--overwrite`` know it), next to the engine's ``plan.json``, ``shards/``, ``errors.tsv`` and ``summary.json``;
* no L2 normalisation of any batch; runs on the CPU (``--ngpu 0``) or GPU.

Multi-process: ``torchrun --nproc_per_node=N -m spk_toolkit.bin.spk_embed_extract --dist_backend gloo ...``
(``nccl`` with ``--ngpu 1`` per process on GPUs).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def get_parser():
    """ESPnet's ``spk_embed_extract`` parser, plus ``--shard_duration`` (the engine's shard size) and
    ``--overwrite`` (start afresh instead of resuming)."""
    from espnet2.bin.spk_embed_extract import get_parser as espnet_parser

    parser = espnet_parser()
    from spk_toolkit.bin.cli import option_type

    parser.add_argument("--shard_duration", type=option_type("shard_duration"), default=600.0,
                        help="seconds of audio per shard of the engine (the unit of work of a rank and of resume)")
    from espnet2.utils.types import str2bool

    parser.add_argument("--overwrite", type=str2bool, default=False,
                        help="remove every output of a previous run in output_dir first (its <set>_embeddings.npz "
                             "included) instead of resuming")
    return parser


def run(args: argparse.Namespace) -> Path | None:
    """Build the model and the (unsharded) trial iterator, extract on the engine. Returns the output file on rank 0.

    Raises
    ------
    ValueError
        ``--valid_batch_size`` < 1 or ``--shard_duration`` <= 0 (before any work).
    spk_toolkit.engine.ExtractionError, spk_toolkit.train.spk_trainer.ValidationError
        From :meth:`SpkTrainer.extract_embed`.
    """
    import torch
    from espnet2.torch_utils.set_all_random_seed import set_all_random_seed
    from espnet2.train.distributed_utils import DistributedOption
    from espnet2.train.reporter import Reporter
    from espnet2.utils.build_dataclass import build_dataclass

    from spk_toolkit.io.rundir import RunDir
    from spk_toolkit.tasks.spk import SpeakerTask

    dopt = build_dataclass(DistributedOption, args)
    dopt.init_options()
    rank = dopt.dist_rank if dopt.distributed else 0
    logging.basicConfig(
        level=args.log_level if rank == 0 else "ERROR",
        format=f"[{os.uname()[1].split('.')[0]}:{rank}] %(asctime)s (%(module)s:%(lineno)d) %(levelname)s: "
        "%(message)s",
    )
    if args.valid_batch_size < 1:
        raise ValueError(f"--valid_batch_size must be >= 1, got {args.valid_batch_size}")
    if not args.shard_duration > 0:
        raise ValueError(f"--shard_duration must be > 0 s, got {args.shard_duration}")
    dopt.init_torch_distributed()
    device = f"cuda:{torch.cuda.current_device()}" if args.ngpu > 0 else "cpu"
    set_all_random_seed(args.seed)
    model, train_args = SpeakerTask.build_model_from_file(args.spk_train_config, args.spk_model_file, device)

    a = vars(args)
    a["valid_data_path_and_name_and_type"] = a["data_path_and_name_and_type"]
    a["valid_shape_file"] = a["shape_file"]
    a["preprocessor_conf"] = {"target_duration": a["target_duration"], "num_eval": a["num_eval"],
                              "noise_apply_prob": 0.0, "rir_apply_prob": 0.0}
    merged = vars(train_args)
    merged.update(a)
    args = argparse.Namespace(**merged)
    # the iterator is built unsharded (as ESPnet): extract_embed reads only its trial lists (no audio), the engine
    # splits the unique utterances into shards and each rank decodes only its own
    org = dopt.distributed
    dopt.distributed = False
    loader = SpeakerTask.build_iter_factory(args=args, distributed_option=dopt, mode="valid").build_iter(0)
    dopt.distributed = org

    reporter = Reporter()
    reporter.set_epoch(1)
    trainer = SpeakerTask.trainer
    saved = trainer.extract_options
    # ESPnet's file name, <set>_embeddings.npz, is the run's own output stem: the summary names it, so
    # open_reader(output_dir), resume and --overwrite know the file
    set_name = args.data_path_and_name_and_type[0][0].split("/")[-2]
    trainer.extract_options = {**saved, "shard_duration": args.shard_duration, "num_workers": args.num_workers,
                               "output_stem": f"{set_name}_embeddings",
                               "overwrite": bool(args.overwrite)}
    try:
        with reporter.observe("valid") as sub:
            trainer.extract_embed(
                model=model, iterator=loader, reporter=sub, options=trainer.build_options(args),
                distributed_option=dopt, output_dir=args.output_dir, custom_bs=args.valid_batch_size,
                average=args.average_embd,
            )  # fmt: skip
    finally:
        trainer.extract_options = saved
    if rank != 0:
        return None
    info = trainer.last_extraction
    dst = Path(info["output"])
    print(f"embeddings of {info['embedded']} unique utterances -> {dst} ({info['shards_resumed']} of "
          f"{info['n_shards']} shards reused from a previous run; rank 0 decoded {info['decoded']} utterances; "
          f"summary: {RunDir(args.output_dir).summary_path})")
    return dst


def main(cmd=None):
    """Entry point (``cmd``: argument list, default ``sys.argv[1:]``); returns the exit status.

    ``-h/--help`` prints the options most runs need (fast, ESPnet not imported); ``--help_espnet`` ESPnet's full list.
    """
    from spk_toolkit.bin.espnet_help import SPK_EMBED_EXTRACT, help_or_argv, require_espnet

    cmd = help_or_argv("spk_embed_extract", __doc__.split("\n\n")[0], SPK_EMBED_EXTRACT, cmd)
    if cmd is None:
        return 0
    require_espnet("spk_embed_extract")
    from espnet2.train.distributed_utils import resolve_distributed_mode

    args = get_parser().parse_args(cmd)
    resolve_distributed_mode(args)
    if args.distributed and args.multiprocessing_distributed:
        sys.exit("spk_embed_extract: --multiprocessing_distributed is not supported; launch with "
                 "torchrun --nproc_per_node=N -m spk_toolkit.bin.spk_embed_extract ...")
    from spk_toolkit.bin.cli import run_cli
    from spk_toolkit.parallel.dist import process_group_teardown

    def body() -> int:
        with process_group_teardown():
            run(args)
        return 0

    # exit codes of spk_toolkit.bin.cli.EXIT_CODES; the traceback of an expected failure with --log_level DEBUG
    return run_cli("spk_embed_extract", body, verbose=int(str(args.log_level).upper() == "DEBUG"),
                   output_dir=args.output_dir)


if __name__ == "__main__":
    sys.exit(main())

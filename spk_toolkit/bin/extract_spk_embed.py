"""Speaker embeddings for ESPnet TTS: a drop-in for ``pyscripts/utils/extract_spk_embed.py`` (and PR #6227's parallel
version) and for ESPnet3's x-vector stage, on spk_toolkit's engine.

ESPnet2 (``tts.sh`` stage 3: change the script name, nothing else)::

    python -m spk_toolkit.bin.extract_spk_embed --pretrained_model M --toolkit {espnet,rawnet,speechbrain,resemblyzer} \\
        --spk_embed_tag xvector [--device cuda:0] in_folder out_folder

writes ``out_folder/<tag>.ark/.scp`` (one (D,) float32 per utterance, in the key order of ``in_folder/text``) and
``out_folder/spk_<tag>.ark/.scp`` (speaker means, ``spk2utt`` order), plus the engine's run files (``plan.json``,
``shards/``, ``errors.tsv``, ``summary.json``, ``run.log``): a rerun resumes, an utterance of ``text`` that cannot
be embedded fails the run naming it (ESPnet's loader would fail later). ``--pretrained_model``: espnet/rawnet: a
``*.pth`` (``config.yaml`` next to it, as ESPnet), an unpacked/packed model or experiment directory, or an
espnet_model_zoo tag; ``rawnet`` without one (or ``RawNet``, what ``tts.sh`` passes) is ``espnet/voxcelebs12_rawnet3``
with ESPnet's 10 crops of 3 s; speechbrain: a model directory or hub id.

Multi-GPU / multi-node / cluster::

    torchrun --nproc_per_node=4 -m spk_toolkit.bin.extract_spk_embed --device cuda ... in_folder out_folder
    python -m spk_toolkit.bin.extract_spk_embed --parallel conf/parallel_slurm.yaml ... in_folder out_folder

ESPnet3 (the recipe's ``xvector:`` block as it is; other keys of the file are ignored)::

    python -m spk_toolkit.bin.extract_spk_embed --config training_config.yaml [--espnet3_layout true]

runs every split of ``xvector.manifest_paths`` / ``splits``: our files under ``{save_path}/spk_toolkit/{tag}/{split}``
and, with ``--espnet3_layout true``, ``{save_path}/{spk_embed_tag}/{split}/{utt_id}.pt`` (one float32 tensor each).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as spk_inference: decoding workers share the cores

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import List, Optional, Sequence, Tuple  # noqa: E402

PROG = "extract_spk_embed"
TOOLKITS = ("espnet", "speechbrain", "rawnet", "resemblyzer")
logger = logging.getLogger(PROG)


def get_parser(espnet3: bool = False) -> argparse.ArgumentParser:
    """The parser: ESPnet's arguments (names and meaning), PR #6227's, then the engine's run options.

    Parameters
    ----------
    espnet3 : bool
        ``--config`` names an ESPnet3 ``training_config.yaml``: the positional folders are not used.
    """
    from spk_toolkit.bin.cli import add_extraction_options, str2bool

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("in_folder", nargs=None if not espnet3 else "?", help="Kaldi/ESPnet data dir (wav.scp, text, "
                   "utt2spk, spk2utt)")
    p.add_argument("out_folder", nargs=None if not espnet3 else "?", help="output folder of the speaker embeddings")
    p.add_argument("--pretrained_model", default=None, help="model (see the description); ESPnet's name")
    p.add_argument("--toolkit", default=None, choices=TOOLKITS, help="speaker-embedding toolkit (ESPnet's choices "
                   "plus resemblyzer); with --config, the xvector block's")
    p.add_argument("--spk_embed_tag", default=None, help="file stem: <tag>.scp, spk_<tag>.scp (default: spk_embed, "
                   "ESPnet's; with --config, the xvector block's)")
    p.add_argument("--train_config", default=None, help="espnet/rawnet: config.yaml of a --pretrained_model *.pth "
                   "kept elsewhere (default: config.yaml next to it, as ESPnet)")
    p.add_argument("--batch_size", type=int, default=None, help="at most this many utterances per forward "
                   "(PR #6227's name; batch_bins bounds padded samples as well)")
    p.add_argument("--prefetch", type=int, default=None, help="accepted for PR #6227's command lines; decoding runs "
                   "ahead in --num_workers DataLoader workers")
    p.add_argument("--crops", type=int, default=None, help="N deterministic crops of --crop_duration averaged "
                   "(ESPnet's RawNet convention; default 10 for rawnet, else 0 = whole utterances)")
    p.add_argument("--crop_duration", type=float, default=None, help="seconds per crop (default 3)")
    p.add_argument("--batch_mode", default=None, help="backend batch mode (espnet: auto|masked|grouped|single; "
                   "speechbrain: auto|masked|grouped|padded; default: the backend's)")
    p.add_argument("--spk_mean", default="raw", choices=["raw", "l2"], help="speaker means of the raw utterance "
                   "embeddings (ESPnet's) or of the L2-normalised ones")
    p.add_argument("--scp_paths", default=None, choices=["espnet", "absolute"], help="espnet: scp entries "
                   "<out_folder>/<tag>.ark:offset as given (relative to the working directory when out_folder is, as "
                   "ESPnet's script writes them); absolute: readable from anywhere (default: espnet; with --config, "
                   "absolute)")
    p.add_argument("--espnet3_layout", type=str2bool, default=False, help="with --config: also write "
                   "{save_path}/{spk_embed_tag}/{split}/{utt_id}.pt (one float32 tensor each)")
    p.add_argument("--output_root", default=None, help="with --config: root of the per-split runs (default "
                   "{save_path}/spk_toolkit/{spk_embed_tag})")
    p.add_argument("--splits", default=None, help="with --config: comma list of splits to run (default: the block's)")
    add_extraction_options(p)
    for a in p._actions:  # ESPnet's --device meaning: cuda:0 when CUDA is available, else the CPU
        if a.dest == "device":
            a.default = None
            a.help = "cpu, cuda, cuda:N (default: cuda:0 when CUDA is available, else cpu, as ESPnet's script)"
    return p


def take_espnet3_config(argv: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """Split off ``--config FILE`` when FILE is an ESPnet3 ``training_config.yaml`` (it has an ``xvector:`` block).

    Returns
    -------
    (str or None, list of str)
        The config path (None when absent or not ESPnet3's) and ``argv`` without it.
    """
    import yaml

    argv = list(argv)
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            path, rest = argv[i + 1], argv[:i] + argv[i + 2:]
        elif a.startswith("--config="):
            path, rest = a.split("=", 1)[1], argv[:i] + argv[i + 1:]
        else:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                cfg = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            return None, argv  # parse_args reports it
        return (path, rest) if isinstance(cfg, dict) and isinstance(cfg.get("xvector"), dict) else (None, argv)
    return None, argv


def resolve_device(device: Optional[str]) -> str:
    """ESPnet's ``--device`` rule: CUDA when asked for and available, else the CPU (a warning when asked for).

    ``None`` (not given) means ``cuda:0`` when CUDA is available. Under torchrun, ``cuda`` / ``cuda:N`` become
    ``cuda:LOCAL_RANK`` in each rank (one GPU per rank).

    Raises
    ------
    ValueError
        Not ``cpu``, ``cuda`` or ``cuda:N``.
    """
    import re

    import torch

    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device is None:
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("--device %s: CUDA is not available here; running on the CPU (as ESPnet's script)", device)
        return "cpu"
    return device


def model_arguments(toolkit: str, pretrained_model: Optional[str], device: str, train_config: Optional[str] = None,
                    batch_mode: Optional[str] = None) -> dict:
    """Backend constructor arguments from ESPnet's ``--pretrained_model`` (and ``--train_config``, ``--batch_mode``).

    espnet / rawnet: a ``*.pth`` file is ``model_file`` (``config.yaml`` next to it unless ``train_config``); a
    directory or a packed model (``.zip`` / ``.tar.gz``) is read with :func:`spk_toolkit.models.resolve_model`; a
    ``config.yaml`` with a checkpoint next to it likewise; anything else is an espnet_model_zoo tag (ESPnet: "not
    ending in pth: a Hugging Face model"). rawnet without a model (or ``RawNet``): the backend's default.
    speechbrain: ``source`` (a directory or a hub id). resemblyzer: its shipped weights (``--pretrained_model`` is
    refused).

    Raises
    ------
    ValueError
        No ``--pretrained_model`` where one is needed, or one given to resemblyzer.
    """
    kw = {"device": device}
    if batch_mode:
        kw["batch_mode"] = batch_mode
    pm = pretrained_model
    if toolkit in ("espnet", "rawnet"):
        if pm is None or (toolkit == "rawnet" and pm == "RawNet"):
            if toolkit == "espnet":
                raise ValueError("--toolkit espnet needs --pretrained_model (a *.pth, a model directory or an "
                                 "espnet_model_zoo tag)")
            return kw
        p = Path(pm)
        if p.is_file() and p.suffix == ".pth":
            kw.update(model_file=str(p), train_config=train_config)
        elif p.exists():
            from spk_toolkit.models import resolve_model

            _, found = resolve_model(p)
            kw.update(found)
            if train_config:
                kw["train_config"] = train_config
        else:
            kw["model_tag"] = pm
        return kw
    if toolkit == "speechbrain":
        if pm is None:
            raise ValueError("--toolkit speechbrain needs --pretrained_model (a model directory or a hub id such as "
                             "speechbrain/spkrec-ecapa-voxceleb)")
        kw["source"] = pm
        return kw
    if pm is not None:
        raise ValueError("--toolkit resemblyzer uses its shipped weights; drop --pretrained_model")
    kw.pop("batch_mode", None)
    return kw


def _engine_options(args) -> dict:
    from spk_toolkit.bin.cli import extraction_options

    opts = extraction_options(args)
    if args.batch_size is not None:
        opts["max_batch_size"] = args.batch_size
    if args.crops is not None:
        opts["crops"] = args.crops
    if args.crop_duration is not None:
        opts["crop_duration"] = args.crop_duration
    return opts


def _is_rank0() -> bool:
    from spk_toolkit.parallel import torchrun_launch

    launch = torchrun_launch()
    return launch is None or launch["rank"] == 0


def _print_tts(summary: dict, echo) -> None:
    from spk_toolkit.engine import format_summary

    echo(format_summary(summary))
    t = summary["tts"]
    echo(f"{'utt scp':<11}: {t['utt_scp']} ({summary['embedded']} utterances, {t['order']} order)")
    if "spk_scp" in t:
        echo(f"{'spk scp':<11}: {t['spk_scp']} ({t['speakers']} speakers, mean of {t['spk_mean']} embeddings)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (``spk_toolkit.bin.cli.EXIT_CODES``)."""
    from spk_toolkit.bin.cli import choose_executor, echo, open_run_log, parse_args, run_cli, setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    x_config, argv = take_espnet3_config(argv)
    args = parse_args(get_parser(espnet3=x_config is not None), argv)
    setup_logging(args.verbose, getattr(args, "quiet", False))
    say = echo(logger, getattr(args, "quiet", False))

    def espnet2() -> int:
        from spk_toolkit.tts import extract_tts_embeddings

        if args.toolkit is None:
            raise ValueError("--toolkit is required (espnet, speechbrain, rawnet or resemblyzer)")
        tag = args.spk_embed_tag or "spk_embed"
        if _is_rank0():
            open_run_log(args.out_folder, PROG, argv)
        device = resolve_device(args.device)
        kw = model_arguments(args.toolkit, args.pretrained_model, device, args.train_config, args.batch_mode)
        executor = choose_executor(args.executor, args.parallel, PROG)
        summary = extract_tts_embeddings(args.in_folder, args.out_folder, tag, toolkit=args.toolkit, model_kwargs=kw,
                                         executor=executor, parallel=args.parallel, spk_mean=args.spk_mean,
                                         scp_paths=args.scp_paths or "espnet", **_engine_options(args))
        if summary is not None:
            _print_tts(summary, say)
        return 0

    def espnet3() -> int:
        from spk_toolkit.tts import extract_espnet3_xvectors, read_espnet3_xvector_config

        xc = read_espnet3_xvector_config(x_config)
        for key in ("toolkit", "pretrained_model", "device", "spk_embed_tag"):  # command line wins over the block
            if getattr(args, key) is not None:
                setattr(xc, key, getattr(args, key))
        if args.batch_size is not None:
            xc.batch_size = args.batch_size
        if xc.toolkit not in TOOLKITS:
            raise ValueError(f"{x_config}: xvector.toolkit must be one of {TOOLKITS}, got {xc.toolkit!r}")
        device = resolve_device(xc.device)
        kw = model_arguments(xc.toolkit, xc.pretrained_model, device, args.train_config, args.batch_mode)
        executor = choose_executor(args.executor, args.parallel, PROG)
        from spk_toolkit.parallel import torchrun_launch
        from spk_toolkit.parallel.dist import rank_device

        model = None
        launch = torchrun_launch() if executor == "torchrun" else None
        if executor in ("inprocess", "torchrun"):  # one model for every split
            from spk_toolkit.backends.base import load_model

            model = load_model(xc.toolkit, **{**kw, "device": rank_device(device, launch["local_rank"])
                                              if launch else device})
        splits = args.splits.split(",") if args.splits else None
        if _is_rank0():
            open_run_log(Path(xc.save_path) / "spk_toolkit" / xc.spk_embed_tag, PROG, argv)
        import contextlib

        group = contextlib.nullcontext()
        if executor == "torchrun":  # one process group for every split (each split's executor reuses it)
            from spk_toolkit.parallel.dist import init_distributed, process_group_teardown

            init_distributed(rank_device(device, launch["local_rank"]))
            group = process_group_teardown()
        with group:
            results = extract_espnet3_xvectors(xc, model=model, model_kwargs=kw, executor=executor,
                                               parallel=args.parallel, pt_layout=args.espnet3_layout,
                                               output_root=args.output_root, splits=splits, spk_mean=args.spk_mean,
                                               scp_paths=args.scp_paths or "absolute", **_engine_options(args))
        for split, summary in (results or {}).items():
            say(f"---- split {split}")
            _print_tts(summary, say)
            if "pt_dir" in summary:
                say(f"{'pt layout':<11}: {summary['pt_dir']} ({summary['pt_files']} files)")
        return 0

    out = args.out_folder if x_config is None else None
    return run_cli(PROG, espnet2 if x_config is None else espnet3, args.verbose, out)


if __name__ == "__main__":
    sys.exit(main())

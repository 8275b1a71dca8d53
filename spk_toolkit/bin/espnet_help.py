"""Short ``--help`` for the ESPnet-based commands (``spk_train``, ``spk_embed_extract``), without importing ESPnet.

ESPnet's parsers list 130+ options (600 and 290 lines of help) and take 10-20 s to build, because building them
imports ESPnet's whole task. ``--help`` shows the options most runs need, with ESPnet's defaults, in a fraction
of a second; ``--help_espnet`` shows ESPnet's full list (the parser the command really uses). The defaults below
are checked against ESPnet's parser by ``test/test_packaging.py::test_short_help_defaults_match_espnet``.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence, Tuple

#: (option, default, help, choices) per command; defaults are ESPnet 202611's
Option = Tuple[str, object, str, Optional[Sequence[str]]]

SPK_TRAIN: List[Option] = [
    ("--config", None, "YAML config (conf/train_ecapa.yaml, conf/train_xvector.yaml); keys are option names", None),
    ("--output_dir", None, "experiment directory (checkpoints, config.yaml, logs)", None),
    ("--ngpu", 0, "GPUs per process; 0 = CPU", None),
    ("--seed", 0, "random seed", None),
    ("--num_workers", 1, "DataLoader workers", None),
    ("--dist_backend", "nccl", "torch.distributed backend under torchrun (gloo on CPU)", None),
    ("--train_data_path_and_name_and_type", [], "path,name,type of training data (repeat: speech, spk_labels)", None),
    ("--train_shape_file", [], "shape file of the training data", None),
    ("--valid_data_path_and_name_and_type", [], "path,name,type of the validation trials (repeat)", None),
    ("--valid_shape_file", [], "shape file of the validation data", None),
    ("--spk2utt", "", "spk2utt of the training data (label mapping)", None),
    ("--spk_num", None, "number of training speakers", None),
    ("--batch_type", "folded", "batch sampler",
     ("unsorted", "sorted", "folded", "length", "numel", "catbel", "catpow", "catpow_balance_dataset")),
    ("--batch_size", 20, "mini-batch size (batch_type unsorted/sorted/folded)", None),
    ("--batch_bins", 1000000, "batch bins (batch_type length/numel)", None),
    ("--valid_batch_size", None, "validation batch size (default: --batch_size)", None),
    ("--max_epoch", 40, "epochs", None),
    ("--optim", "adadelta", "optimizer", ("adam", "adamw", "sgd", "adadelta", "adagrad", "adamax", "asgd", "lbfgs",
                                          "rmsprop", "rprop", "radam")),
    ("--best_model_criterion", [("train", "loss", "min"), ("valid", "loss", "min"), ("train", "acc", "max"),
                                ("valid", "acc", "max")], "e.g. valid eer min (spk_toolkit registers valid/eer)", None),
    ("--keep_nbest_models", [10], "checkpoints kept", None),
    ("--resume", False, "resume from the checkpoint in output_dir", None),
    ("--init_param", [], "initialise parameters from checkpoint(s)", None),
    ("--target_duration", 3.0, "seconds per training crop", None),
    ("--log_level", "INFO", "ESPnet's log level", ("ERROR", "WARNING", "INFO", "DEBUG", "NOTSET")),
]

SPK_EMBED_EXTRACT: List[Option] = [
    ("--config", None, "YAML config; keys are option names", None),
    ("--spk_train_config", None, "config.yaml of the speaker model's experiment", None),
    ("--spk_model_file", None, "checkpoint (*.pth)", None),
    ("--model_tag", None, "espnet_model_zoo tag instead of the two files", None),
    ("--data_path_and_name_and_type", None, "trial data: path,name,type (repeat: speech, speech2, spk_labels)", None),
    ("--shape_file", [], "shape file(s) of the data", None),
    ("--output_dir", None, "where <set>_embeddings.npz, plan.json, shards/ and summary.json go", None),
    ("--ngpu", 0, "GPUs per process; 0 = CPU", None),
    ("--num_workers", 1, "decoding workers per process", None),
    ("--dist_backend", "nccl", "torch.distributed backend under torchrun (gloo on CPU)", None),
    ("--valid_batch_size", 1, "utterances per batch per process", None),
    ("--target_duration", 3.0, "seconds per evaluation crop", None),
    ("--num_eval", 10, "evaluation crops per utterance", None),
    ("--average_embd", False, "store the mean of the crops", None),
    ("--shard_duration", 600.0, "spk_toolkit: seconds of audio per shard (the unit of work and of resume)", None),
    ("--overwrite", False, "spk_toolkit: remove a previous run's outputs (<set>_embeddings.npz too), not resume", None),
    ("--log_level", "INFO", "ESPnet's log level", ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", "NOTSET")),
]


def short_parser(prog: str, description: str, options: Sequence[Option]) -> argparse.ArgumentParser:
    """A parser used only to print the short help (defaults and choices shown; never parses a run)."""
    from spk_toolkit.bin.cli import HelpFormatter

    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter,
                                epilog="These are the options most runs need. --help_espnet lists all of ESPnet's "
                                       "options (the parser this command really uses; slow: it imports ESPnet).")
    for flag, default, text, choices in options:
        kw = {"default": default, "help": text}
        if choices:
            kw["choices"] = choices
        p.add_argument(flag, **kw)
    p.add_argument("--help_espnet", action="store_true", help="print ESPnet's full option list and exit")
    return p


def help_or_argv(prog: str, description: str, options: Sequence[Option],
                 argv: Optional[Sequence[str]] = None) -> Optional[List[str]]:
    """Handle ``-h/--help`` (short help, printed; returns None) and ``--help_espnet`` (becomes ``--help``).

    Parameters
    ----------
    prog, description : str
    options : sequence of Option
    argv : sequence of str, optional
        Default ``sys.argv[1:]``.

    Returns
    -------
    list of str or None
        The arguments to give ESPnet's parser, or None when the short help was printed (exit 0).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help_espnet" in args:
        return [a for a in args if a != "--help_espnet"] + ["--help"]
    if "-h" in args or "--help" in args:
        short_parser(prog, description, options).print_help()
        return None
    return args


def require_espnet(prog: str) -> None:
    """Exit with one line (and :data:`spk_toolkit.bin.cli.EXIT_USAGE`) when ESPnet is not installed.

    Raises
    ------
    SystemExit
        ``espnet2`` cannot be found; the message says how to install it.
    """
    import importlib.util

    if importlib.util.find_spec("espnet2") is not None:
        return
    from spk_toolkit.backends.espnet.model import EspnetSpeakerModel
    from spk_toolkit.bin.cli import EXIT_USAGE

    print(f"{prog}: error: ESPnet is not installed: {EspnetSpeakerModel.install}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)

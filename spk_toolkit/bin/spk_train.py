#!/usr/bin/env python3
"""Speaker-embedding extractor training: ESPnet's ``spk_train`` with spk_toolkit's :class:`SpkTrainer`.

Same options as ``python -m espnet2.bin.spk_train`` (``--config``, ``--output_dir``, data options, ...); the
validation registers ``valid/eer`` (%), ``valid/mindcf`` (P_target 0.05), ``valid/mindcf_p01``, ``valid/n_trials``
and the target/nontarget score statistics. Use ``best_model_criterion: [[valid, eer, min]]``.

Examples
--------
Single process on CPU::

    bin/prepare_spk_train.sh --data data/fillets_small --out dump/spk
    python -m spk_toolkit.bin.spk_train --config conf/train_xvector.yaml --ngpu 0 \\
        --output_dir exp/spk_xvector $(cat dump/spk/spk_train.args)

Two CPU processes (gloo)::

    torchrun --nproc_per_node=2 -m spk_toolkit.bin.spk_train --dist_backend gloo --ngpu 0 ... (same options)
"""
import sys

from spk_toolkit.bin.espnet_help import SPK_TRAIN, help_or_argv, require_espnet


def get_parser():
    """ESPnet's SpeakerTask parser (imports ESPnet: slow)."""
    from spk_toolkit.tasks.spk import SpeakerTask

    return SpeakerTask.get_parser()


def main(cmd=None):
    """Run training (``cmd``: list of arguments, default ``sys.argv[1:]``).

    ``-h/--help`` prints the options most runs need (fast, ESPnet not imported); ``--help_espnet`` ESPnet's full list.
    """
    cmd = help_or_argv("spk_train", __doc__.split("\n\n")[0], SPK_TRAIN, cmd)
    if cmd is None:
        return 0
    require_espnet("spk_train")
    from spk_toolkit.parallel.dist import process_group_teardown
    from spk_toolkit.tasks.spk import SpeakerTask

    from spk_toolkit.bin.cli import run_cli

    def body() -> int:
        with process_group_teardown():
            SpeakerTask.main(cmd=cmd)
        return 0

    # exit codes of spk_toolkit.bin.cli.EXIT_CODES (a bad checkpoint or config: 2, a full disk: 3, Ctrl-C: 130);
    # ESPnet's own failures keep their traceback
    return run_cli("spk_train", body, verbose=int("--log_level DEBUG" in " ".join(cmd or [])))


if __name__ == "__main__":
    sys.exit(main())

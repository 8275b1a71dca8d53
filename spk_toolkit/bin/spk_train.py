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
from spk_toolkit.parallel.dist import process_group_teardown
from spk_toolkit.tasks.spk import SpeakerTask


def get_parser():
    """ESPnet's SpeakerTask parser."""
    return SpeakerTask.get_parser()


def main(cmd=None):
    """Run training (``cmd``: list of arguments, default ``sys.argv[1:]``)."""
    with process_group_teardown():
        SpeakerTask.main(cmd=cmd)


if __name__ == "__main__":
    main()

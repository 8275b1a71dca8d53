#!/usr/bin/env bash
# Prepare an ESPnet-SPK training directory (16 kHz FLAC, wav.scp, utt2spk, spk2utt, speech_shape, trial.scp,
# trial2.scp, trial_label) from a Kaldi data dir with speaker labels.
#
#   bin/prepare_spk_train.sh [--data data/fillets_small] [--out dump/spk_fillets_small] [options of
#                            python -m spk_toolkit.recipes.espnet_spk, e.g. --valid_per_spk 3 --max_trials 2000]
#
# Then train:  python -m spk_toolkit.bin.spk_train --config conf/train_xvector.yaml --ngpu 0 \
#                  --output_dir exp/spk_xvector $(cat dump/spk_fillets_small/spk_train.args)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
data=data/fillets_small
out=dump/spk_fillets_small
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data) data=$2; shift 2;;
    --out) out=$2; shift 2;;
    *) args+=("$1"); shift;;
  esac
done
[ -f "$data/wav.scp" ] || { echo "$data/wav.scp missing: run bin/prepare_fillets.sh (make data) first" >&2; exit 1; }
exec "$PY" -m spk_toolkit.recipes.espnet_spk --data "$data" --out "$out" "${args[@]}"

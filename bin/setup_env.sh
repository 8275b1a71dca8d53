#!/usr/bin/env bash
# Create .venv idempotently with the constraints recipe (torch 2.13.0 CPU, espnet --no-deps,
# torchaudio pure-Python part). Safe to re-run: finishes in seconds when the env is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
stamp="$VENV/.spk_toolkit_setup_v4"  # v4: pytest-randomly, pytest-xdist (make test), the executors' entry points
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip="$VENV/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt"
$pip "setuptools>=77.0.3,<81" wheel
$pip torch==2.13.0
$pip --no-deps --ignore-requires-python espnet==202611
$pip numpy scipy typeguard humanfriendly librosa torch-complex PyYAML sentencepiece==0.2.1 tqdm \
     asteroid-filterbanks==0.4.0 soundfile soxr kaldiio h5py matplotlib pytest hypothesis pytest-randomly==5.1.0 pytest-xdist==3.8.0 \
     "dask[distributed]" dask-jobqueue webrtcvad
$VENV/bin/python -m pip install -q --disable-pip-version-check --no-deps omniio torchaudio==2.11.0 resemblyzer==0.1.4
# speechbrain backend (issue 15). Under the constraints it keeps torch 2.13.0; on an env without torchaudio it pulls
# torchaudio 2.11.1, whose CUDA .so is set aside by the next line exactly as for 2.11.0 (the pure-Python part is used).
$pip speechbrain==1.1.2
rm -f "$VENV"/lib/python*/site-packages/torchaudio/lib/*.so
$VENV/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps --no-build-isolation -e .
$VENV/bin/python - <<'PY'
import torch, espnet2.tasks.spk, resemblyzer, soundfile, soxr, kaldiio  # noqa: F401
from speechbrain.inference.speaker import EncoderClassifier  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("spk_toolkit env ok: torch", torch.__version__)
PY
touch "$stamp"

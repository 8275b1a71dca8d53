#!/usr/bin/env bash
# Fetch the Fish Fillets NG Czech and Dutch voice packs (Debian main, GPL-2) and build Kaldi data dirs + trials.
# Usage: bin/prepare_fillets.sh [data_dir]   (default: data). Idempotent; offline once the .deb files are there.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data}
PY=${PY:-.venv/bin/python}
mkdir -p "$DATA/deb"
if [ ! -f "$DATA/fillets_pkg/.unpacked" ]; then
  if ! ls "$DATA"/deb/fillets-ng-data-cs_*.deb "$DATA"/deb/fillets-ng-data-nl_*.deb >/dev/null 2>&1; then
    (cd "$DATA/deb" && apt-get download fillets-ng-data-cs fillets-ng-data-nl 2>/dev/null) || {
      echo "apt-get download failed; running apt-get update once" >&2
      apt-get update -qq
      (cd "$DATA/deb" && apt-get download fillets-ng-data-cs fillets-ng-data-nl)
    }
  fi
  for f in "$DATA"/deb/fillets-ng-data-*.deb; do dpkg -x "$f" "$DATA/fillets_pkg"; done
  touch "$DATA/fillets_pkg/.unpacked"
fi
if [ ! -f "$DATA/fillets_demo_trials.txt" ]; then
  "$PY" -m spk_toolkit.recipes.fillets --root "$DATA/fillets_pkg" --out "$DATA"
fi

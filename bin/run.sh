#!/usr/bin/env bash
# 3D-Speaker-style pipeline over an audio tree data_root/<dataset>/<speaker>/<utt>.<ext>.
#
#   bin/run.sh --data_root DATA [--output_dir exp/embeddings] [--final_output_dir exp/final_embeddings]
#              [--nproc 1] [--device cpu|cuda] [--parallel conf/parallel_local.yaml]
#              [--stage 1] [--stop_stage 3] [-- extra spk_inference options]
#
# Stages
#   1  extract: spk_inference over the tree (torchrun with --nproc > 1, Dask with --parallel); resumable:
#      rerunning stage 1 after a crash skips finished shards.
#   2  merge:   per-utterance / per-speaker outputs, utterance_list.json, speaker_list.json, summary.json
#               (spk_toolkit.pipeline3d; npz + json, no pickle)
#   3  clean up: remove the shard files and per-rank stats of stage 1 (keeps plan.json, embeddings, summary)
set -euo pipefail

stage=1
stop_stage=3
data_root=""
output_dir=exp/embeddings
final_output_dir=exp/final_embeddings
nproc=1
device=cpu
parallel=""
config=conf/inference.yaml
python=${PYTHON:-}
extra=()

while [ $# -gt 0 ]; do
  case "$1" in
    --stage) stage=$2; shift 2 ;;
    --stop_stage) stop_stage=$2; shift 2 ;;
    --data_root) data_root=$2; shift 2 ;;
    --output_dir) output_dir=$2; shift 2 ;;
    --final_output_dir) final_output_dir=$2; shift 2 ;;
    --nproc) nproc=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --parallel) parallel=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python=$root/.venv/bin/python; else python=python3; fi
fi
[ -n "$data_root" ] || { echo "run.sh: --data_root is required" >&2; exit 2; }
[ -d "$data_root" ] || { echo "run.sh: --data_root $data_root is not a directory" >&2; exit 2; }
cfg=()
[ -f "$config" ] && cfg=(--config "$config")

if [ "$stage" -le 1 ] && [ "$stop_stage" -ge 1 ]; then
  echo "stage 1: extract embeddings of $data_root -> $output_dir"
  args=("${cfg[@]}" --data_dir "$data_root" --output_dir "$output_dir" --device "$device" "${extra[@]}")
  if [ -n "$parallel" ]; then
    "$python" -m spk_toolkit.bin.spk_inference "${args[@]}" --parallel "$parallel"
  elif [ "$nproc" -gt 1 ]; then
    torchrun=$(dirname "$python")/torchrun
    [ -x "$torchrun" ] || torchrun=torchrun
    "$torchrun" --standalone --nproc_per_node="$nproc" -m spk_toolkit.bin.spk_inference "${args[@]}"
  else
    "$python" -m spk_toolkit.bin.spk_inference "${args[@]}"
  fi
fi

if [ "$stage" -le 2 ] && [ "$stop_stage" -ge 2 ]; then
  echo "stage 2: merge -> $final_output_dir"
  "$python" -m spk_toolkit.pipeline3d --data_root "$data_root" --run_dir "$output_dir" --output_dir "$final_output_dir"
fi

if [ "$stage" -le 3 ] && [ "$stop_stage" -ge 3 ]; then
  echo "stage 3: clean up $output_dir/shards $output_dir/ranks"
  [ -f "$output_dir/summary.json" ] || { echo "run.sh: $output_dir has no summary.json; not cleaning an unfinished run" >&2; exit 1; }
  rm -rf "$output_dir/shards" "$output_dir/ranks"
fi

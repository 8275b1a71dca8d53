"""3D-Speaker pipeline parity: per-utterance and per-speaker outputs of an audio-tree extraction, without pickle.

Input: an engine run (its ``summary.json`` names the embeddings, in any ``--output_format``) over
``data_root/<dataset>/<speaker>/<utt>.<ext>`` (:func:`spk_toolkit.io.datadir.load_audio_tree`). Output directory::

    utterance_embeddings.npz  key "<dataset>/<speaker>/<utt>" -> float32 (D,)   (replaces utterance_embeddings.pkl)
    speaker_embeddings.npz    key "<dataset>/<speaker>"       -> float32 (D,)   mean of the speaker's utterances
    utterance_list.json       [{key, dataset, speaker_id, utterance_id, path}] in key order
    speaker_list.json         [{key, dataset, speaker_id, num_utterances}]
    summary.json              total_utterances, total_speakers, embedding_dimension, total_errors,
                              datasets: {name: {utterances, speakers, errors}}, model, source run

Keys use ``/`` (which cannot occur inside a path component) instead of 3D-Speaker's ``dataset_speaker_utt``,
which collides when names contain ``_`` (``a_b/c`` vs ``a/b_c``).

CLI (stage 2 of ``bin/run.sh``)::

    python -m spk_toolkit.pipeline3d --data_root DATA --run_dir exp/run --output_dir exp/final
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def write_pipeline_outputs(data_root, run_dir, output_dir) -> dict:
    """Write the 3D-Speaker-style outputs of a finished run.

    Parameters
    ----------
    data_root : path
        Audio tree root (``<dataset>/<speaker>/<utt>.<ext>``).
    run_dir : path
        Output directory of a finished :func:`spk_toolkit.extract_embeddings` run on ``data_root``.
    output_dir : path
        Where the files above are written (atomically, each under a temporary name first).

    Returns
    -------
    dict
        The summary (also ``summary.json``).

    Raises
    ------
    FileNotFoundError
        ``run_dir`` has no ``summary.json`` (stage 1 not finished) or its output is gone.
    ValueError
        The run's embeddings hold keys that are not in the audio tree (a run over another corpus).
    """
    from spk_toolkit.io.datadir import load_audio_tree
    from spk_toolkit.io.atomic import atomic_write_text
    from spk_toolkit.io.rundir import RunDir
    from spk_toolkit.io.storage import get_writer, open_reader
    from spk_toolkit.scoring import average_embeddings

    run, out = Path(run_dir), Path(output_dir)
    rd = RunDir(run)
    run_summary = rd.read_summary()
    if run_summary is None:
        raise FileNotFoundError(f"{rd.summary_path} not found: run the extraction stage first")
    utts = load_audio_tree(data_root)
    with open_reader(run) as r:  # the run's main output, whatever its --output_format
        emb = {k: np.asarray(r[k]) for k in r}
    by_key = {u.utt_id: u for u in utts}
    alien = [k for k in emb if k not in by_key]
    if alien:
        raise ValueError(f"{run}: {len(alien)} embeddings are not in {data_root}, e.g. {alien[:3]}")
    errors = rd.error_reasons()
    out.mkdir(parents=True, exist_ok=True)
    utt_list, spk_keys = [], {}
    with get_writer("npz")(out, "utterance_embeddings") as w:
        for u in utts:
            if u.utt_id not in emb:
                continue
            w.write(u.utt_id, emb[u.utt_id])
            spk = u.utt_id.split("/")[1]
            utt_list.append({"key": u.utt_id, "dataset": u.dataset, "speaker_id": spk,
                             "utterance_id": u.utt_id.split("/", 2)[2], "path": u.path})
            spk_keys.setdefault(u.spk_id, []).append(u.utt_id)
    spk_list = []
    means = average_embeddings(emb, spk_keys)
    with get_writer("npz")(out, "speaker_embeddings") as w:
        for s in spk_keys:
            w.write(s, means[s].astype(np.float32))
            ds, spk = s.split("/", 1)
            spk_list.append({"key": s, "dataset": ds, "speaker_id": spk, "num_utterances": len(spk_keys[s])})
    datasets = {}
    for u in utts:
        d = datasets.setdefault(u.dataset, {"utterances": 0, "speakers": set(), "errors": 0})
        if u.utt_id in emb:
            d["utterances"] += 1
            d["speakers"].add(u.spk_id)
        elif u.utt_id in errors:
            d["errors"] += 1
    dim = int(next(iter(emb.values())).shape[-1]) if emb else 0
    summary = {
        "total_utterances": len(utt_list), "total_speakers": len(spk_list), "total_datasets": len(datasets),
        "embedding_dimension": dim, "total_errors": len(errors),
        "datasets": {k: {"utterances": v["utterances"], "speakers": len(v["speakers"]), "errors": v["errors"]}
                     for k, v in sorted(datasets.items())},
        "model": run_summary.get("model"), "audio_hours": run_summary.get("audio_hours"),
        "source_run": str(run), "data_root": str(data_root),
        "files": {"utterance_embeddings": "utterance_embeddings.npz", "speaker_embeddings": "speaker_embeddings.npz",
                  "utterance_list": "utterance_list.json", "speaker_list": "speaker_list.json",
                  "errors": str(rd.errors_path)},
    }
    for name, obj in (("utterance_list.json", utt_list), ("speaker_list.json", spk_list), ("summary.json", summary)):
        atomic_write_text(out / name, json.dumps(obj, indent=2, ensure_ascii=False))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", required=True)
    p.add_argument("--run_dir", required=True, help="output dir of the extraction stage")
    p.add_argument("--output_dir", required=True)
    a = p.parse_args(argv)
    try:
        s = write_pipeline_outputs(a.data_root, a.run_dir, a.output_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"pipeline3d: error: {e}", file=sys.stderr)
        return 1
    print(f"{s['total_utterances']} utterances, {s['total_speakers']} speakers, {s['total_datasets']} datasets, "
          f"dim {s['embedding_dimension']}, {s['total_errors']} errors -> {a.output_dir}")
    for k, v in s["datasets"].items():
        print(f"  {k}: {v['utterances']} utterances, {v['speakers']} speakers, {v['errors']} errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())

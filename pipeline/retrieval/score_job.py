"""The `score` stage: recall@K of every AGREE prediction file against the ground truth.

Writes a small flat metrics JSON (``metrics/<ds>/retrieval.json``: the mean recall over
``score.ks`` of each list, ``t2i_plain`` ... ``i2t_egr_tbr``, percent: eight columns in
``dvc exp show``), the full table (``reports/<ds>/retrieval.json``, a plain output, see
:func:`pipeline.artifacts.details_path`: ``t2i_plain_r1`` ... ``i2t_egr_tbr_mean`` for every K, list and
direction, the query counts and the notes), AGREE result JSONs
(``text_output_<method>.json``, ``image_output_<method>.json``: R@1/5/10 and mean), and
the recall@K curves for K = 1..list length as CSV (a column per direction and method) and
PNG.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import atomic_path, details_path, write_json
from pipeline.metrics.recall import first_hit_ranks, recall_curve, recall_from_ranks
from pipeline.retrieval.agree_io import read_predictions, write_result
from pipeline.retrieval.rerank import METHODS
from pipeline.retrieval.rerank_job import prediction_path

RESULT_FILES = {"t2i": "text_output_{}.json", "i2t": "image_output_{}.json"}


def headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics-file part of the full table: each list's mean recall, both directions
    (``t2i_egr_tbr_mean`` -> ``t2i_egr_tbr``)."""
    return {k.removesuffix("_mean"): v for k, v in metrics.items() if k.endswith("_mean")}



def run_score(pred_dir: str | os.PathLike, t2i_gold: Mapping[str, Sequence[str]],
              i2t_gold: Mapping[str, Sequence[str]], ks: Sequence[int], gold_names: Mapping[str, str],
              metrics_path: str | os.PathLike, agree_dir: str | os.PathLike,
              plot_csv: str | os.PathLike, plot_png: str | os.PathLike) -> dict[str, Any]:
    """Score the 8 prediction files in ``pred_dir``; write metrics, AGREE results and plots."""
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"params.yaml: score.ks must be positive integers, got {ks}")
    metrics: dict[str, Any] = {}
    curves: dict[str, np.ndarray] = {}
    notes: list[str] = []
    for d, gold in (("t2i", t2i_gold), ("i2t", i2t_gold)):
        for method in METHODS:
            path = prediction_path(pred_dir, d, method)
            ranked = read_predictions(path, d)
            first = first_hit_ranks(ranked, gold, pred_name=str(path), gold_name=gold_names[d])
            list_len = max((len(v) for v in ranked.values()), default=0)
            if max(ks) > list_len:
                notes.append(f"{path.name}: lists hold {list_len} items, so R@{max(ks)} counts only those")
            r = recall_from_ranks(first, ks)
            for k in ks:
                metrics[f"{d}_{method}_r{k}"] = r[f"r{k}"]
            metrics[f"{d}_{method}_mean"] = r["mean"]
            curves[f"{d}_{method}"] = recall_curve(first, max(list_len, 1))
            if set(ks) >= {1, 5, 10}:
                write_result(Path(agree_dir) / RESULT_FILES[d].format(method),
                             {"r1": r["r1"], "r5": r["r5"], "r10": r["r10"], "mean": r["mean"]})
    if not set(ks) >= {1, 5, 10}:
        notes.append("score.ks lacks one of 1, 5, 10: AGREE result files (r1, r5, r10) not written")
    metrics["queries_t2i"] = len(t2i_gold)
    metrics["queries_i2t"] = len(i2t_gold)
    recall = {k: v for k, v in metrics.items() if not k.startswith("queries_")}
    write_json(details_path(metrics_path), {
        "recall": recall, "ks": ks, "queries": {"t2i": len(t2i_gold), "i2t": len(i2t_gold)}, "notes": notes})
    write_json(metrics_path, headline(metrics))
    _write_curves(plot_csv, plot_png, curves)
    return {"metrics": metrics, "notes": notes}


def _write_curves(csv_path: str | os.PathLike, png_path: str | os.PathLike, curves: Mapping[str, np.ndarray]) -> None:
    n = max(len(c) for c in curves.values())
    names = list(curves)
    with atomic_path(csv_path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["k", *names])
            for k in range(n):
                w.writerow([k + 1, *(f"{curves[c][min(k, len(curves[c]) - 1)]:.4f}" for c in names)])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, d, title in zip(axes, ("t2i", "i2t"), ("text to image", "image to text")):
        for method in METHODS:
            c = curves[f"{d}_{method}"]
            ax.plot(np.arange(1, len(c) + 1), c, marker=".", label=method.replace("_", "+").upper())
        ax.set_title(title)
        ax.set_xlabel("K")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # K is a count
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall@K (%)")
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)

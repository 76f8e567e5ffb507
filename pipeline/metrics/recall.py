"""Recall@K for image-text retrieval, in percent like AGREE's evaluation.

A query is a hit at K if any of its relevant items is among its first K predictions:
image to text, any of the image's captions; text to image, the caption's image(s).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np


class RecallInputError(ValueError):
    """Predictions and ground truth do not cover the same queries."""


def first_hit_ranks(ranked: Mapping[str, Sequence[str]], relevant: Mapping[str, Collection[str]],
                    pred_name: str = "predictions", gold_name: str = "ground truth") -> np.ndarray:
    """(Q,) 0-based rank of the first relevant item per ground-truth query (inf: none).

    Every ground-truth query must have a prediction and vice versa; else a
    :class:`RecallInputError` names both sources and a few offending ids.
    """
    missing = [q for q in relevant if q not in ranked]
    extra = [q for q in ranked if q not in relevant]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} queries of {gold_name} have no list in {pred_name} (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} queries in {pred_name} are not in {gold_name} (e.g. {extra[:3]})")
        raise RecallInputError("; ".join(parts))
    out = np.full(len(relevant), np.inf)
    for i, (q, rel) in enumerate(relevant.items()):
        rel = set(rel)
        for r, item in enumerate(ranked[q]):
            if item in rel:
                out[i] = r
                break
    return out


def recall_from_ranks(first: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``{"r1": .., "r5": .., "r10": .., "mean": ..}`` in percent from first-hit ranks."""
    if len(first) == 0:
        raise RecallInputError("no queries to score")
    out = {f"r{k}": float(100.0 * np.mean(first < k)) for k in ks}
    out["mean"] = float(np.mean([out[f"r{k}"] for k in ks]))
    return out


def recall_at_k(ranked: Mapping[str, Sequence[str]], relevant: Mapping[str, Collection[str]],
                ks: Sequence[int] = (1, 5, 10), **names: str) -> dict[str, float]:
    """R@K (percent) for each K in ``ks`` and their mean; see :func:`first_hit_ranks`."""
    return recall_from_ranks(first_hit_ranks(ranked, relevant, **names), ks)


def recall_curve(first: np.ndarray, max_k: int) -> np.ndarray:
    """(max_k,) R@K in percent for K = 1..max_k."""
    return np.array([100.0 * np.mean(first < k) for k in range(1, max_k + 1)])


def invert_relevance(relevant: Mapping[str, Collection[str]]) -> dict[str, set[str]]:
    """Flip query -> relevant items into item -> queries (caption->images to image->captions)."""
    out: dict[str, set[str]] = {}
    for q, items in relevant.items():
        for i in items:
            out.setdefault(i, set()).add(q)
    return out

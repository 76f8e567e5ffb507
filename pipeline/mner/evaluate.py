"""Evaluate a trained MNER checkpoint on the cached valid/test splits.

Writes CoNLL predictions (token, gold, predicted), two JSON files and plots: F1 per type
(bar PNG) and an entity-type confusion table (gold type vs predicted type for overlapping
spans: PNG heatmap + CSV rows for ``dvc plots``' confusion template). Scores use the FULL
gold sequences: a word the text encoder cut off is predicted ``O`` and still counted.

- the metrics file (``metrics/<ds>/mner.json``, what ``dvc exp show`` / ``dvc metrics show``
  print): the micro F1 of each split and the test F1 of each type, nothing else, so that
  an experiments table stays a few columns wide (:func:`headline`);
- the full report (``reports/<ds>/mner.json``, a plain DVC output, not a metric; see
  :func:`pipeline.artifacts.details_path`): everything, i.e. micro and per-type P/R/F1 and the counts of each split, the
  model that ran (its ``use_image`` says whether the image branches really ran) and the
  fingerprints of the caches it read.
"""
from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_path, details_path, write_json
from pipeline.metrics.ner import entity_scores, type_confusion
from pipeline.mner.data import Sample

NONE = "O"  # row/column name for "no overlapping entity"


def conll_text(samples: Sequence[Sample], preds: Sequence[Sequence[str]]) -> str:
    """``token<TAB>gold<TAB>pred`` lines, a blank line after each sentence (conlleval input)."""
    lines: list[str] = []
    for s, p in zip(samples, preds):
        if len(p) != len(s.tokens):
            raise ValueError(f"sample {s.sample_id}: {len(p)} predicted tags for {len(s.tokens)} tokens")
        lines.extend(f"{tok}\t{g}\t{q}" for tok, g, q in zip(s.tokens, s.tags, p))
        lines.append("")
    return "\n".join(lines) + ("\n" if lines else "")


def split_metrics(samples: Sequence[Sample], preds: Sequence[Sequence[str]], n_kept: Sequence[int],
                  n_image_fallbacks: int) -> dict[str, Any]:
    """Micro P/R/F1, per-type scores and counts of one split."""
    scores = entity_scores([s.tags for s in samples], preds)
    m = scores["micro"]
    truncated = [len(s.tokens) - k for s, k in zip(samples, n_kept)]
    return {
        "precision": m["precision"], "recall": m["recall"], "f1": m["f1"],
        "per_type": {t: {k: v[k] for k in ("precision", "recall", "f1", "n_gold", "n_pred")}
                     for t, v in scores["per_type"].items()},
        "counts": {"sentences": len(samples), "words": sum(len(s.tokens) for s in samples),
                   "gold_entities": m["n_gold"], "pred_entities": m["n_pred"], "correct_entities": m["tp"],
                   "truncated_words": sum(truncated), "truncated_sentences": sum(1 for t in truncated if t),
                   "image_fallbacks": n_image_fallbacks},
    }


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The metrics-file part of a full report: the F1 of each split, and on test the F1 of
    each type (``{"test": {"f1", "per_type": {type: f1}}, "valid": {"f1"}}``)."""
    out: dict[str, Any] = {split: {"f1": report[split]["f1"]} for split in ("valid", "test") if split in report}
    if "test" in out:
        out["test"]["per_type"] = {t: v["f1"] for t, v in report["test"]["per_type"].items()}
    return out



def confusion_table(pairs: Sequence[tuple[str, str]], types: Sequence[str]) -> tuple[list[str], list[list[int]]]:
    """Labels (types then ``O``) and counts[gold][pred]."""
    labels = list(types) + [t for t in sorted({x for p in pairs for x in p}) if t not in types and t != NONE] + [NONE]
    c = Counter(pairs)
    return labels, [[c[(g, p)] for p in labels] for g in labels]


def write_confusion_csv(path: Path, pairs: Sequence[tuple[str, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["gold", "predicted"])
        w.writerows(sorted(pairs))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(path: Path, labels: Sequence[str], counts: Sequence[Sequence[int]], title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(labels), 0.8 + 0.7 * len(labels)))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted type")
    ax.set_ylabel("gold type")
    top = max((max(r) for r in counts), default=0)
    for i, row in enumerate(counts):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if top and v > top / 2 else "black")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def plot_f1_per_type(path: Path, per_type: dict[str, dict], title: str) -> None:
    plt = _plt()
    types = sorted(per_type)
    f1 = [per_type[t]["f1"] for t in types]
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * max(1, len(types)), 3.2))
    bars = ax.bar(types, f1, color="tab:blue")
    for b, t in zip(bars, types):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.01, f"{b.get_height():.2f}\n(n={per_type[t]['n_gold']})",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("entity F1")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def evaluate_on_caches(dataset: str, model_dir: str | Path, pred_dir: str | Path, metrics_path: str | Path,
                       plots_dir: str | Path, splits: Sequence[str] = ("valid", "test"),
                       batch_size: int = 64, progress: bool = True, threads: int = 1) -> dict[str, Any]:
    """Predict ``splits`` with the checkpoint in ``model_dir`` and write every output."""
    from pipeline.extract.common import setup_torch
    from pipeline.mner.data import make_collate, open_caches, type_prompt_tensor
    from pipeline.mner.train import load_checkpoint, predict

    setup_torch(threads)
    model, meta = load_checkpoint(model_dir)
    cfg = model.cfg
    caches = open_caches(dataset, cfg.uses_patches, cfg.uses_regions)
    now = caches.provenance()
    if meta.get("inputs") and meta["inputs"] != now:
        diff = sorted(k for k in set(now) | set(meta["inputs"]) if now.get(k) != meta["inputs"].get(k))
        raise RuntimeError(f"{model_dir}: the model was trained on other caches ({', '.join(diff)} changed); "
                           f"retrain it (dvc repro train@{dataset})")
    if sorted(caches.text.types) != list(cfg.types):
        raise RuntimeError(f"{model_dir}: model types {cfg.types} differ from the text cache's {sorted(caches.text.types)}")
    tag_index = {t: i for i, t in enumerate(cfg.tags)}
    collate_fn = make_collate(type_prompt_tensor(caches.text.type_prompts, cfg.types))
    pred_dir, plots_dir = Path(pred_dir), Path(plots_dir)
    report: dict[str, Any] = {"model": {"best_epoch": meta.get("best_epoch"), "types": list(cfg.types),
                                        "use_image": cfg.use_image, "use_patches": cfg.use_patches,
                                        "use_regions": cfg.use_regions, "tune_top": cfg.tune_top,
                                        "char_dim": cfg.char_dim, "shape_dim": cfg.shape_dim,
                                        "text_layers": list(cfg.text_layers)}}
    pred_dir.mkdir(parents=True, exist_ok=True)
    plots_dir.mkdir(parents=True, exist_ok=True)
    for split in splits:
        # each item is read once: no item cache (kept_words() uses the counts recorded on reading)
        ds = caches.dataset_for(split, tag_index, chars=bool(cfg.char_dim or cfg.shape_dim), states=bool(cfg.tune_top),
                                cache=False)
        preds = predict(model, ds, collate_fn, batch_size, progress=progress)
        samples = ds.samples
        with atomic_path(pred_dir / f"{split}.conll") as tmp:
            tmp.write_text(conll_text(samples, preds), encoding="utf-8")
        report[split] = split_metrics(samples, preds, ds.kept_words(), ds.n_image_fallbacks)
        pairs = type_confusion([s.tags for s in samples], preds, none=NONE)
        write_confusion_csv(plots_dir / f"{split}_confusion.csv", pairs)
        labels, counts = confusion_table(pairs, cfg.types)
        plot_confusion(plots_dir / f"{split}_confusion.png", labels, counts, f"{dataset} {split}: gold vs predicted type")
        plot_f1_per_type(plots_dir / f"{split}_f1_per_type.png", report[split]["per_type"],
                         f"{dataset} {split}: F1 per type (micro {report[split]['f1']:.3f})")
    report["inputs"] = now  # provenance: the fingerprints of the caches the scores come from
    write_json(details_path(metrics_path), report)
    write_json(metrics_path, headline(report))
    return report

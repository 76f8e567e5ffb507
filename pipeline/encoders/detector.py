"""Object regions: a frozen torchvision Faster R-CNN, or boxes shipped with the dataset.

``load_detector(params["detector"])`` builds ``detector.arch`` with ``weights=None,
weights_backbone=None`` (nothing is downloaded) and loads a LOCAL state dict from
``detector.checkpoint`` (``random-init`` allowed: fixed seed, recorded as such; its boxes are
junk, which is fine for the demo). ``detect`` returns per image the boxes in pixels, the
COCO category ids (torchvision numbering, ``COCO_CATEGORIES[label]`` is the name) and the
scores, best first, at most ``detector.topk``.

``detector.source: annotations`` reads ``boxes.jsonl`` of the dataset instead: one line per
image ``{"image_id", "boxes": [[x1, y1, x2, y2], ...] (pixels), "labels": [COCO names]}``.

Regions are stored padded to K = ``detector.topk`` slots with a mask (``pad_regions``);
boxes are normalised to [0, 1] as x1 y1 x2 y2 by the image width and height.

The detector always runs fp32: under bfloat16 autocast it is about 1.6 times faster on CPU
but keeps other boxes (``python -m bench.extract --detector``; README, "Storage precision and bf16").
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import RANDOM_INIT, sha256_file
from pipeline.paths import project_path

ARCHS = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
)
SOURCES = ("fasterrcnn", "annotations")
NUM_COCO_CLASSES = 91  # torchvision's COCO numbering, background = 0, 'N/A' gaps included
RANDOM_INIT_SEED = 0


class DetectorError(RuntimeError):
    """Detector params or an annotations file that cannot be used."""


def coco_categories() -> list[str]:
    """torchvision's COCO category names; the index is the label id (0 = background)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


def coco_name_to_id() -> dict[str, int]:
    """COCO category name -> torchvision label id (background and 'N/A' gaps excluded)."""
    return {n: i for i, n in enumerate(coco_categories()) if i > 0 and n != "N/A"}


@dataclass
class Detector:
    """A frozen Faster R-CNN with the settings that shaped it."""

    model: torch.nn.Module
    provenance: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def detector_settings(params_detector: Mapping[str, Any]) -> dict[str, Any]:
    """Validated detector knobs that shape the regions (used in provenance and fingerprints)."""
    source = str(params_detector["source"])
    if source not in SOURCES:
        raise DetectorError(f"params.yaml: detector.source: must be one of {', '.join(SOURCES)}, got {source!r}")
    topk = params_detector["topk"]
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise DetectorError(f"params.yaml: detector.topk: must be a positive integer, got {topk!r}")
    out: dict[str, Any] = {"source": source, "topk": int(topk)}
    if source == "fasterrcnn":
        arch = str(params_detector["arch"])
        if arch not in ARCHS:
            raise DetectorError(f"params.yaml: detector.arch: must be one of {', '.join(ARCHS)}, got {arch!r}")
        score = float(params_detector["score_thresh"])
        nms = float(params_detector["nms_iou"])
        if not 0.0 <= score <= 1.0:
            raise DetectorError(f"params.yaml: detector.score_thresh: must lie in [0, 1], got {score}")
        if not 0.0 < nms <= 1.0:
            raise DetectorError(f"params.yaml: detector.nms_iou: must lie in (0, 1], got {nms}")
        out.update(arch=arch, checkpoint=str(params_detector["checkpoint"] or RANDOM_INIT),
                   score_thresh=score, nms_iou=nms)
    return out


def load_detector(params_detector: Mapping[str, Any], device: str = "cpu") -> Detector:
    """Build ``detector.arch`` from a local state dict (or random-init), frozen, in eval mode."""
    from torchvision.models import detection

    s = detector_settings(params_detector)
    if s["source"] != "fasterrcnn":
        raise DetectorError("params.yaml: detector.source is 'annotations'; no detector model to load")
    kwargs = dict(weights=None, weights_backbone=None, num_classes=NUM_COCO_CLASSES,
                  box_score_thresh=s["score_thresh"], box_nms_thresh=s["nms_iou"],
                  box_detections_per_img=s["topk"])
    builder = getattr(detection, s["arch"])
    checkpoint = s["checkpoint"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = builder(**kwargs)
    if checkpoint == RANDOM_INIT:
        weights = {"checkpoint": RANDOM_INIT, "sha256": RANDOM_INIT, "seed": RANDOM_INIT_SEED}
        logging.getLogger(__name__).warning("detector: random-init %s; its regions are junk", s["arch"])
    else:
        path = project_path(checkpoint)
        if not path.is_file():
            raise DetectorError(f"params.yaml: detector.checkpoint: file {path} not found "
                                f"(a local torchvision state dict for {s['arch']}, or random-init)")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]  # torchvision reference-scripts checkpoints
            model.load_state_dict(state, strict=True)
        except Exception as e:
            raise DetectorError(f"params.yaml: detector.checkpoint: cannot load {path} into {s['arch']} "
                                f"({type(e).__name__}: {e})") from e
        weights = {"checkpoint": checkpoint, "sha256": sha256_file(path)}
    model = model.to(device).eval().requires_grad_(False)
    prov = {k: v for k, v in s.items() if k != "checkpoint"} | {"weights": weights}
    return Detector(model=model, provenance=prov, device=torch.device(device))


@torch.inference_mode()
def detect(model: torch.nn.Module | Detector, images: Sequence[torch.Tensor]
           ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Images (3, H, W) float in [0, 1] -> per image (boxes (n, 4) px x1y1x2y2, labels (n,), scores (n,)).

    torchvision applies the score threshold, NMS and the per-image cap and returns the
    detections sorted by score, best first.
    """
    if isinstance(model, Detector):
        device, model = model.device, model.model
    else:
        device = next(model.parameters()).device
    if not images:
        return []
    outs = model([im.to(device) for im in images])
    return [(o["boxes"].float().cpu().numpy().astype(np.float32), o["labels"].cpu().numpy().astype(np.int64),
             o["scores"].float().cpu().numpy().astype(np.float32)) for o in outs]


# ---- boxes shipped with the dataset ---------------------------------------------------------

@dataclass
class Annotation:
    """Boxes of one image from boxes.jsonl (pixels) with torchvision COCO label ids."""

    boxes: np.ndarray   # (n, 4) float32, pixels x1 y1 x2 y2
    labels: np.ndarray  # (n,) int64


def read_annotations(path: str | Path) -> dict[str, Annotation]:
    """Read a boxes.jsonl file; errors name the file and line. Labels: COCO names (or ids)."""
    path = Path(path)
    if not path.is_file():
        raise DetectorError(f"{path}: annotations file not found (detector.source: annotations)")
    name_to_id = coco_name_to_id()
    out: dict[str, Annotation] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DetectorError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "image_id" not in rec:
                raise DetectorError(f"{where}: expected an object with image_id, boxes, labels")
            image_id = str(rec["image_id"])
            boxes, labels = rec.get("boxes") or [], rec.get("labels") or []
            if len(boxes) != len(labels):
                raise DetectorError(f"{where}: {len(boxes)} boxes but {len(labels)} labels")
            ids = []
            for lab in labels:
                if isinstance(lab, int) and not isinstance(lab, bool) and 0 < lab < NUM_COCO_CLASSES:
                    ids.append(lab)
                elif isinstance(lab, str) and lab in name_to_id:
                    ids.append(name_to_id[lab])
                else:
                    raise DetectorError(f"{where}: label {lab!r} is not a COCO category name "
                                        f"(torchvision FasterRCNN_ResNet50_FPN_Weights.COCO_V1 categories)")
            try:
                arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
            except (ValueError, TypeError):
                raise DetectorError(f"{where}: boxes must be a list of [x1, y1, x2, y2]") from None
            if not np.isfinite(arr).all():
                raise DetectorError(f"{where}: boxes contain NaN or infinity")
            if image_id in out:
                raise DetectorError(f"{where}: image_id {image_id!r} appears twice")
            out[image_id] = Annotation(arr.astype(np.float32), np.asarray(ids, dtype=np.int64))
    return out


def annotations_sha(path: str | Path) -> str:
    return sha256_file(path)


# ---- geometry and padding -------------------------------------------------------------------

def clip_boxes(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip pixel boxes to the image; returns (clipped (n, 4), keep (n,) bool: positive area)."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, width)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, height)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return b, keep


def normalise_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel x1y1x2y2 (n, 4) -> [0, 1] x1y1x2y2 (n, 4) float32, divided by width / height."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=np.float64)
    return np.clip(b / scale, 0.0, 1.0).astype(np.float32)


def crop_box(box: Sequence[float]) -> tuple[int, int, int, int]:
    """Pixel crop rectangle of a (clipped, positive-area) box: floor the start, ceil the end."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left, top = math.floor(x1), math.floor(y1)
    right, bottom = max(math.ceil(x2), left + 1), max(math.ceil(y2), top + 1)
    return left, top, right, bottom


def empty_regions(k: int, d: int) -> dict[str, np.ndarray]:
    """All-masked region slots for one image: feats (K, D), boxes (K, 4), labels, scores, mask (K,)."""
    return {"feats": np.zeros((k, d), np.float32), "boxes": np.zeros((k, 4), np.float32),
            "labels": np.zeros((k,), np.int64), "scores": np.zeros((k,), np.float32),
            "mask": np.zeros((k,), bool)}


def pad_regions(feats: np.ndarray, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                k: int) -> dict[str, np.ndarray]:
    """n <= k regions -> K padded slots; slots past n are zero with mask False."""
    n = len(boxes)
    if n > k:
        raise ValueError(f"{n} regions for {k} slots; cut before padding")
    d = feats.shape[1] if feats.ndim == 2 else 0
    out = empty_regions(k, d)
    if n:
        out["feats"][:n] = feats
        out["boxes"][:n] = boxes
        out["labels"][:n] = labels
        out["scores"][:n] = scores
        out["mask"][:n] = True
    return out

"""Shared pieces of the extraction drivers: paths, run reports, torch set-up, param checks.

Every extraction stage writes its run report to ``reports/<dataset>/<stage>.json``
(``<stage>-shard-IIII-of-NNNN.json`` when run as one of several shard workers): counts,
fallbacks, seconds and items/s. The caches themselves carry no timings, so a rerun that
computes the same features leaves them byte-identical and nothing downstream reruns.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import report_path, write_json
from pipeline.paths import project_path

PACKAGES = ("torch", "torchvision", "open_clip_torch", "transformers", "pillow", "numpy", "h5py", "pyarrow")


class ExtractError(RuntimeError):
    """Inputs or params that an extraction stage cannot work with."""


# ---- small shared helpers -----------------------------------------------------------------------

def prepared_dir(dataset: str) -> Path:
    return project_path(f"data/prepared/{dataset}")


def features_dir(dataset: str, kind: str) -> Path:
    return project_path(f"features/{dataset}/{kind}")


def stage_report_path(dataset: str, stage: str, shard_index: int = 0, shard_count: int = 1) -> Path:
    """``reports/<ds>/<stage>.json``, or ``<stage>-shard-IIII-of-NNNN.json`` for one of several workers."""
    part = "" if shard_count == 1 else f"shard-{shard_index:04d}-of-{shard_count:04d}"
    return report_path(dataset, stage, part)


def shards_line(r: Mapping[str, Any]) -> str:
    """How a shard run went, for a stage's closing line: written, skipped and (if any)
    rewritten because they failed verification."""
    failed = len(r.get("shards_failed_verification") or {})
    again = f" ({failed} of them failed verification and were rewritten)" if failed else ""
    return f"{r['shards_written']} shards written{again}, {r['shards_skipped']} skipped"


def write_report(dataset: str, stage: str, report: Mapping[str, Any], shard_index: int = 0,
                 shard_count: int = 1) -> Path:
    """Atomically write a stage's run report under reports/."""
    return write_json(stage_report_path(dataset, stage, shard_index, shard_count), dict(report))


def setup_torch(threads: int | None) -> None:
    """Intra-op threads for the forward passes (0 or None: torch's default)."""
    if threads:
        torch.set_num_threads(int(threads))


def resolve_device(device: str | None, param: str = "clip.device") -> str:
    """``cuda`` becomes ``cuda:<LOCAL_RANK>`` under torchrun; a missing GPU is a clear error naming ``param``."""
    device = str(device or "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ExtractError(f"params.yaml: {param}: {device!r} but no CUDA device is available")
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExtractError(f"params.yaml: {name}: must be a positive integer, got {value!r}")
    return value


def non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ExtractError(f"params.yaml: {name}: must be an integer >= 0, got {value!r}")
    return value

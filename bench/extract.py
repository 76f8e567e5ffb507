"""Benchmark: image feature extraction, naive loop vs this pipeline vs the bare forward pass.

    python -m bench.extract [--model ViT-B-32] [--images 512] [--batch-size 32] [--workers 1] [--threads 2]

Generates its own JPEGs (default 512 of 640x480) in a temp dir, then measures in ONE process:

(a) naive: a per-image loop as the seed does it: open, convert, preprocess, forward one image
    (under torch.no_grad), no batching, no overlap;
(b) pipeline: ``pipeline.extract.images.extract_patches`` on a prepared manifest of the same images:
    DataLoader workers decode while the model runs batches in inference mode, shards written
    to HDF5 (the shard loop's items/s; hashing + planning reported separately);
(c) forward only: the same model on pre-decoded, pre-processed batches of the same size.

Prints images/s of each and the ratios b/a and b/c. The model is an open_clip architecture
(default ViT-B-32, random-init: no weights are downloaded; speed does not depend on the
weights) or ``--model demo-tiny-vit``; ``--checkpoint`` takes a local file.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image


def make_images(folder: Path, n: int, width: int, height: int, seed: int = 0) -> list[Path]:
    """``n`` photo-like JPEGs (smooth colour fields plus noise) of width x height."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        low = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((width, height), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(height, width, 3), dtype=np.int16)
        p = folder / f"{i:06d}.jpg"
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p, quality=88)
        paths.append(p)
    return paths


def naive_loop(bundle, paths: list[Path]) -> float:
    """(a) images/s of open + preprocess + forward, one image at a time."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in paths:
            img = Image.open(p).convert("RGB")
            x = bundle.preprocess(img).unsqueeze(0)  # (1, 3, S, S)
            bundle.model.visual(x)  # (pooled (1, D), tokens (1, P, W))
    return len(paths) / (time.perf_counter() - t0)


def forward_only(bundle, paths: list[Path], batch_size: int) -> float:
    """(c) images/s of the forward pass alone on pre-decoded batches."""
    from pipeline.encoders.clip import encode_images

    pixels = torch.stack([bundle.preprocess(Image.open(p).convert("RGB")) for p in paths])  # (N, 3, S, S)
    batches = list(pixels.split(batch_size))
    t0 = time.perf_counter()
    for b in batches:
        encode_images(bundle, b)
    return len(paths) / (time.perf_counter() - t0)


def pipeline_run(root: Path, paths: list[Path], clip_params: dict, shard_size: int) -> dict:
    """(b) this pipeline's patches extraction on a manifest of ``paths`` (fresh output dir)."""
    from pipeline.artifacts import write_parquet
    from pipeline.extract.images import extract_patches
    from pipeline.params import Params

    rows = [{"image_id": p.stem, "path": str(p.relative_to(root)), "status": "ok", "is_fallback": False} for p in paths]
    write_parquet(pa.Table.from_pylist(rows), root / "data/prepared/bench/images.parquet", {"bench": True})
    data = {"datasets": {"bench": {"kind": "mner"}},
            "images": {"fallback": "blank", "max_pixels": 89478485, "min_side": 4},
            "shards": {"size": shard_size}, "clip": clip_params}
    params = Params(data, ["datasets.bench", "images", "shards", "clip"], "patches")
    return extract_patches("bench", params, out_dir=root / "features/bench/patches")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip model name (default ViT-B-32) or demo-tiny-vit")
    ap.add_argument("--checkpoint", default="random-init", help="local checkpoint file (default random-init)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader decoding workers for (b)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads for all three")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = ap.parse_args()

    from pipeline.encoders.clip import encode_images, load_clip

    torch.set_num_threads(args.threads)
    clip_params = {"model": args.model, "checkpoint": args.checkpoint, "trusted_torchscript": False,
                   "batch_size": args.batch_size, "workers": args.workers, "device": args.device,
                   "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        root = Path(tmp)
        os.environ["PIPELINE_ROOT"] = str(root)
        t = time.perf_counter()
        paths = make_images(root / "images", args.images, args.width, args.height)
        print(f"generated {len(paths)} JPEGs {args.width}x{args.height} in {time.perf_counter() - t:.1f}s "
              f"({sum(p.stat().st_size for p in paths) / len(paths) / 1024:.0f} KiB each)")
        bundle = load_clip(clip_params, device=args.device)
        s = bundle.image_size[0]
        with torch.no_grad():  # warm-up: allocator and oneDNN primitives for both batch shapes
            for bs in (1, args.batch_size):
                encode_images(bundle, torch.zeros(bs, 3, s, s))
        c = forward_only(bundle, paths, args.batch_size)
        print(f"(c) forward only, batches of {args.batch_size}: {c:8.2f} img/s")
        report = pipeline_run(root, paths, clip_params, args.shard_size)
        b = report["items_per_s"]
        overhead = report["seconds_total"] - report["seconds"]
        print(f"(b) pipeline (workers={args.workers}, batch={args.batch_size}, shards of {args.shard_size}): "
              f"{b:8.2f} img/s  [+{overhead:.1f}s model load, image hashing, planning]")
        a = naive_loop(bundle, paths)
        print(f"(a) naive per-image loop:            {a:8.2f} img/s")
        figures = {"model": args.model, "checkpoint": args.checkpoint, "device": args.device,
                   "threads": args.threads, "workers": args.workers, "batch_size": args.batch_size,
                   "images": args.images, "size": [args.width, args.height],
                   "a_naive_img_s": round(a, 2), "b_pipeline_img_s": round(b, 2), "c_forward_img_s": round(c, 2),
                   "b_over_a": round(b / a, 2), "b_over_c": round(b / c, 2)}
        print(f"b/a = {b / a:.2f}   b/c = {b / c:.2f}   (targets on CPU: b/a >= 3, b/c >= 0.8)")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

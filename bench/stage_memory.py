"""Benchmark: peak memory of the `train` and `evaluate` stages against dataset size (prints figures; not a test).

    python -m bench.stage_memory [--sizes 10000 100000] [--dir DIR]

For each size N a throw-away project (``PIPELINE_ROOT``) gets synthetic sentences: a text
cache written by the real writer (``write_text_features``, fed by a generator; the encoder is
not run, random float32 rows of the shape ``bench.text_memory`` uses: 1..19 kept words of 2
layers x 64 floats) and a prepared ``samples.parquet`` (80 % train, 10 % valid, 10 % test)
with an empty image manifest, so the model is text-only (``fusion.use_image`` false, as a
dataset without images trains). Then, each in its own subprocess with 1 torch thread, whose
peak RSS (``VmHWM``) is printed:

(a) train: the real ``train_on_caches`` for one epoch (shuffled reads through ``MNERDataset``
    and ``collate``, then the valid split predicted), a tiny model (hidden 16, 1 layer);
(b) evaluate: the real ``evaluate_on_caches`` on valid and test (predictions, reports, plots).

Target: peak RSS within 20 % from the smallest to the largest size.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.text_memory import D, L, peak_rss_mb, run_json_child

DATASET = "bench"
TYPES = ("PER", "LOC", "ORG", "OTHER")
WORDS = ("the", "Paris", "match", "@user", "#news", "Obama", "said", "in", "London", "today")


def sample_id(i: int) -> str:
    return f"s-{i:07d}"


def n_kept(i: int) -> int:
    return 1 + (i * 7919) % 19  # 1..19 words, as bench.text_memory


def text_rows(n: int):
    import numpy as np

    for i in range(n):
        k = n_kept(i)
        rng = np.random.default_rng(i)
        yield {"sample_id": sample_id(i), "n_words": k, "feats": rng.standard_normal((k, L, D), np.float32)}


def write_project(root: Path, n: int) -> dict:
    """features/bench/text and data/prepared/bench/{samples,images}.parquet under ``root``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.stores.tables import write_text_features

    prompts = {t: np.ones((L, D), np.float32) for t in TYPES}
    t0 = time.perf_counter()
    write_text_features(root / "features" / DATASET / "text", text_rows(n), prompts, {"bench": "stage_memory"})
    prepared = root / "data" / "prepared" / DATASET
    prepared.mkdir(parents=True, exist_ok=True)
    tags_cycle = ("O", "B-PER", "O", "B-LOC", "I-LOC", "O", "B-ORG", "O", "B-OTHER", "O")
    with pq.ParquetWriter(prepared / "samples.parquet", pa.schema([
            ("sample_id", pa.string()), ("image_id", pa.string()), ("split", pa.string()),
            ("tokens", pa.list_(pa.string())), ("tags", pa.list_(pa.string()))])) as w:
        for a in range(0, n, 10_000):
            ids = range(a, min(n, a + 10_000))
            w.write_table(pa.table({
                "sample_id": [sample_id(i) for i in ids], "image_id": [f"img-{i}" for i in ids],
                "split": ["train" if i % 10 < 8 else "valid" if i % 10 == 8 else "test" for i in ids],
                "tokens": [[WORDS[(i + j) % len(WORDS)] for j in range(n_kept(i))] for i in ids],
                "tags": [[tags_cycle[(i + j) % len(tags_cycle)] for j in range(n_kept(i))] for i in ids]}))
    pq.write_table(pa.table({"image_id": pa.array([], pa.string()), "is_fallback": pa.array([], pa.bool_())}),
                   prepared / "images.parquet")
    return {"seconds": time.perf_counter() - t0,
            "file_mb": (root / "features" / DATASET / "text" / "words.parquet").stat().st_size / 1e6}


def params() -> dict:
    import yaml

    full = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    fusion = {**full["fusion"], "hidden": 16, "layers": 1, "heads": 2, "slots_per_type": 1, "use_image": False}
    train = {**full["train"], "epochs": 1, "threads": 1}
    return {"fusion": fusion, "train": train, "align": full["align"]}


def child(args: argparse.Namespace) -> dict:
    root = Path(args.dir)
    os.environ["PIPELINE_ROOT"] = str(root)
    out: dict = {}
    t0 = time.perf_counter()
    if args.child == "write":
        out.update(write_project(root, args.n))
    elif args.child == "baseline":
        import pipeline.mner.evaluate  # noqa: F401
        import pipeline.mner.train  # noqa: F401
        import torch  # noqa: F401
    elif args.child == "train":
        from pipeline.mner.train import train_on_caches

        p = params()
        res = train_on_caches(DATASET, p["fusion"], p["train"], p["align"], model_dir=root / "models" / DATASET,
                              live_dir=None, progress=False)
        out["valid_f1"] = res.best_valid["micro"]["f1"]
        out["train_samples"] = res.counts["train_samples"]
    else:
        from pipeline.mner.evaluate import evaluate_on_caches

        rep = evaluate_on_caches(DATASET, root / "models" / DATASET, root / "predictions" / DATASET,
                                 root / "metrics" / DATASET / "mner.json", root / "plots" / DATASET,
                                 progress=False, threads=1)
        out["test_f1"] = rep["test"]["f1"]
        out["test_sentences"] = rep["test"]["counts"]["sentences"]
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def run_child(step: str, n: int, d: Path) -> dict:
    return run_json_child("bench.stage_memory", "--child", step, "--n", str(n), "--dir", str(d))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dir", help="work dir (default: a temp dir, removed at the end)")
    ap.add_argument("--child", choices=["baseline", "write", "train", "evaluate"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    from pipeline.mner.data import ITEM_CACHE_BYTES

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="stage_memory."))
    load = os.getloadavg()
    print(f"load: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores; "
          f"item cache {ITEM_CACHE_BYTES >> 20} MiB per dataset; 1 torch thread", flush=True)
    base = run_child("baseline", 0, root)
    print(f"interpreter + torch + pipeline.mner alone: {base['peak_rss_mb']:.0f} MB\n")
    print(f"{'N':>8} {'file MB':>8} {'write s':>8} | {'train MB':>8} {'s':>6} | {'evaluate MB':>11} {'s':>6}", flush=True)
    results: dict = {}
    try:
        for n in args.sizes:
            d = root / f"n{n}"
            shutil.rmtree(d, ignore_errors=True)
            w = run_child("write", n, d)
            t = run_child("train", n, d)
            e = run_child("evaluate", n, d)
            results[n] = (t, e)
            print(f"{n:>8} {w['file_mb']:>8.0f} {w['seconds']:>8.1f} | {t['peak_rss_mb']:>8.0f} {t['seconds']:>6.1f} | "
                  f"{e['peak_rss_mb']:>11.0f} {e['seconds']:>6.1f}", flush=True)
            shutil.rmtree(d, ignore_errors=True)
        lo, hi = min(args.sizes), max(args.sizes)
        r = [results[hi][j]["peak_rss_mb"] / results[lo][j]["peak_rss_mb"] for j in range(2)]
        load = os.getloadavg()
        print(f"\npeak RSS at {hi} / at {lo} (target <= 1.20): train {r[0]:.3f}  evaluate {r[1]:.3f}  -> "
              f"{'within' if max(r) <= 1.2 else 'OVER'} the target (load now {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

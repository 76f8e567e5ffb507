"""Peak memory of the retrieve job with `retrieval.index: ivfpq`, gallery memory-mapped vs loaded.

    python -m bench.retrieve_memory [--sizes 200000 1000000] [--queries 1000] [--dir DIR]

For each size N a synthetic project is written (not timed): N 512-d image embeddings
(bench/retrieval.py's clustered data, its defaults) in HDF5 shards (100k rows a shard, as the patches stage writes them, in shuffled order), a test split
of N images and ``--queries`` captions in the caption cache. Then, in a fresh subprocess per
mode, the text-to-image half of the retrieve stage runs: ``load_retrieval_set`` (``loaded``:
as before, every embedding read into RAM; ``memmapped``: streamed into float32 .npy files in a
temp dir and memory-mapped, what the stage now does for ivfpq), then IVF-PQ build over the N
images, search of the queries (pool 128, rescore 8) and the recall check. Image-to-text (N
image queries against the ``--queries`` captions) is left out: it would only add search time.

Printed per run: ``VmHWM`` (peak resident set, read by the child at its end; it counts the file
pages of a memory-map the process touched, which the kernel can drop under pressure), the
peak anonymous memory (``RssAnon``, sampled by the parent every 0.1 s: what must fit in RAM),
load and build seconds, q/s and recall@pool. Not a test: figures go to the README by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM, SLOTS, SHARD_ROWS, DATASET = 512, 2, 100_000, "bench"
PARAMS = {"index": "ivfpq", "pool": 128, "nlist": 2048, "nprobe": 32, "hnsw_m": 32, "ef_search": 256,
          "ef_construction": 40, "pq_m": 64, "pq_bits": 4, "pq_rescore": 8, "recall_check": 100,
          "threads": 1, "batch_size": 1024}


def make_project(root: Path, n: int, n_q: int, seed: int = 0) -> None:
    """data/prepared/bench + features/bench/{patches,captions}: n images (clustered unit-ish vectors),
    n_q captions near random images."""
    import pyarrow as pa

    from pipeline.artifacts import write_parquet
    from pipeline.stores.shards import write_shard
    from pipeline.stores.tables import CaptionFeaturesWriter

    from bench.retrieval import make_gallery, noisy

    rng = np.random.default_rng(seed)
    gallery = make_gallery(n, DIM, 32, 1000, 0.7, rng)  # bench/retrieval.py's data (its defaults)
    ids = [f"i{i:08d}" for i in range(n)]
    target = np.sort(rng.choice(n, n_q, replace=False))
    caps = [f"c{j:06d}" for j in range(n_q)]
    prep = root / "data" / "prepared" / DATASET
    prep.mkdir(parents=True, exist_ok=True)
    write_parquet(pa.table({"split": ["test"] * n_q, "caption_id": caps, "text": ["t"] * n_q,
                            "image_ids": [[ids[t]] for t in target], "entities": [["e"]] * n_q}),
                  prep / "captions.parquet", {})
    by_img: dict[int, list[str]] = {}
    for j, t in enumerate(target):
        by_img.setdefault(int(t), []).append(caps[j])
    write_parquet(pa.table({"split": ["test"] * n, "image_id": ids,
                            "caption_ids": [by_img.get(i, []) for i in range(n)]}), prep / "gallery.parquet", {})
    (prep / "meta.json").write_text(json.dumps({"query_id_type": "str", "image_id_type": "str"}))
    perm = rng.permutation(n)  # cache order differs from the gallery's
    for s, start in enumerate(range(0, n, SHARD_ROWS)):
        rows = perm[start:start + SHARD_ROWS]
        write_shard(root / f"features/{DATASET}/patches/shard-{s:05d}.h5", [ids[r] for r in rows],
                    {"pooled": gallery[rows]}, {"bench": "retrieve_memory"}, "fp")
    q = noisy(gallery[target], 0.5, rng)  # a caption near its image, as in bench/retrieval.py
    del gallery
    with CaptionFeaturesWriter(root / f"features/{DATASET}/captions", {"bench": "retrieve_memory"}) as w:
        w.add(caps, q, noisy(np.repeat(q[:, None, :], SLOTS, 1), 1.0, rng),
              noisy(np.repeat(q[:, None, :], SLOTS, 1), 1.0, rng), np.ones(n_q, np.int64))


def status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="utf-8") as f:
        for ln in f:
            k, _, v = ln.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


def child(root: Path, mode: str, out_dir: Path) -> None:
    from pipeline.retrieval.data import load_retrieval_set, scratch_dir
    from pipeline.retrieval.retrieve_job import retrieve_direction

    t0 = time.perf_counter()
    ctx = scratch_dir(os.environ.get("BENCH_SCRATCH")) if mode == "memmapped" else None
    scratch = ctx.__enter__() if ctx else None
    try:
        rs = load_retrieval_set(DATASET, root=root, scratch=scratch)
        load_s = time.perf_counter() - t0
        fp = rs.fingerprint()
        after_load = status()
        r = retrieve_direction("t2i", rs.caption_emb, rs.caption_ids, rs.image_emb, rs.image_ids, PARAMS,
                               out_dir, {"fp": fp})
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
    print(json.dumps({"load_s": round(load_s, 1), "after_load": after_load, "end": status(),
                      **{k: r[k] for k in ("build_s", "search_s", "queries_per_s", "recall_vs_exact", "nlist")}}))


def run(root: Path, mode: str, module: str = "bench.retrieve_memory") -> dict:
    """``python -m <module> --child <mode> --dir <root> --out <temp dir>`` in a fresh process (one BLAS
    thread), its ``RssAnon`` / ``RssFile`` sampled every 0.1 s; the JSON it prints last, with the peaks."""
    out_dir = Path(tempfile.mkdtemp(prefix="retrieve_memory.out."))
    cmd = [sys.executable, "-m", module, "--child", mode, "--dir", str(root), "--out", str(out_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=Path(__file__).resolve().parent.parent)
    peak_anon = peak_file = 0
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status", encoding="utf-8") as f:
                for ln in f:
                    if ln.startswith("RssAnon:"):
                        peak_anon = max(peak_anon, int(ln.split()[1]) * 1024)
                    elif ln.startswith("RssFile:"):
                        peak_file = max(peak_file, int(ln.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.1)
    out = p.stdout.read().decode()
    shutil.rmtree(out_dir, ignore_errors=True)
    if p.returncode:
        raise SystemExit(f"child {mode} failed ({p.returncode})")
    r = json.loads(out.strip().splitlines()[-1])
    r.update(peak_anon=peak_anon, peak_file=peak_file)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--modes", nargs="+", default=["memmapped", "loaded"])
    ap.add_argument("--dir")
    ap.add_argument("--child")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(Path(args.dir), args.child, Path(args.out))
        return
    gib = 1 << 30
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    print("| gallery | float32 | mode | peak RSS (VmHWM) | peak anon (RssAnon) | load | build | q/s | recall@128 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        root = Path(args.dir) / f"n{n}" if args.dir else Path(tempfile.mkdtemp(prefix="retrieve_memory."))
        t0 = time.perf_counter()
        make_project(root, n, args.queries)
        print(f"(project of {n} written in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        try:
            for mode in args.modes:
                r = run(root, mode)
                rec = r["recall_vs_exact"] or {}
                print(f"| {n:,} x {DIM} | {n * DIM * 4 / gib:.2f} GiB | {mode} | {r['end']['VmHWM'] / gib:.2f} GiB "
                      f"| {r['peak_anon'] / gib:.2f} GiB | {r['load_s']} s | {r['build_s']:.0f} s "
                      f"| {r['queries_per_s']} | {rec.get('at_128', float('nan')):.3f} |", flush=True)
                print(json.dumps({"n": n, "mode": mode, **r}), file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()

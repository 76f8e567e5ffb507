"""Peak memory of the rerank job, retrieval set and pools memory-mapped / streamed vs loaded.

    python -m bench.rerank_memory [--sizes 100000 400000] [--captions-per 0.025] [--modes memmapped loaded]

For each size N a synthetic project is written (not timed; bench/retrieve_memory.py's writer: N
512-d images in HDF5 shards, N x ``--captions-per`` captions with 2 slots), then the two pools
``retrieve`` would leave: t2i (a row per caption) and i2t (a row per image), 128 candidates each,
ids and float32 scores, as ``write_pool`` lays them out (query_id, item_ids, scores, provenance
with the embeddings' fingerprint). Then, in a fresh subprocess per mode, what the rerank stage
does: ``load_retrieval_set`` and ``run_rerank`` (top 20 of pool 128, AGREE's weights):
``memmapped`` (the stage now: embeddings streamed into float32 .npy files in a temp dir and
memory-mapped, pools read and queries re-ranked 1024 at a time, plain / EGR lists memory-mapped)
or ``loaded`` (the set in RAM; with the code before this change, the stage itself: pools read
whole as Python lists, rerank_all on the whole arrays). To measure the code before, run this file
from a checkout of that code (copy bench/rerank_memory.py and bench/retrieve_memory.py there).

Printed per run: peak ``RssAnon`` (sampled every 0.1 s by the parent: what must fit in RAM),
``RssAnon`` after ``load_retrieval_set`` (interpreter, libraries, ids and ground truth, plus the
embeddings when loaded), peak ``RssAnon`` while ``run_rerank`` runs (sampled in the child every
0.05 s), ``VmHWM``, seconds, and a digest of the eight prediction files (equal digests: same bytes).
Not a test: figures go to the README by hand.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.retrieve_memory import DATASET, DIM, make_project, run, status

POOL, TOP_K = 128, 20
PARAMS = {"top_k": TOP_K, "pool": POOL,
          "egr": {"pad": "agree", "t2i": {"s": 0.9, "mask": 0.1, "s1": 0.99, "prompt": 0.01},
                  "i2t": {"s": 0.8, "prompt": 0.2, "s1": 0.98, "mask": 0.02}},
          "tbr": {"absent_rank": 10000}}


def write_pools(root: Path, seed: int = 1) -> None:
    """features/bench/retrieval/{t2i,i2t}.parquet: POOL distinct candidates per query (a random start
    and stride), scores descending, with the fingerprint of the project's embeddings."""
    import pyarrow as pa

    from pipeline.artifacts import write_parquet
    from pipeline.retrieval.data import load_retrieval_set, scratch_dir

    with scratch_dir() as d:
        rs = load_retrieval_set(DATASET, root=root, scratch=d)
        fp = rs.fingerprint()
    rng = np.random.default_rng(seed)
    for name, qids, items in (("t2i", rs.caption_ids, rs.image_ids), ("i2t", rs.image_ids, rs.caption_ids)):
        q, n = len(qids), len(items)
        step = rng.integers(1, max(2, n // POOL), q)  # k x step < n: distinct items in a row
        cand = (rng.integers(0, n, q)[:, None] + np.arange(POOL)[None, :] * step[:, None]) % n  # (Q, POOL)
        scores = -np.sort(-rng.random((q, POOL), dtype=np.float32), axis=1)  # (Q, POOL) best first
        offsets = pa.array(np.arange(0, q * POOL + 1, POOL, dtype=np.int32))
        table = pa.table({"query_id": pa.array(qids, pa.string()),
                          "item_ids": pa.ListArray.from_arrays(offsets,
                                                               pa.array(items, pa.string()).take(cand.ravel())),
                          "scores": pa.ListArray.from_arrays(offsets, pa.array(scores.ravel()))})
        write_parquet(table, root / f"features/{DATASET}/retrieval/{name}.parquet",
                      {"embeddings_fingerprint": fp, "pool": POOL, "source": "zero_shot", "direction": name})


def child(root: Path, mode: str, out_dir: Path) -> None:
    import inspect

    from pipeline.retrieval.agree_io import load_id_types
    from pipeline.retrieval.data import load_retrieval_set, scratch_dir
    from pipeline.retrieval.rerank_job import run_rerank

    types = load_id_types(root / f"data/prepared/{DATASET}/meta.json")
    pools = root / f"features/{DATASET}/retrieval"
    t0 = time.perf_counter()
    with scratch_dir(os.environ.get("BENCH_SCRATCH")) as d:
        lazy = mode == "memmapped"
        rs = load_retrieval_set(DATASET, root=root, scratch=d if lazy else None)
        load_s = time.perf_counter() - t0
        after_load = status()
        kw = {"scratch": d} if lazy and "scratch" in inspect.signature(run_rerank).parameters else {}
        peak, done = [0], threading.Event()

        def sample() -> None:  # peak RssAnon of run_rerank alone (the load's peak is the parent's figure)
            while not done.is_set():
                peak[0] = max(peak[0], status()["RssAnon"])
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        r = run_rerank(rs, pools, PARAMS, types, out_dir, {"stage": "rerank"}, **kw)
        done.set()
        sampler.join()
    h = hashlib.sha256()
    for p in sorted(out_dir.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    print(json.dumps({"load_s": round(load_s, 1), "rerank_s": round(time.perf_counter() - t0 - load_s, 1),
                      "after_load": after_load, "rerank_peak_anon": peak[0], "end": status(),
                      "digest": h.hexdigest()[:16],
                      **{k: r[k] for k in ("egr_s", "tbr_s")}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000])
    ap.add_argument("--captions-per", type=float, default=0.025, help="captions per image (default 1 per 40)")
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
    print("| images | captions | pools as arrays | mode | peak anon (RssAnon) | anon after load | peak anon in "
          "run_rerank | peak RSS (VmHWM) | load | rerank | digest |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        n_q = max(1, int(n * args.captions_per))
        root = Path(args.dir) / f"n{n}" if args.dir else Path(tempfile.mkdtemp(prefix="rerank_memory."))
        t0 = time.perf_counter()
        make_project(root, n, n_q)
        write_pools(root)
        print(f"(project of {n} images, {n_q} captions and pools written in {time.perf_counter() - t0:.0f} s)",
              file=sys.stderr)
        pools = (n + n_q) * POOL * (8 + 4)  # cand int64 + scores float32, both directions
        try:
            for mode in args.modes:
                r = run(root, mode, "bench.rerank_memory")
                print(f"| {n:,} x {DIM} | {n_q:,} | {pools / gib:.2f} GiB | {mode} | {r['peak_anon'] / gib:.2f} GiB "
                      f"| {r['after_load']['RssAnon'] / gib:.2f} GiB | {r['rerank_peak_anon'] / gib:.2f} GiB "
                      f"| {r['end']['VmHWM'] / gib:.2f} GiB "
                      f"| {r['load_s']} s | {r['rerank_s']} s | {r['digest']} |", flush=True)
                print(json.dumps({"n": n, "mode": mode, **r}), file=sys.stderr, flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")


if __name__ == "__main__":
    main()

"""Retrieval benchmark (prints figures; not a test).

For galleries of N random 512-d float32 unit vectors (default 10k, 100k, 1M):

1. query throughput of FAISS IndexFlatIP vs numpy brute force (matmul + argpartition),
   top-``pool`` (128) per query;
2. IVF and HNSW: build time, query throughput, speed-up over flat, recall@10 against exact
   search, over a small sweep of nprobe / efSearch;
3. the share of EGR + TBR in text-to-image retrieval with flat search and with the fastest
   approximate setting that keeps recall@10 >= 0.95: search, EGR on the queries' pools, TBR
   on the EGR lists (the EGR+TBR list). TBR needs each candidate image's own image-to-text
   list (over the caption collection, here the query captions as in AGREE's test protocol); those back
   lists do not depend on the query and can be built with the index, so the share is shown
   with them precomputed, and again with them computed on demand (image-to-text search + EGR
   for every image in a forward list).

Data: "random" vectors with the structure of real embeddings: a mixture of ``--clusters``
Gaussians in a random ``--rank``-dim subspace, plus isotropic noise (1/4 of the signal),
normalised. Without structure (``--clusters 0``: one Gaussian of rank 32) IVF needs most
lists for recall 0.95; on isotropic 512-d Gaussians (``--rank 512 --clusters 0``) no index
reaches recall 0.95 at a 10x speed-up. Queries are noisy copies of gallery items (a caption
near its image); slot embeddings (entity prompts, masked captions) are noisier copies of the
query. HNSW is built only up to ``--hnsw-max`` items (its build dominates on 2 cores).

    python bench/retrieval.py                       # 10k, 100k, 1M
    python bench/retrieval.py --sizes 10000 --queries 500
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.retrieval.index import VectorIndex, l2_normalize, numpy_search, recall_vs_exact, set_threads  # noqa: E402
from pipeline.retrieval.rerank import (  # noqa: E402
    egr_order,
    egr_rerank,
    egr_t2i_from_embeddings,
    i2t_slot_scores,
    slot_mask,
    tbr_rerank,
)


def make_gallery(n: int, d: int, rank: int, clusters: int, spread: float, rng: np.random.Generator,
                 chunk: int = 200_000) -> np.ndarray:
    """(n, d) unit rows: a mixture of ``clusters`` Gaussians (0: one) in a random ``rank``-dim
    subspace, each point ``spread`` around its centre, plus isotropic noise 1/4 of the signal."""
    basis = rng.standard_normal((rank, d)).astype(np.float32) / np.sqrt(rank)
    centres = rng.standard_normal((max(clusters, 1), rank)).astype(np.float32) if clusters else None
    noise_std = 0.25 * np.sqrt(1 + spread**2 if clusters else 1.0)  # per-dim std of the signal x 1/4
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        z = rng.standard_normal((e - s, rank), dtype=np.float32)
        if centres is not None:
            z = centres[rng.integers(0, clusters, e - s)] + spread * z
        x = z @ basis + noise_std * rng.standard_normal((e - s, d), dtype=np.float32)
        out[s:e] = l2_normalize(x)
    return out


def noisy(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    y = x + sigma * rng.standard_normal(x.shape, dtype=np.float32) / np.sqrt(x.shape[-1])
    return l2_normalize(y.reshape(-1, x.shape[-1])).reshape(x.shape)


def clock(fn, *a, **kw):
    t0 = time.perf_counter()
    r = fn(*a, **kw)
    return r, time.perf_counter() - t0


def pipeline_share(gallery: np.ndarray, index: VectorIndex, queries: np.ndarray, mask: np.ndarray,
                   prompt: np.ndarray, pool: int, top_k: int, threads: int) -> dict[str, float]:
    """Time each part of zero-shot t2i retrieval with EGR then TBR (AGREE's zero-shot pipeline)."""
    t: dict[str, float] = {}
    Q = queries.shape[0]
    counted = slot_mask(np.full(Q, mask.shape[1]), mask.shape[1], "agree")
    (s_t2i, c_t2i), t["search_t2i"] = clock(index.search, queries, pool, 1024)
    t0 = time.perf_counter()
    S, S1 = egr_t2i_from_embeddings(gallery, c_t2i, s_t2i, mask, prompt, counted)
    egr_t2i = np.take_along_axis(c_t2i, egr_order(S, S1, s_t2i), 1)[:, :top_k]
    t["egr_t2i"] = time.perf_counter() - t0
    # back lists: the EGR image-to-text lists (over the query captions) of the images in a forward list
    t0 = time.perf_counter()
    U, inv = np.unique(egr_t2i, return_inverse=True)
    fwd = inv.reshape(Q, -1)
    img_u = gallery[U]
    cap_index = VectorIndex(queries, "flat", threads=threads, normalize=False)
    s_i2t, c_i2t = cap_index.search(img_u, pool, 1024)
    t["search_i2t_back"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    m, p = i2t_slot_scores(img_u, c_i2t, mask, prompt)
    egr_i2t = egr_rerank("i2t", c_i2t, s_i2t, m, p, counted[c_i2t], top_k)
    t["egr_i2t_back"] = time.perf_counter() - t0
    del m, p
    _, t["tbr"] = clock(tbr_rerank, fwd, egr_i2t)
    t["back_images"] = float(U.size)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rank", type=int, default=32, help="intrinsic dimension of the data")
    ap.add_argument("--clusters", type=int, default=1000, help="mixture components (0: one Gaussian)")
    ap.add_argument("--spread", type=float, default=0.7, help="within-cluster std relative to the centres")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--queries-1m", type=int, default=1000, help="queries for galleries >= 1M (time)")
    ap.add_argument("--pool", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--slots", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hnsw-max", type=int, default=100_000, help="largest gallery to build HNSW for (build time)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    threads = set_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    print(f"# retrieval bench: dim {args.dim}, intrinsic rank {args.rank}, {args.clusters} clusters "
          f"(spread {args.spread}), pool {args.pool}, top_k {args.top_k}, "
          f"slots {args.slots}, FAISS threads {threads}")
    t_all = time.perf_counter()
    for n in args.sizes:
        nq = args.queries if n < 1_000_000 else args.queries_1m
        gallery, t_gen = clock(make_gallery, n, args.dim, args.rank, args.clusters, args.spread, rng)
        q_rows = rng.choice(n, nq, replace=False)
        queries = noisy(gallery[q_rows], 0.5, rng)
        mask = noisy(np.repeat(queries[:, None, :], args.slots, 1), 1.0, rng)
        prompt = noisy(np.repeat(queries[:, None, :], args.slots, 1), 1.0, rng)
        print(f"\n## gallery {n:,} x {args.dim} ({gallery.nbytes / 2**30:.2f} GiB, made in {t_gen:.1f} s), {nq} queries")

        flat, t_b = clock(VectorIndex, gallery, "flat", threads=threads, normalize=False)
        (_, ex), t_flat = clock(flat.search, queries, args.pool, 1024)
        (_, np_ids), t_np = clock(numpy_search, gallery, queries, args.pool, 64)
        print(f"flat (IndexFlatIP)   : {nq / t_flat:10.1f} q/s  ({t_flat:.3f} s; build {t_b:.2f} s)")
        print(f"numpy (matmul+argpartition): {nq / t_np:4.1f} q/s  ({t_np:.3f} s)  -> flat is {t_np / t_flat:.2f}x numpy; "
              f"same top-10: {recall_vs_exact(np_ids, ex, 10):.4f}")
        del np_ids
        gc.collect()

        best = None  # (qps, label, index) of the fastest setting with recall@10 >= 0.95
        nlist = int(2 ** round(np.log2(2 * np.sqrt(n))))
        ivf, t_b = clock(VectorIndex, gallery, "ivf", nlist=nlist, nprobe=1, threads=threads, normalize=False,
                         ivf_niter=10, ivf_train_per_list=64)
        print(f"ivf nlist {nlist}: build {t_b:.1f} s (k-means 10 iters on {min(n, 64 * nlist):,} points, then add)")
        for nprobe in (4, 8, 16, 32, 64):
            ivf.index.nprobe = nprobe
            (_, ids), t_q = clock(ivf.search, queries, args.pool, 1024)
            r = recall_vs_exact(ids, ex, 10)
            print(f"  nprobe {nprobe:3d}: {nq / t_q:10.1f} q/s  speed-up {t_flat / t_q:6.1f}x  recall@10 {r:.4f}  "
                  f"recall@{args.pool} {recall_vs_exact(ids, ex, args.pool):.4f}")
            if r >= 0.95 and (best is None or nq / t_q > best[0]):
                best = (nq / t_q, f"ivf nprobe {nprobe}", ivf, nprobe)
        if n <= args.hnsw_max:
            hnsw, t_b = clock(VectorIndex, gallery, "hnsw", hnsw_m=32, ef_construction=40, threads=threads,
                              normalize=False)
            print(f"hnsw M 32 efConstruction 40: build {t_b:.1f} s")
            for ef in (32, 64, 128, 256):
                hnsw.index.hnsw.efSearch = ef
                (_, ids), t_q = clock(hnsw.search, queries, args.pool, 1024)
                r = recall_vs_exact(ids, ex, 10)
                print(f"  efSearch {ef:3d}: {nq / t_q:10.1f} q/s  speed-up {t_flat / t_q:6.1f}x  recall@10 {r:.4f}  "
                      f"recall@{args.pool} {recall_vs_exact(ids, ex, args.pool):.4f}")
                if r >= 0.95 and (best is None or nq / t_q > best[0]):
                    best = (nq / t_q, f"hnsw efSearch {ef}", hnsw, ef)
        else:
            print(f"hnsw: skipped (gallery > --hnsw-max {args.hnsw_max:,}: build time on {threads} threads)")
        if best is not None:
            print(f"fastest with recall@10 >= 0.95: {best[1]} ({best[0]:.1f} q/s, {best[0] * t_flat / nq:.1f}x flat)")

        runs = [("flat", flat)]
        if best is not None:
            idx = best[2]
            if idx.kind == "ivf":
                idx.index.nprobe = best[3]
            else:
                idx.index.hnsw.efSearch = best[3]
            runs.append((best[1], idx))
        for label, idx in runs:
            t = pipeline_share(gallery, idx, queries, mask, prompt, args.pool, args.top_k, threads)
            rer = t["egr_t2i"] + t["egr_i2t_back"] + t["tbr"]
            serve = t["search_t2i"] + t["egr_t2i"] + t["tbr"]
            total = serve + t["search_i2t_back"] + t["egr_i2t_back"]
            print(f"t2i + EGR + TBR with {label}: search {t['search_t2i']:.3f} s, EGR {t['egr_t2i']:.3f} s, "
                  f"TBR {t['tbr']:.4f} s -> EGR+TBR {100 * (t['egr_t2i'] + t['tbr']) / serve:.1f}% of {serve:.3f} s "
                  f"(back lists precomputed)")
            print(f"    + back lists on demand for {int(t['back_images']):,} images: search {t['search_i2t_back']:.3f} s, "
                  f"EGR {t['egr_i2t_back']:.3f} s -> EGR+TBR {100 * rer / total:.1f}% of {total:.3f} s")
        del flat, ivf, gallery, runs, best
        if n <= args.hnsw_max:
            del hnsw
        gc.collect()
    print(f"\n# total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()

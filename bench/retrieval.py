"""Retrieval benchmark (prints figures; not a test).

For galleries of N random 512-d float32 unit vectors (default 10k, 100k, 1M):

1. query throughput of FAISS IndexFlatIP vs numpy brute force (matmul + argpartition),
   top-``pool`` (128) per query;
2. IVF, HNSW and IVF-PQ (with exact re-scoring): build time, bytes per vector, query
   throughput, speed-up over flat, recall@10 and recall@pool against exact search, over a
   small sweep of nprobe / efSearch / pq_rescore. An index is judged by recall@pool: EGR and
   TBR reorder the whole pool, so what the pool loses re-ranking cannot reach;
3. the share of EGR + TBR in text-to-image retrieval with flat search and with the fastest
   approximate setting that keeps recall@pool >= 0.95: search, EGR on the queries' pools, TBR
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

4. galleries beyond RAM (``--scale-sizes``): IVF-PQ over a float32 gallery in a memory-mapped
   file (``--scale-dir``, deleted after), its resident memory per vector, build time, q/s and
   recall@pool on ``--scale-queries`` queries, and the largest gallery this machine's free
   memory and disk would hold, extrapolated from the measured bytes per vector (the run stops
   at the sizes given: other work shares the machine).

    python bench/retrieval.py                       # 10k, 100k, 1M, then IVF-PQ at 2M and 4M
    python bench/retrieval.py --sizes 10000 --queries 500 --scale-sizes
"""
from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.retrieval.index import (  # noqa: E402
    TIE_FETCH,
    VectorIndex,
    l2_normalize,
    numpy_search,
    recall_vs_exact,
    set_threads,
)
from pipeline.retrieval.rerank import (  # noqa: E402
    egr_order,
    egr_rerank,
    egr_t2i_from_embeddings,
    i2t_slot_scores,
    slot_mask,
    tbr_rerank,
)


def make_gallery(n: int, d: int, rank: int, clusters: int, spread: float, rng: np.random.Generator,
                 chunk: int = 200_000, out: np.ndarray | None = None) -> np.ndarray:
    """(n, d) unit rows: a mixture of ``clusters`` Gaussians (0: one) in a random ``rank``-dim
    subspace, each point ``spread`` around its centre, plus isotropic noise 1/4 of the signal
    (written into ``out``, e.g. a memory map, when given)."""
    basis = rng.standard_normal((rank, d)).astype(np.float32) / np.sqrt(rank)
    centres = rng.standard_normal((max(clusters, 1), rank)).astype(np.float32) if clusters else None
    noise_std = 0.25 * np.sqrt(1 + spread**2 if clusters else 1.0)  # per-dim std of the signal x 1/4
    out = np.empty((n, d), np.float32) if out is None else out
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


def rss_anon() -> int:
    """This process's resident anonymous memory in bytes (what a memory-mapped file does not count)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def mem_available() -> int:
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def index_bytes(index: VectorIndex) -> int:
    """Bytes of the FAISS index as serialised (codes, ids, centroids; the flat index: its vectors)."""
    from pipeline.retrieval.index import faiss_module

    return int(faiss_module().serialize_index(index.index).nbytes)


def exact_topk_chunked(gallery: np.ndarray, queries: np.ndarray, k: int, chunk: int = 250_000) -> np.ndarray:
    """Exact top-k ids (Q, k), best first, over a gallery read in chunks (a memory map stays out of RAM)."""
    best_s = np.full((queries.shape[0], 0), -np.inf, np.float32)
    best_i = np.zeros((queries.shape[0], 0), np.int64)
    for s in range(0, gallery.shape[0], chunk):
        sims = queries @ np.asarray(gallery[s:s + chunk]).T  # (Q, C)
        sc = np.concatenate([best_s, sims], 1)
        ids = np.concatenate([best_i, np.broadcast_to(np.arange(s, s + sims.shape[1]), sims.shape)], 1)
        top = np.argpartition(-sc, min(k, sc.shape[1] - 1), axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(sc, top, 1), np.take_along_axis(ids, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")  # best first: recall@10 reads the first 10
    return np.take_along_axis(best_i, order, 1)


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
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
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
    ap.add_argument("--target-recall", type=float, default=0.95, help="recall@pool the fastest setting must keep")
    ap.add_argument("--pq-m", type=int, default=64, help="IVF-PQ codes per vector (0: skip IVF-PQ)")
    ap.add_argument("--pq-bits", type=int, nargs="*", default=[4, 8], help="IVF-PQ code bits to build (4: fast scan)")
    ap.add_argument("--scale-sizes", type=int, nargs="*", default=[2_000_000, 4_000_000],
                    help="IVF-PQ galleries beyond the sweep, memory-mapped from --scale-dir (none: skip)")
    ap.add_argument("--scale-dir", default=None, help="where the float32 gallery files go (default: the temp dir)")
    ap.add_argument("--scale-queries", type=int, default=200)
    ap.add_argument("--scale-nprobe", type=int, default=64)
    ap.add_argument("--scale-rescore", type=int, nargs="+", default=[4, 8, 16])
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

        flat_bytes = index_bytes(flat)
        print(f"flat memory: {flat_bytes / n:.1f} bytes/vector ({flat_bytes / 2**20:.0f} MiB)")
        best = None  # (qps, label, index, knob) of the fastest setting with recall@pool >= target
        P = args.pool

        def sweep(label: str, idx: VectorIndex) -> None:
            nonlocal best
            (_, ids), t_q = clock(idx.search, queries, P, 1024)
            r10, rp = recall_vs_exact(ids, ex, 10), recall_vs_exact(ids, ex, P)
            print(f"  {label:22s}: {nq / t_q:10.1f} q/s  speed-up {t_flat / t_q:6.1f}x  recall@10 {r10:.4f}  "
                  f"recall@{P} {rp:.4f}")
            if rp >= args.target_recall and (best is None or nq / t_q > best[0]):
                best = (nq / t_q, f"{idx.kind} {label.strip()}", idx, label)

        nlist = int(2 ** round(np.log2(2 * np.sqrt(n))))
        ivf, t_b = clock(VectorIndex, gallery, "ivf", nlist=nlist, nprobe=1, threads=threads, normalize=False,
                         ivf_niter=10, ivf_train_per_list=64)
        ivf_bytes = index_bytes(ivf)
        print(f"ivf nlist {nlist}: build {t_b:.1f} s (k-means 10 iters on {min(n, 64 * nlist):,} points, then add), "
              f"{ivf_bytes / n:.1f} bytes/vector")
        for nprobe in (4, 8, 16, 32, 64, 128):
            ivf.index.nprobe = min(nprobe, nlist)
            sweep(f"nprobe {nprobe}", ivf)
        pqs = []
        for bits in (args.pq_bits if args.pq_m and args.dim % args.pq_m == 0 else []):
            base = rss_anon()
            pq, t_b = clock(VectorIndex, gallery, "ivfpq", nlist=nlist, nprobe=1, pq_m=args.pq_m, pq_bits=bits,
                            pq_rescore=1, threads=threads, normalize=False, ivf_niter=10, ivf_train_per_list=64)
            grown = rss_anon() - base
            pq_bytes = index_bytes(pq)
            pqs.append(pq)
            print(f"ivfpq nlist {nlist}, pq_m {args.pq_m} x {bits} bits{' (fast scan)' if bits == 4 else ''}: "
                  f"build {t_b:.1f} s, {pq_bytes / n:.1f} bytes/vector serialised ({flat_bytes / pq_bytes:.1f}x less "
                  f"than flat; resident growth {grown / n:.1f} B/vector), + the float32 gallery for re-scoring "
                  f"({4 * args.dim} B/vector, on disk beyond RAM)")
            grid = [(p_, r_) for p_ in (16, 32, 64, 128) for r_ in (2, 4, 8)] if bits == 4 else [(32, 4), (64, 4)]
            for nprobe, rescore in grid:
                pq.index.nprobe, pq._fetch_factor = min(nprobe, nlist), rescore
                sweep(f"{bits}b nprobe {nprobe} rescore {rescore}", pq)
        if n <= args.hnsw_max:
            hnsw, t_b = clock(VectorIndex, gallery, "hnsw", hnsw_m=32, ef_construction=40, threads=threads,
                              normalize=False)
            print(f"hnsw M 32 efConstruction 40: build {t_b:.1f} s, {index_bytes(hnsw) / n:.1f} bytes/vector "
                  f"(efSearch below pool + {TIE_FETCH} searches as pool + {TIE_FETCH})")
            for ef in (64, 128, 256, 512):
                hnsw.index.hnsw.efSearch = ef
                sweep(f"efSearch {ef}", hnsw)
        else:
            print(f"hnsw: skipped (gallery > --hnsw-max {args.hnsw_max:,}: build time on {threads} threads)")
        if best is not None:
            print(f"fastest with recall@{P} >= {args.target_recall}: {best[1]} ({best[0]:.1f} q/s, "
                  f"{best[0] * t_flat / nq:.1f}x flat)")
        else:
            print(f"no setting reached recall@{P} >= {args.target_recall}")

        runs = [("flat", flat)]
        if best is not None:
            idx, knobs = best[2], best[3].split()
            if idx.kind == "ivf":
                idx.index.nprobe = min(int(knobs[1]), nlist)
            elif idx.kind == "ivfpq":  # "4b nprobe 64 rescore 4"
                idx.index.nprobe, idx._fetch_factor = min(int(knobs[2]), nlist), int(knobs[4])
            else:
                idx.index.hnsw.efSearch = int(knobs[1])
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
        del flat, ivf, pqs, gallery, runs, best
        if n <= args.hnsw_max:
            del hnsw
        gc.collect()
    if args.scale_sizes:
        scale(args, rng, threads)
    print(f"\n# total {time.perf_counter() - t_all:.0f} s")


def scale(args: argparse.Namespace, rng: np.random.Generator, threads: int) -> None:
    """IVF-PQ over memory-mapped float32 galleries of growing size; extrapolate the largest one."""
    root = Path(tempfile.mkdtemp(prefix="retrieval-bench-", dir=args.scale_dir))
    per_vec = []
    try:
        for n in args.scale_sizes:
            need = 4 * n * args.dim
            free = shutil.disk_usage(root).free
            if need > 0.5 * free:
                print(f"\n## scale {n:,}: skipped (the float32 file needs {need / 2**30:.1f} GiB, "
                      f"half the free disk is {free / 2**31:.1f} GiB)")
                break
            path = root / f"gallery-{n}.npy"
            t0 = time.perf_counter()
            mm = np.lib.format.open_memmap(path, "w+", np.float32, (n, args.dim))
            make_gallery(n, args.dim, args.rank, args.clusters, args.spread, rng, out=mm)  # same structure
            mm.flush()
            del mm
            g = np.load(path, mmap_mode="r")
            t_gen = time.perf_counter() - t0
            q_rows = rng.choice(n, args.scale_queries, replace=False)
            queries = noisy(np.asarray(g[np.sort(q_rows)]), 0.5, rng)
            nlist = int(2 ** round(np.log2(2 * np.sqrt(n))))
            base = rss_anon()
            pq, t_b = clock(VectorIndex, g, "ivfpq", nlist=nlist, nprobe=args.scale_nprobe, pq_m=args.pq_m, pq_bits=4,
                            pq_rescore=1, threads=threads, normalize=False, ivf_niter=10,
                            ivf_train_per_list=64)
            grown = rss_anon() - base
            ser = index_bytes(pq)
            per_vec.append(max(grown, ser) / n)
            ex, t_ex = clock(exact_topk_chunked, g, queries, args.pool)
            print(f"\n## scale {n:,} x {args.dim} (float32 file {need / 2**30:.1f} GiB, made in {t_gen:.0f} s): "
                  f"ivfpq nlist {nlist} pq_m {args.pq_m} x 4 bits, build {t_b:.0f} s; index {ser / n:.1f} B/vector "
                  f"serialised, resident growth {grown / 2**20:.0f} MiB ({grown / n:.1f} B/vector); exact by chunked "
                  f"numpy over the file: {args.scale_queries / t_ex:.1f} q/s ({args.scale_queries} queries)")
            for rescore in args.scale_rescore:
                pq._fetch_factor = rescore
                (_, ids), t_q = clock(pq.search, queries, args.pool, 1024)
                print(f"  nprobe {args.scale_nprobe} rescore {rescore:2d}: {args.scale_queries / t_q:8.1f} q/s  "
                      f"recall@10 {recall_vs_exact(ids, ex, 10):.4f}  recall@{args.pool} "
                      f"{recall_vs_exact(ids, ex, args.pool):.4f}")
            del pq, g, ids, ex
            gc.collect()
            path.unlink()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if per_vec:
        bpv = max(per_vec)
        avail = mem_available()
        disk = shutil.disk_usage(args.scale_dir or tempfile.gettempdir()).free
        print(f"largest gallery: {bpv:.1f} B/vector in RAM (the larger of resident growth and serialised size, "
              f"worst of the sizes run); MemAvailable now {avail / 2**30:.1f} GiB -> about "
              f"{avail / bpv / 1e6:.0f}M vectors of codes; the float32 rows for re-scoring "
              f"({4 * args.dim} B/vector) on the free disk ({disk / 2**30:.0f} GiB) -> about "
              f"{disk / (4 * args.dim) / 1e6:.0f}M; the run stopped at {args.scale_sizes[-1]:,} (the sizes asked for)")


if __name__ == "__main__":
    main()

"""FAISS nearest-neighbour search by cosine: exact (IndexFlatIP), IVF, HNSW and IVF-PQ.

Vectors are L2-normalised to float32 first, so every score is a plain cosine. Results
come back as ``(scores (Q, k) float32, ids (Q, k) int64)``, best first; among equal
scores the smaller gallery row comes first, as a stable argsort of -scores over the whole
gallery would give (AGREE's order). FAISS leaves both open: the order of equal scores and
which of the items tied at the k-th score it returns; :meth:`VectorIndex.search` fetches
past the k-th score until the ties end, then cuts. Slots an approximate index could not
fill hold id -1 and score -inf. An approximate index is checked against exact search
with :func:`recall_vs_exact`.

Every returned score is FAISS's ``fvec_inner_product`` of the two float32 rows
(:func:`exact_scores`): IVF and HNSW compute it so; flat search (BLAS for batches of 20+
queries, whose last bits depend on the batch and the block) and IVF-PQ (approximate
codes) are re-scored with it before the cut. So one (query, item) pair has one score
whatever the index, batch or candidate set, and IVF-PQ hands re-ranking exact scores.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KINDS = ("flat", "ivf", "hnsw", "ivfpq")
BLAS_DATABASE_BLOCK = 16384  # gallery rows per BLAS block in exact search (FAISS's default: 1024)
TIE_FETCH = 8  # extra results fetched per query, to see whether ties run past the k-th score
# re-scored kinds fetch more while the last fetched exact score is within this of the k-th: far
# above the float32 gap between BLAS and fvec_inner_product (<= 1.2e-7 measured at 16-768 dims)
TIE_TOL = 1e-5
MIN_POINTS_PER_LIST = 39  # FAISS's advice for k-means: nlist is cut to N // 39 for small galleries
ADD_CHUNK = 262_144  # gallery rows added to an IVF-PQ index per call (bounds the temporaries)
EXACT_CHUNK = 65_536  # memory-mapped gallery rows per block in exact search (the recall check)
RESCORE_QUERIES = 16  # queries re-scored at a time from a memory-mapped gallery (pages released after)


def _cpu_coretype() -> str | None:
    """An OpenBLAS core type this CPU surely runs (from /proc/cpuinfo flags), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return None
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= set(flags):
        return "SkylakeX"
    if {"avx2", "fma"} <= set(flags):
        return "Haswell"
    return None


def faiss_module():
    """Import FAISS, with its bundled BLAS on fast kernels.

    The OpenBLAS 0.3.15 inside the faiss-cpu wheel does not recognise recent Xeons and falls
    back to 'Prescott' (SSE3) kernels, which made exact search ~2.5x slower than numpy on
    the development machine. Unless ``OPENBLAS_CORETYPE`` is set already, it is set (before
    FAISS loads its BLAS) to the best core type the CPU flags allow. Exact search also uses
    larger gallery blocks per BLAS call (:data:`BLAS_DATABASE_BLOCK`).
    """
    import sys

    if "faiss" not in sys.modules and "OPENBLAS_CORETYPE" not in os.environ:
        core = _cpu_coretype()
        if core:
            os.environ["OPENBLAS_CORETYPE"] = core
    import faiss

    if faiss.cvar.distance_compute_blas_database_bs == 1024:  # untouched default
        faiss.cvar.distance_compute_blas_database_bs = BLAS_DATABASE_BLOCK
    return faiss


def set_threads(n: int | None) -> int:
    """Set FAISS's OpenMP thread count (None/0: leave as is); returns the count in use."""
    faiss = faiss_module()

    if n:
        if int(n) < 1:
            raise ValueError(f"retrieval.threads must be >= 1, got {n!r}")
        faiss.omp_set_num_threads(int(n))
    return int(faiss.omp_get_max_threads())


def l2_normalize(x: np.ndarray, what: str = "vectors") -> np.ndarray:
    """A float32, C-contiguous, row-wise L2-normalised copy of ``x`` (N, D).

    All-zero rows (e.g. the zero feature of an unusable image) stay zero, so they score
    0 against everything; non-finite values are an error.
    """
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{what}: expected a 2-d array (N, D), got shape {a.shape}")
    a = np.array(a, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(a).all():
        bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
        raise ValueError(f"{what}: {bad.size} rows hold NaN/inf (first rows: {bad[:5].tolist()})")
    norms = np.linalg.norm(a, axis=1, keepdims=True)  # (N, 1)
    np.divide(a, norms, out=a, where=norms > 0)
    return a


def exact_scores(queries: np.ndarray, gallery: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact inner products of each query with its candidates: (Q, K) float32, -inf where id < 0.

    ``queries`` (Q, D) and ``gallery`` (N, D) float32 C-contiguous (a ``np.memmap`` works: only
    the candidate rows are read); ``ids`` (Q, K) rows into the gallery. FAISS's
    ``fvec_inner_product`` per pair, the arithmetic of IVFFlat, HNSW and IndexFlatIP's
    small-batch path, so a pair's score does not depend on what else is searched with it.
    """
    faiss = faiss_module()

    q = np.ascontiguousarray(queries, np.float32)
    ids = np.asarray(ids, np.int64)
    if not (isinstance(gallery, np.ndarray) and gallery.dtype == np.float32 and gallery.flags.c_contiguous):
        raise TypeError("exact_scores: gallery must be a C-contiguous float32 array (or np.memmap)")
    if ids.size and int(ids.max()) >= gallery.shape[0]:
        raise IndexError(f"exact_scores: id {int(ids.max())} past the gallery ({gallery.shape[0]} rows)")
    safe = np.ascontiguousarray(np.where(ids < 0, 0, ids))  # (Q, K)
    out = np.empty(ids.shape, np.float32)
    if ids.size:
        faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(gallery),
                                         faiss.swig_ptr(safe), q.shape[1], ids.shape[0], ids.shape[1])
    out[ids < 0] = -np.inf
    return out


def _tie_order(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by score descending, then id ascending; missing (-1) last."""
    scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    big = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((big, -scores), axis=-1)  # last key is the primary one
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)


@dataclass
class VectorIndex:
    """A FAISS inner-product index over an L2-normalised gallery (N, D).

    ``kind``: ``flat`` (exact, IndexFlatIP), ``ivf`` (IndexIVFFlat, ``nlist`` lists, probes
    ``nprobe``; ``nlist`` is cut to N / 39 for small galleries), ``hnsw`` (IndexHNSWFlat,
    ``hnsw_m`` links, ``ef_search``/``ef_construction``) or ``ivfpq`` (IndexIVFPQ: IVF as
    above, each vector stored as ``pq_m`` codes of ``pq_bits`` bits, 4 bits with FAISS's SIMD
    fast scan (IndexIVFPQFastScan); per query the best ``pq_rescore`` x k + TIE_FETCH
    candidates by code are re-scored exactly from ``gallery`` and cut to k). IVF (and PQ)
    k-means runs ``ivf_niter`` iterations on at most ``ivf_train_per_list`` points per
    centroid (FAISS's defaults: 25, 256; lower them to build large galleries faster). An
    IVF-PQ gallery smaller than 2**pq_bits cannot train its codebooks: it is searched
    exactly instead, recorded as ``info["fallback"]``. ``info`` records what was built
    (effective sizes, build seconds, zero vectors). Flat, IVF and IVF-PQ are deterministic;
    the HNSW graph built with several threads may differ from run to run (use threads=1).
    With ``normalize=False`` the gallery is used as given (rows unit already; a float32
    ``np.memmap`` is not copied: IVF-PQ then holds only codes in memory and reads the
    candidate rows for re-scoring from the file).
    """

    gallery: np.ndarray
    kind: str = "flat"
    nlist: int = 64
    nprobe: int = 40
    hnsw_m: int = 32
    ef_search: int = 256
    ef_construction: int = 40
    ivf_niter: int = 25
    ivf_train_per_list: int = 256
    pq_m: int = 64
    pq_bits: int = 4
    pq_rescore: int = 8
    threads: int | None = None
    normalize: bool = True
    info: dict[str, Any] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        faiss = faiss_module()

        if self.kind not in KINDS:
            raise ValueError(f"retrieval.index must be one of {', '.join(KINDS)}, got {self.kind!r}")
        set_threads(self.threads)
        g = l2_normalize(self.gallery, "gallery") if self.normalize else np.ascontiguousarray(self.gallery, np.float32)
        if g.shape[0] == 0:
            raise ValueError("gallery is empty: nothing to search")
        self.gallery = g  # (N, D) float32, unit rows
        n, d = g.shape
        t0 = time.perf_counter()
        zeros = 0
        for s in range(0, n, ADD_CHUNK):
            zeros += int((~g[s:s + ADD_CHUNK].any(axis=1)).sum())
            release_pages(g)
        info: dict[str, Any] = {"kind": self.kind, "ntotal": n, "dim": d, "zero_vectors": zeros}
        self._rescore = self.kind in ("flat", "ivfpq")  # scores not fvec_inner_product's: re-score
        self._fetch_factor = 1
        if self.kind in ("ivf", "ivfpq"):
            for name in ("nlist", "nprobe"):
                if int(getattr(self, name)) < 1:
                    raise ValueError(f"retrieval.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.kind == "ivfpq":
            self._check_pq(d)
        if self.kind == "flat" or (self.kind == "ivfpq" and n < 2 ** int(self.pq_bits)):
            index = faiss.IndexFlatIP(d)
            if self.kind == "ivfpq":  # counted fallback: too few vectors to train 2**pq_bits centroids
                info["fallback"] = (f"flat: {n} gallery vectors are fewer than the 2**pq_bits = "
                                    f"{2 ** int(self.pq_bits)} needed to train the PQ codebooks")
        elif self.kind in ("ivf", "ivfpq"):
            nlist = max(1, min(int(self.nlist), n // MIN_POINTS_PER_LIST))  # cut for small galleries (recorded)
            quantizer = faiss.IndexFlatIP(d)
            if self.kind == "ivf":
                index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            else:
                if int(self.pq_bits) == 4:  # FAISS's SIMD fast-scan kernels (1/10 of the 8-bit scan's time)
                    index = faiss.IndexIVFPQFastScan(quantizer, d, nlist, int(self.pq_m), 4,
                                                     faiss.METRIC_INNER_PRODUCT)
                else:
                    index = faiss.IndexIVFPQ(quantizer, d, nlist, int(self.pq_m), int(self.pq_bits),
                                             faiss.METRIC_INNER_PRODUCT)
                index.pq.cp.seed = 1234
                index.pq.cp.niter = int(self.ivf_niter)
                index.pq.cp.max_points_per_centroid = int(self.ivf_train_per_list)
                index.pq.cp.min_points_per_centroid = 1  # a short sample is recorded below, not warned pq_m times
                self._fetch_factor = int(self.pq_rescore)
                info.update(pq_m=int(self.pq_m), pq_bits=int(self.pq_bits), pq_rescore=int(self.pq_rescore),
                            code_bytes=int(index.code_size), fast_scan=int(self.pq_bits) == 4)
            index.cp.seed = 1234
            index.cp.niter = int(self.ivf_niter)
            index.cp.max_points_per_centroid = int(self.ivf_train_per_list)
            train = self._training_sample(g, nlist) if self.kind == "ivfpq" else g
            release_pages(g)
            index.train(train)
            if self.kind == "ivfpq":
                info["training_points"] = int(train.shape[0])  # FAISS advises >= 39 per centroid
            index.nprobe = min(int(self.nprobe), nlist)
            self._quantizer = quantizer  # keep it alive with the index
            info.update(nlist=nlist, nprobe=int(index.nprobe), nlist_requested=int(self.nlist))
        else:
            if int(self.hnsw_m) < 2 or int(self.ef_search) < 1:
                raise ValueError(f"retrieval.hnsw_m must be >= 2 and ef_search >= 1, got {self.hnsw_m!r}, {self.ef_search!r}")
            index = faiss.IndexHNSWFlat(d, int(self.hnsw_m), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(self.ef_construction)
            index.hnsw.efSearch = int(self.ef_search)
            info.update(hnsw_m=int(self.hnsw_m), ef_search=int(self.ef_search), ef_construction=int(self.ef_construction))
        if self.kind == "ivfpq":
            for s in range(0, n, ADD_CHUNK):  # chunks: a memory-mapped gallery is read piece by piece
                index.add(np.ascontiguousarray(g[s:s + ADD_CHUNK]))
                release_pages(g)
        else:
            index.add(g)
        info["build_seconds"] = round(time.perf_counter() - t0, 4)
        info["threads"] = set_threads(None)
        self.index = index
        self.info = info

    def _check_pq(self, d: int) -> None:
        """IVF-PQ params against each other and the embedding dim; errors name the param."""
        m, bits, r = int(self.pq_m), int(self.pq_bits), int(self.pq_rescore)
        if m < 1:
            raise ValueError(f"retrieval.pq_m must be >= 1, got {self.pq_m!r}")
        if d % m:
            raise ValueError(f"retrieval.pq_m ({m}) must divide the embedding dim ({d}): "
                             f"e.g. {', '.join(str(x) for x in (8, 16, 32, 64, 96, 128) if d % x == 0) or 1}")
        if not 1 <= bits <= 16:
            raise ValueError(f"retrieval.pq_bits must be in 1..16, got {self.pq_bits!r}")
        if r < 1:
            raise ValueError(f"retrieval.pq_rescore must be >= 1, got {self.pq_rescore!r}")

    def _training_sample(self, g: np.ndarray, nlist: int) -> np.ndarray:
        """IVF-PQ's training rows: all for small galleries, else a fixed-seed sample of
        ``ivf_train_per_list`` per IVF list or PQ centroid (FAISS would compute the
        residuals of every row it is given: gigabytes for a large gallery)."""
        n = g.shape[0]
        want = int(self.ivf_train_per_list) * max(nlist, 2 ** int(self.pq_bits))
        if n <= want:
            return g
        rows = np.sort(np.random.default_rng(1234).choice(n, want, replace=False))
        out = np.empty((rows.size, g.shape[1]), np.float32)
        for s in range(0, n, ADD_CHUNK):  # a block of the gallery at a time (a memory map's pages released)
            lo, hi = np.searchsorted(rows, [s, s + ADD_CHUNK])
            out[lo:hi] = g[rows[lo:hi]]
            release_pages(g)
        return out

    def fetch_size(self, k: int) -> int:
        """Candidates the index is first asked for per query when the top ``k`` is wanted."""
        return min(self._fetch_factor * int(k) + TIE_FETCH, self.ntotal)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int, batch_size: int = 1024,
               progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` (cut to the gallery size) per query: (scores (Q, k) float32, ids (Q, k) int64).

        Items tied at the k-th score are all fetched (see :meth:`_search_ties`), so the
        smallest gallery rows among them are the ones kept.
        """
        q = l2_normalize(queries, "queries") if self.normalize else np.ascontiguousarray(queries, np.float32)
        if q.shape[1] != self.gallery.shape[1]:
            raise ValueError(f"queries have dim {q.shape[1]}, the gallery {self.gallery.shape[1]}")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        k = min(int(k), self.ntotal)
        scores = np.empty((q.shape[0], k), np.float32)
        ids = np.empty((q.shape[0], k), np.int64)
        starts = range(0, q.shape[0], int(batch_size))
        bar = None
        if progress:
            from pipeline.progress import progress as bar_for

            bar = bar_for(total=q.shape[0], desc=progress, unit="query", mininterval=1.0, dynamic_ncols=True)
        for s in starts:
            e = min(s + int(batch_size), q.shape[0])
            scores[s:e], ids[s:e] = self._search_ties(q[s:e], k)
            release_pages(q)
            release_pages(self.gallery)  # re-scored rows of a memory-mapped gallery
            if bar is not None:
                bar.update(e - s)
        if bar is not None:
            bar.close()
        return scores, ids

    def _exact_scores(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """:func:`exact_scores` against the gallery; a memory-mapped gallery :data:`RESCORE_QUERIES`
        queries at a time, its pages released after each (a batch's candidates can cover most
        of the file). A pair's score does not depend on the batch."""
        if not is_memory_mapped(self.gallery):
            return exact_scores(q, self.gallery, ids)
        out = np.empty(ids.shape, np.float32)
        for s in range(0, q.shape[0], RESCORE_QUERIES):
            out[s:s + RESCORE_QUERIES] = exact_scores(q[s:s + RESCORE_QUERIES], self.gallery, ids[s:s + RESCORE_QUERIES])
            release_pages(self.gallery)
        return out

    def _search_ties(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` of queries ``q`` (B, D) in (score desc, row asc) order, exact on ties.

        Fetches :meth:`fetch_size` candidates (re-scored with :func:`exact_scores` for flat
        and IVF-PQ); a query whose last fetched score still reaches its k-th score (within
        :data:`TIE_TOL` when re-scored) may have more items tied there, so it is searched
        again with twice as many, until its ties end or the whole gallery is fetched.
        """
        n = self.ntotal
        tol = TIE_TOL if self._rescore else 0.0
        scores = np.empty((q.shape[0], k), np.float32)
        ids = np.empty((q.shape[0], k), np.int64)
        rows = np.arange(q.shape[0])  # queries still open
        fetch = self.fetch_size(k)
        while rows.size:
            d, i = self.index.search(q[rows], fetch)  # (R, fetch)
            if self._rescore:
                d = self._exact_scores(q[rows], i)
            d, i = _tie_order(d, i)
            more = (fetch < n) & (i[:, -1] >= 0) & (d[:, -1] >= d[:, k - 1] - tol)  # (R,)
            done = rows[~more]
            scores[done], ids[done] = d[~more, :k], i[~more, :k]
            rows = rows[more]
            fetch = min(2 * fetch, n)
        return scores, ids


def release_pages(a: np.ndarray) -> None:
    """Drop the pages of a memory-mapped array (or a view of one) from this process's resident set.

    They stay in the page cache and are read back on next use; a read-only or flushed mapping
    loses nothing. Without this, every row an index build or search touched would count in the
    process's RSS (as file pages the kernel may reclaim, but RSS limits and VmHWM count them).
    A no-op for an array in memory.
    """
    import mmap

    while a is not None:
        m = getattr(a, "_mmap", None)
        if isinstance(m, mmap.mmap):
            try:
                m.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):  # no madvise here: the kernel reclaims them
                pass
            return
        a = getattr(a, "base", None)


def is_memory_mapped(a: np.ndarray) -> bool:
    """Whether ``a`` (or an array it views) is a ``np.memmap`` / mmap: its rows live in a file."""
    import mmap

    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


def exact_search(gallery: np.ndarray, queries: np.ndarray, k: int, batch_size: int = 1024,
                 threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k with IndexFlatIP (see :class:`VectorIndex`).

    A memory-mapped gallery larger than :data:`EXACT_CHUNK` rows is searched a block of rows at
    a time (each block normalised and indexed alone, the per-block top-k merged in (score
    desc, row asc) order): the same lists and scores as one index over all rows, since every
    score is the per-pair ``fvec_inner_product`` of the same rows, without copying the file
    into memory.
    """
    n = int(gallery.shape[0])
    if not is_memory_mapped(gallery) or n <= EXACT_CHUNK:
        return VectorIndex(gallery, "flat", threads=threads).search(queries, k, batch_size)
    k = min(int(k), n)
    best_s = best_i = None
    for s in range(0, n, EXACT_CHUNK):
        sc, ids = VectorIndex(gallery[s:s + EXACT_CHUNK], "flat", threads=threads).search(queries, k, batch_size)
        release_pages(gallery)
        ids = np.where(ids >= 0, ids + s, -1)
        if best_s is None:
            best_s, best_i = sc, ids
        else:
            ms, mi = _tie_order(np.concatenate([best_s, sc], 1), np.concatenate([best_i, ids], 1))
            best_s, best_i = np.ascontiguousarray(ms[:, :k]), np.ascontiguousarray(mi[:, :k])
    full_s = np.full((best_s.shape[0], k), -np.inf, np.float32)
    full_i = np.full((best_s.shape[0], k), -1, np.int64)
    full_s[:, :best_s.shape[1]], full_i[:, :best_i.shape[1]] = best_s, best_i
    return full_s, full_i


def numpy_search(gallery: np.ndarray, queries: np.ndarray, k: int, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in numpy (matmul + argpartition) on already-normalised float32 arrays.

    The baseline FAISS is compared with in bench/retrieval.py; same output layout and order
    ((score desc, row asc); items tied at the k-th score are cut by lowest row).
    """
    n = gallery.shape[0]
    k = min(int(k), n)
    scores = np.empty((queries.shape[0], k), np.float32)
    ids = np.empty((queries.shape[0], k), np.int64)
    for s in range(0, queries.shape[0], batch_size):
        sims = queries[s:s + batch_size] @ gallery.T  # (B, N)
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (sims.shape[0], 1))
        sc = np.take_along_axis(sims, part, 1)
        kth = sc.min(axis=1)  # (B,)
        for r in np.flatnonzero((sims >= kth[:, None]).sum(axis=1) > k):  # ties cut at the k-th score:
            above = np.flatnonzero(sims[r] > kth[r])                      # keep the lowest rows, as
            tied = np.flatnonzero(sims[r] == kth[r])[: k - above.size]    # FAISS search does here
            part[r] = np.concatenate([above, tied])
            sc[r] = sims[r, part[r]]
        scores[s:s + batch_size], ids[s:s + batch_size] = _tie_order(sc, part.astype(np.int64))
    return scores, ids


def recall_vs_exact(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / |exact top-k| (ids, -1 ignored)."""
    a, e = np.asarray(approx_ids)[:, :k], np.asarray(exact_ids)[:, :k]
    if a.shape[0] != e.shape[0]:
        raise ValueError(f"approx has {a.shape[0]} queries, exact {e.shape[0]}")
    if a.shape[0] == 0:
        return float("nan")
    hits = 0.0
    for row_a, row_e in zip(a, e):
        ex = row_e[row_e >= 0]
        if ex.size:
            hits += np.isin(ex, row_a[row_a >= 0]).sum() / ex.size
        else:
            hits += 1.0
    return float(hits / a.shape[0])

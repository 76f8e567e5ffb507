"""AGREE's two re-rankers on candidate lists: EGR (entity-guided, zero-shot) and TBR (bi-directional).

Conventions. A list array ``(Q, K)`` holds row indices into the other side, best first;
-1 marks an empty slot and always stays last. ``t2i``: queries are captions, candidates
images; ``i2t``: queries are images, candidates captions.

EGR (DESIGN.md "Retrieval and re-ranking"). With s = cos(caption, image), m_j =
cos(masked caption j, image), p_j = cos(prompt j, image), over the counted slots J:

- t2i (slots of the query caption): S1 = a s + b sum_J (s - m_j);  S = c S1 + d mean_J p_j
  (defaults a, b, c, d = 0.9, 0.1, 0.99, 0.01)
- i2t (slots of each candidate caption): S1 = a s + b mean_J p_j;  S = c S1 + d sum_J min(0, s - m_j)
  (defaults 0.8, 0.2, 0.98, 0.02)

The pool (the first ``pool`` candidates by s) is sorted by S descending; ties keep the order
by S1, then by s, then the pool order (one stable lexsort); the top ``top_k`` are kept.

Exact ties. Duplicate captions or images make exact ties, which AGREE's stable sorts
resolve by position; so equal inputs must give bit-equal scores. Every (caption, image)
pair's slot cosines come from one product of one fixed shape (:func:`slot_cosines`),
never from a GEMM whose rounding depends on the matrix size and the item's place in it;
the formulas are then applied per slot, in float64, in the order written above (summing
the slot vectors first is algebraically the same but rounds differently).

Counted slots (``pad``): ``agree`` counts all S slots, the "" padding included, as AGREE
does; ``entities`` counts only the first min(n_entities, S) slots. A caption with no
entity under ``entities`` has no evidence: its mask sum is 0 (empty sum) and its prompt
mean is taken as s itself, so t2i orders its candidates by s alone and in i2t its
caption is scored S = c (a + b) s (neutral, neither pushed up nor down by missing prompts).

TBR. The back list of a candidate is its own list in the other direction. For query q with
list L: if q is at rank 0 of L[0]'s back list, L is kept; else each candidate at forward
rank r gets b = rank of q in its back list (``absent_rank``, 10000, if q is absent) and the
list is stably sorted by (r + b) / 2 ascending.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

PADS = ("agree", "entities")
DIRECTIONS = ("t2i", "i2t")
METHODS = ("plain", "egr", "tbr", "egr_tbr")


# ---- parameters ---------------------------------------------------------------------------

@dataclass(frozen=True)
class EgrWeights:
    """EGR weights, AGREE's defaults (see the module docstring for the formulas)."""

    t2i_s: float = 0.9
    t2i_mask: float = 0.1
    t2i_s1: float = 0.99
    t2i_prompt: float = 0.01
    i2t_s: float = 0.8
    i2t_prompt: float = 0.2
    i2t_s1: float = 0.98
    i2t_mask: float = 0.02

    @classmethod
    def from_params(cls, egr: Mapping[str, Any]) -> EgrWeights:
        """From ``rerank.egr`` ({t2i: {s, mask, s1, prompt}, i2t: {s, prompt, s1, mask}})."""
        kw = {}
        for d in DIRECTIONS:
            sub = egr[d]
            for name in ("s", "mask", "s1", "prompt"):
                try:
                    kw[f"{d}_{name}"] = float(sub[name])
                except (TypeError, ValueError):
                    raise ValueError(f"params.yaml: rerank.egr.{d}.{name} must be a number, got {sub[name]!r}") from None
        return cls(**kw)


def slot_mask(n_entities: np.ndarray, slots: int, pad: str) -> np.ndarray:
    """(N, slots) bool: which slots EGR counts (``agree``: all; ``entities``: j < n_entities)."""
    if pad not in PADS:
        raise ValueError(f"params.yaml: rerank.egr.pad must be one of {', '.join(PADS)}, got {pad!r}")
    n = np.asarray(n_entities, dtype=np.int64).reshape(-1)
    if (n < 0).any():
        raise ValueError(f"n_entities must be >= 0 (got {int(n.min())})")
    if pad == "agree":
        return np.ones((n.size, slots), dtype=bool)
    return np.arange(slots)[None, :] < np.minimum(n, slots)[:, None]


# ---- EGR ----------------------------------------------------------------------------------

def egr_scores(direction: str, s: np.ndarray, m: np.ndarray, p: np.ndarray, counted: np.ndarray,
               w: EgrWeights = EgrWeights(), chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """EGR scores (S, S1), both (Q, K) float64.

    s (Q, K) caption-image cosines; m, p (Q, K, S) masked-caption / prompt cosines per slot;
    counted: bool, broadcastable to (Q, K, S) (t2i: (Q, 1, S) from the query caption;
    i2t: (Q, K, S) from each candidate caption). Float64 arithmetic, ``chunk`` rows at a time;
    equal inputs give bit-equal scores.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be t2i or i2t, got {direction!r}")
    s = np.asarray(s, np.float64)
    m, p = np.asarray(m), np.asarray(p)
    Q, K = s.shape
    c_all = np.broadcast_to(np.asarray(counted, bool), m.shape)
    S_out = np.empty((Q, K))
    S1_out = np.empty((Q, K))
    for a in range(0, Q, chunk):
        b = min(a + chunk, Q)
        sc, c = s[a:b], c_all[a:b]
        n = c.sum(-1)  # (B, K) counted slots
        diff = sc[..., None] - m[a:b].astype(np.float64)  # (B, K, S)
        # sums over the slot axis of contiguous float64 arrays: one summation order for every row
        p_sum = np.where(c, p[a:b].astype(np.float64), 0.0).sum(-1)
        p_mean = np.divide(p_sum, n, out=sc.copy(), where=n > 0)  # no counted slot: p := s
        if direction == "t2i":
            s1 = w.t2i_s * sc + w.t2i_mask * np.where(c, diff, 0.0).sum(-1)
            S_out[a:b] = w.t2i_s1 * s1 + w.t2i_prompt * p_mean
        else:
            s1 = w.i2t_s * sc + w.i2t_prompt * p_mean
            S_out[a:b] = w.i2t_s1 * s1 + w.i2t_mask * np.where(c, np.minimum(0.0, diff), 0.0).sum(-1)
        S1_out[a:b] = s1
    return S_out, S1_out


def egr_order(S: np.ndarray, S1: np.ndarray, s: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(Q, K) permutation: S descending, ties by S1, then s, then position; invalid slots last."""
    S, S1, s = (np.asarray(a, np.float64) for a in (S, S1, s))
    inval = np.zeros(S.shape, bool) if valid is None else ~np.asarray(valid, bool)
    # np.lexsort: the LAST key is the primary one; equal keys keep their input order
    return np.lexsort((-s, -S1, -S, inval), axis=-1)


def egr_rerank(direction: str, cand: np.ndarray, s: np.ndarray, m: np.ndarray, p: np.ndarray,
               counted: np.ndarray, top_k: int, w: EgrWeights = EgrWeights()) -> np.ndarray:
    """Re-rank each pool (Q, K) with EGR and keep the first ``top_k``: (Q, min(top_k, K)) ids."""
    cand = np.asarray(cand)
    S, S1 = egr_scores(direction, s, m, p, counted, w)
    order = egr_order(S, S1, s, cand >= 0)
    return np.take_along_axis(cand, order, -1)[:, :top_k]


def plain_lists(cand: np.ndarray, s: np.ndarray, top_k: int) -> np.ndarray:
    """The top ``top_k`` of each pool by s (stable: equal s keep the pool order)."""
    cand = np.asarray(cand)
    order = np.lexsort((-np.asarray(s, np.float64), cand < 0), axis=-1)
    return np.take_along_axis(cand, order, -1)[:, :top_k]


# ---- per-slot cosines from embeddings -----------------------------------------------------

def _one_blas_thread():
    """Context: single-threaded BLAS (many small products, for which OpenBLAS's thread
    hand-off costs more than it saves). Uses threadpoolctl when installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def slot_cosines(image_emb: np.ndarray, mask_emb: np.ndarray, prompt_emb: np.ndarray,
                 img_rows: np.ndarray, cap_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """m, p (P, S) float32 for P (image, caption) pairs: cos(image, masked caption j / prompt j).

    image_emb (Ni, D); mask_emb, prompt_emb (Nc, S, D); img_rows, cap_rows (P,) the pairs.
    Every pair is one matrix-vector product of one shape, the caption's (2S, D) slot matrix
    times the image vector, so a pair gets the same bits wherever it sits and however many
    pairs share its caption (a GEMM over several images rounds by the image's place in the
    matrix and by the matrix size). float32, like the cosines s of the retrieval pools.
    Pairs are grouped by caption.
    """
    img_rows, cap_rows = np.asarray(img_rows, np.int64), np.asarray(cap_rows, np.int64)
    P, S = img_rows.size, mask_emb.shape[1]
    out = np.empty((P, 2 * S), np.float32)
    order = np.argsort(cap_rows, kind="stable")
    caps = cap_rows[order]
    starts = np.flatnonzero(np.r_[True, caps[1:] != caps[:-1]]) if P else np.zeros(0, np.int64)
    with _one_blas_thread():
        for a, b in zip(starts.tolist(), np.r_[starts[1:], P].tolist()):
            pos = order[a:b]
            w = np.concatenate([mask_emb[caps[a]], prompt_emb[caps[a]]]).astype(np.float32)  # (2S, D)
            g = image_emb[img_rows[pos]].astype(np.float32, copy=False)  # (n, D)
            out[pos] = np.matmul(w, g[:, :, None])[..., 0]  # n x [(2S, D) @ (D, 1)] -> (n, 2S)
    return out[:, :S], out[:, S:]


def _pool_slot_cosines(img_rows: np.ndarray, cap_rows: np.ndarray, image_emb: np.ndarray, mask_emb: np.ndarray,
                       prompt_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """m, p (Q, K, S) float32 for pools given as (Q, K) image and caption rows (-1: empty, scored 0)."""
    Q, K = img_rows.shape
    S = mask_emb.shape[1]
    m = np.zeros((Q * K, S), np.float32)
    p = np.zeros((Q * K, S), np.float32)
    ok = np.flatnonzero((img_rows >= 0).reshape(-1) & (cap_rows >= 0).reshape(-1))
    m[ok], p[ok] = slot_cosines(image_emb, mask_emb, prompt_emb, img_rows.reshape(-1)[ok], cap_rows.reshape(-1)[ok])
    return m.reshape(Q, K, S), p.reshape(Q, K, S)


def t2i_slot_scores(image_emb: np.ndarray, cand: np.ndarray, mask_q: np.ndarray,
                    prompt_q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """m, p (Q, K, S) float32 for caption queries (see :func:`slot_cosines`).

    image_emb (Ni, D); cand (Q, K) image rows (-1: empty, scored 0);
    mask_q, prompt_q (Q, S, D) the query captions' masked-caption / prompt embeddings.
    """
    cand = np.asarray(cand)
    caps = np.broadcast_to(np.arange(cand.shape[0])[:, None], cand.shape)
    return _pool_slot_cosines(cand, caps, image_emb, mask_q, prompt_q)


def i2t_slot_scores(image_q: np.ndarray, cand: np.ndarray, mask_emb: np.ndarray,
                    prompt_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """m, p (Q, K, S) float32 for image queries (see :func:`slot_cosines`).

    image_q (Q, D) the query images; cand (Q, K) caption rows (-1: empty, scored 0);
    mask_emb, prompt_emb (Nc, S, D) every caption's slot embeddings.
    """
    cand = np.asarray(cand)
    imgs = np.broadcast_to(np.arange(cand.shape[0])[:, None], cand.shape)
    return _pool_slot_cosines(imgs, cand, image_q, mask_emb, prompt_emb)


def egr_from_embeddings(direction: str, image_emb: np.ndarray, cand: np.ndarray, s: np.ndarray,
                        mask_emb: np.ndarray, prompt_emb: np.ndarray, counted: np.ndarray,
                        w: EgrWeights = EgrWeights(), batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """EGR scores (S, S1) (Q, K) float64 from embeddings, ``batch_size`` queries at a time.

    cand, s (Q, K) the pools. t2i: image_emb (Ni, D) the gallery; mask_emb, prompt_emb
    (Q, S, D) and counted (Q, S) bool of the query captions. i2t: image_emb (Q, D) the query
    images; mask_emb, prompt_emb (Nc, S, D) and counted (Nc, S) of every caption.
    Memory stays flat: per batch, m and p are (batch, K, S).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be t2i or i2t, got {direction!r}")
    cand = np.asarray(cand)
    counted = np.asarray(counted, bool)
    Q, K = cand.shape
    S_out, S1_out = np.empty((Q, K)), np.empty((Q, K))
    bs = max(1, int(batch_size))
    for a in range(0, Q, bs):
        b = min(a + bs, Q)
        if direction == "t2i":
            m, p = t2i_slot_scores(image_emb, cand[a:b], mask_emb[a:b], prompt_emb[a:b])
            c = counted[a:b, None, :]  # (B, 1, S)
        else:
            m, p = i2t_slot_scores(image_emb[a:b], cand[a:b], mask_emb, prompt_emb)
            c = counted[np.maximum(cand[a:b], 0)]  # (B, K, S)
        S_out[a:b], S1_out[a:b] = egr_scores(direction, s[a:b], m, p, c, w)
    return S_out, S1_out


def egr_t2i_from_embeddings(image_emb: np.ndarray, cand: np.ndarray, s: np.ndarray, mask_q: np.ndarray,
                            prompt_q: np.ndarray, counted_q: np.ndarray, w: EgrWeights = EgrWeights(),
                            batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """:func:`egr_from_embeddings` for t2i (the name bench/retrieval.py uses)."""
    return egr_from_embeddings("t2i", image_emb, cand, s, mask_q, prompt_q, counted_q, w, batch_size)


# ---- TBR ----------------------------------------------------------------------------------

TBR_CELLS = 1 << 22  # back-list entries compared at a time (rows x K x Kb): 32 MB of int64


def _back_rank(back: np.ndarray, cand: np.ndarray, query_rows: np.ndarray, absent: int) -> np.ndarray:
    """b[i, r] = rank of ``query_rows[i]`` in the back list ``back[cand[i, r]]`` (first occurrence), else ``absent``."""
    if back.shape[1] == 0:
        return np.full(cand.shape, absent, np.int64)
    hit = np.asarray(back[np.maximum(cand, 0)]) == query_rows[:, None, None]  # (B, K, Kb)
    return np.where((cand >= 0) & hit.any(-1), hit.argmax(-1), absent)


def tbr_rerank(fwd: np.ndarray, back: np.ndarray, absent_rank: int = 10000, first_row: int = 0,
               n_queries: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """TBR on forward lists ``fwd`` (Q, K) given the other direction's lists ``back`` (G, Kb).

    fwd[q] holds rows of the other side; back[g] holds query rows. Returns the re-ranked lists
    (Q, K) and a bool (Q,) telling which lists were kept as they were because q is first in the
    back list of its top candidate. A block of queries: ``fwd`` holds query rows ``first_row``
    onwards and ``n_queries`` says how many query rows exist (then ``back``, which may be
    memory-mapped, is not scanned for rows out of range: the caller made it). Only the back
    lists of the candidates are read, ``TBR_CELLS`` entries at a time.
    """
    fwd, back = np.asarray(fwd), np.asarray(back)  # a memory-mapped back stays a view of its file
    Q, K = fwd.shape
    if Q == 0 or K == 0:
        return fwd.copy(), np.ones(Q, bool)
    if fwd.max(initial=-1) >= back.shape[0]:
        raise ValueError(f"forward lists name row {int(fwd.max())}, but only {back.shape[0]} back lists exist")
    if n_queries is None and back.max(initial=-1) >= first_row + Q:
        raise ValueError(f"back lists name query row {int(back.max())}, but only {first_row + Q} queries exist")
    b = np.empty((Q, K), np.int64)
    step = max(1, TBR_CELLS // (K * max(1, back.shape[1])))
    for a in range(0, Q, step):
        rows = np.arange(first_row + a, first_row + min(a + step, Q))
        b[a:a + step] = _back_rank(back, fwd[a:a + step], rows, int(absent_rank))  # (B, K)
    r = np.arange(K)[None, :]
    key = np.where(fwd >= 0, (r + b) / 2.0, np.inf)  # (Q, K)
    order = np.argsort(key, axis=1, kind="stable")
    kept = (fwd[:, 0] >= 0) & (b[:, 0] == 0)
    out = np.where(kept[:, None], fwd, np.take_along_axis(fwd, order, 1))
    return out, kept


# ---- the four lists -----------------------------------------------------------------------

def check_sizes(top_k: int, pool: int) -> None:
    """``rerank.top_k`` and ``rerank.pool`` are >= 1 and top_k <= pool, else a ValueError naming them."""
    if int(top_k) < 1 or int(pool) < 1:
        raise ValueError(f"rerank.top_k and rerank.pool must be >= 1, got {top_k!r}, {pool!r}")
    if int(top_k) > int(pool):
        raise ValueError(f"params.yaml: rerank.top_k ({top_k}) is larger than rerank.pool ({pool})")


def egr_lists(direction: str, image_emb: np.ndarray, cand: np.ndarray, s: np.ndarray, mask_emb: np.ndarray,
              prompt_emb: np.ndarray, counted: np.ndarray, top_k: int, w: EgrWeights = EgrWeights(),
              batch_size: int = 1024) -> np.ndarray:
    """EGR lists (Q, <=top_k) of the pools cand, s (Q, K); the embeddings as :func:`egr_from_embeddings`
    takes them. Every row depends on its own pool only, so any block of queries gives the same rows."""
    S_, S1 = egr_from_embeddings(direction, image_emb, cand, s, mask_emb, prompt_emb, counted, w, batch_size)
    return np.take_along_axis(cand, egr_order(S_, S1, s, cand >= 0), 1)[:, :top_k]


def rerank_all(
    t2i_cand: np.ndarray, t2i_s: np.ndarray, i2t_cand: np.ndarray, i2t_s: np.ndarray,
    image_emb: np.ndarray, mask_emb: np.ndarray, prompt_emb: np.ndarray, n_entities: np.ndarray,
    *, top_k: int = 20, pool: int = 128, pad: str = "agree", weights: EgrWeights = EgrWeights(),
    absent_rank: int = 10000, batch_size: int = 1024, timings: dict | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Plain, EGR, TBR and EGR+TBR lists for both directions: ``{method: {direction: (Q, <=top_k)}}``.

    t2i_cand/t2i_s (Nc, P): image rows + cosines per caption; i2t_cand/i2t_s (Ni, P): caption
    rows + cosines per image (pools from retrieval, best first). image_emb (Ni, D),
    mask_emb/prompt_emb (Nc, S, D) unit rows; n_entities (Nc,). TBR reorders the plain lists
    with the other direction's plain lists as back lists; EGR+TBR does the same on EGR lists.
    """
    import time

    check_sizes(top_k, pool)
    t = timings if timings is not None else {}
    Nc, Ni = mask_emb.shape[0], image_emb.shape[0]
    if t2i_cand.shape[0] != Nc or i2t_cand.shape[0] != Ni:
        raise ValueError(f"lists cover {t2i_cand.shape[0]} captions / {i2t_cand.shape[0]} images, "
                         f"embeddings {Nc} / {Ni}")
    t2i_cand, t2i_s = t2i_cand[:, :pool], t2i_s[:, :pool]
    i2t_cand, i2t_s = i2t_cand[:, :pool], i2t_s[:, :pool]
    out: dict[str, dict[str, np.ndarray]] = {m: {} for m in METHODS}
    out["plain"]["t2i"] = plain_lists(t2i_cand, t2i_s, top_k)
    out["plain"]["i2t"] = plain_lists(i2t_cand, i2t_s, top_k)

    t0 = time.perf_counter()
    counted = slot_mask(n_entities, mask_emb.shape[1], pad)  # (Nc, S)
    for d, cand, s in (("t2i", t2i_cand, t2i_s), ("i2t", i2t_cand, i2t_s)):
        out["egr"][d] = egr_lists(d, image_emb, cand, s, mask_emb, prompt_emb, counted, top_k, weights, batch_size)
    t["egr_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for src, dst in (("plain", "tbr"), ("egr", "egr_tbr")):
        out[dst]["t2i"], _ = tbr_rerank(out[src]["t2i"], out[src]["i2t"], absent_rank)
        out[dst]["i2t"], _ = tbr_rerank(out[src]["i2t"], out[src]["t2i"], absent_rank)
    t["tbr_s"] = time.perf_counter() - t0
    return out

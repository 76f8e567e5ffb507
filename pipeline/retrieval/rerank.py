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
:func:`egr_scores` is the per-slot reference; :func:`rerank_all` computes the t2i terms with
:func:`egr_t2i_from_embeddings` (the same sums, taken over the slot vectors first: 2 dot
products per candidate instead of 2 S; equal up to float rounding, checked by a test).

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
    i2t: (Q, K, S) from each candidate caption). Float64 arithmetic, ``chunk`` rows at a time.
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
        p_sum = np.where(c, p[a:b], 0).sum(-1, dtype=np.float64)
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
    """Context: single-threaded BLAS. The slot scores are many small GEMMs, for which
    OpenBLAS's thread hand-off costs more than it saves (10x slower with 2 threads on a
    loaded 2-core machine). Uses threadpoolctl when installed, else changes nothing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def t2i_slot_scores(image_emb: np.ndarray, cand: np.ndarray, mask_q: np.ndarray, prompt_q: np.ndarray,
                    batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """m, p (Q, K, S) float32 for caption queries.

    image_emb (Ni, D) unit rows; cand (Q, K) image rows (-1: empty, scored 0);
    mask_q, prompt_q (Q, S, D) the query captions' masked-caption / prompt embeddings.
    """
    Q, K = cand.shape
    S = mask_q.shape[1]
    m = np.zeros((Q, K, S), np.float32)
    p = np.zeros((Q, K, S), np.float32)
    with _one_blas_thread():
        for a in range(0, Q, batch_size):
            b = min(a + batch_size, Q)
            g = image_emb[np.maximum(cand[a:b], 0)]  # (B, K, D)
            # contiguous (B, D, 2S) operand: numpy's batched matmul uses BLAS only for such (~50x)
            w = np.ascontiguousarray(np.concatenate([mask_q[a:b], prompt_q[a:b]], 1).transpose(0, 2, 1))
            r = np.matmul(g, w)  # (B, K, 2S)
            m[a:b] = r[..., :S]
            p[a:b] = r[..., S:]
    empty = cand < 0
    m[empty] = 0.0
    p[empty] = 0.0
    return m, p


def egr_t2i_from_embeddings(image_emb: np.ndarray, cand: np.ndarray, s: np.ndarray, mask_q: np.ndarray,
                            prompt_q: np.ndarray, counted_q: np.ndarray, w: EgrWeights = EgrWeights(),
                            batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """EGR t2i scores (S, S1) (Q, K) straight from embeddings, without per-slot cosines.

    The t2i terms are linear in the slots: sum_J (s - m_j) = n s - (sum_J mask_j) . image and
    mean_J p_j = (mean_J prompt_j) . image, so each candidate costs 2 dot products instead of
    2 S. Same formulas as :func:`egr_scores` (equal up to float rounding; a test checks it).
    counted_q (Q, S) bool; cand (Q, K) image rows (-1: empty).
    """
    s = np.asarray(s, np.float64)
    cq = np.asarray(counted_q, bool)
    n = cq.sum(1).astype(np.float64)  # (Q,)
    msum = np.einsum("qs,qsd->qd", cq.astype(np.float64), mask_q)  # (Q, D)
    pmean = np.einsum("qs,qsd->qd", cq.astype(np.float64), prompt_q) / np.maximum(n, 1)[:, None]
    v = np.ascontiguousarray(np.stack([msum, pmean], 2).astype(np.float32))  # (Q, D, 2)
    Q, K = cand.shape
    r = np.zeros((Q, K, 2), np.float64)
    bs = max(1, min(batch_size, Q))
    buf = np.empty((bs, K, image_emb.shape[1]), image_emb.dtype)  # reused: no page faults per batch
    with _one_blas_thread():
        for a in range(0, Q, bs):
            b = min(a + bs, Q)
            g = np.take(image_emb, np.maximum(cand[a:b], 0), axis=0, out=buf[:b - a])  # (B, K, D)
            r[a:b] = np.matmul(g, v[a:b])  # (B, K, D) @ (B, D, 2)
    mask_term = n[:, None] * s - r[..., 0]
    p_mean = np.where(n[:, None] > 0, r[..., 1], s)  # no counted slot: p := s
    s1 = w.t2i_s * s + w.t2i_mask * mask_term
    return w.t2i_s1 * s1 + w.t2i_prompt * p_mean, s1


def i2t_slot_scores(image_q: np.ndarray, cand: np.ndarray, mask_emb: np.ndarray,
                    prompt_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """m, p (Q, K, S) float32 for image queries.

    image_q (Q, D) the query images (unit rows); cand (Q, K) caption rows (-1: empty, scored 0);
    mask_emb, prompt_emb (Nc, S, D) every caption's slot embeddings. The (image, caption)
    pairs are grouped by caption, so each caption's S slots meet all images that hold it
    in one small GEMM: only the needed dot products, and one image row gathered per pair
    instead of 2 S slot rows.
    """
    Q, K = cand.shape
    S = mask_emb.shape[1]
    m = np.zeros((Q * K, S), np.float32)
    p = np.zeros((Q * K, S), np.float32)
    flat = cand.reshape(-1)
    pairs = np.flatnonzero(flat >= 0)  # positions in (Q*K)
    order = pairs[np.argsort(flat[pairs], kind="stable")]  # grouped by caption
    caps = flat[order]
    starts = np.flatnonzero(np.r_[True, caps[1:] != caps[:-1]]) if caps.size else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], caps.size]
    with _one_blas_thread():
        for a, b in zip(starts.tolist(), ends.tolist()):
            c = caps[a]
            pos = order[a:b]
            w = np.ascontiguousarray(np.concatenate([mask_emb[c], prompt_emb[c]]).T)  # (D, 2S), BLAS-friendly
            r = image_q[pos // K] @ w  # (n_c, D) @ (D, 2S)
            m[pos] = r[:, :S]
            p[pos] = r[:, S:]
    return m.reshape(Q, K, S), p.reshape(Q, K, S)


# ---- TBR ----------------------------------------------------------------------------------

def _back_rank(back: np.ndarray, n_queries: int, cand: np.ndarray, absent: int) -> np.ndarray:
    """b[q, r] = rank of q in the back list of cand[q, r] (first occurrence), else ``absent``."""
    G, Kb = back.shape
    flat = back.reshape(-1).astype(np.int64)
    ok = flat >= 0
    pos = np.flatnonzero(ok)
    # one int64 key per (back-list row, query), with the rank in the low digits: sorting
    # groups each pair with its smallest rank first
    code = np.sort(((pos // Kb) * n_queries + flat[ok]) * Kb + pos % Kb)
    keys, ranks = code // Kb, code % Kb
    first = np.r_[True, keys[1:] != keys[:-1]] if keys.size else np.zeros(0, bool)
    keys, ranks = keys[first], ranks[first]
    if keys.size == 0:
        return np.full(cand.shape, absent, dtype=np.int64)
    want = np.where(cand >= 0, cand.astype(np.int64) * n_queries + np.arange(cand.shape[0])[:, None], -1)  # (Q, K)
    at = np.minimum(np.searchsorted(keys, want), keys.size - 1)
    found = (cand >= 0) & (keys[at] == want)
    return np.where(found, ranks[at], absent)


def tbr_rerank(fwd: np.ndarray, back: np.ndarray, absent_rank: int = 10000) -> tuple[np.ndarray, np.ndarray]:
    """TBR on forward lists ``fwd`` (Q, K) given the other direction's lists ``back`` (G, Kb).

    fwd[q] holds rows of the other side; back[g] holds query rows (0..Q-1). Returns the
    re-ranked lists (Q, K) and a bool (Q,) telling which lists were kept as they were
    because q is first in the back list of its top candidate.
    """
    fwd = np.asarray(fwd)
    back = np.asarray(back)
    Q, K = fwd.shape
    if Q == 0 or K == 0:
        return fwd.copy(), np.ones(Q, bool)
    if fwd.max(initial=-1) >= back.shape[0]:
        raise ValueError(f"forward lists name row {int(fwd.max())}, but only {back.shape[0]} back lists exist")
    if back.max(initial=-1) >= Q:
        raise ValueError(f"back lists name query row {int(back.max())}, but only {Q} queries exist")
    b = _back_rank(back, Q, fwd, int(absent_rank))  # (Q, K)
    r = np.arange(K)[None, :]
    key = np.where(fwd >= 0, (r + b) / 2.0, np.inf)  # (Q, K)
    order = np.argsort(key, axis=1, kind="stable")
    kept = (fwd[:, 0] >= 0) & (b[:, 0] == 0)
    out = np.where(kept[:, None], fwd, np.take_along_axis(fwd, order, 1))
    return out, kept


# ---- the four lists -----------------------------------------------------------------------

def rerank_all(
    t2i_cand: np.ndarray, t2i_s: np.ndarray, i2t_cand: np.ndarray, i2t_s: np.ndarray,
    image_emb: np.ndarray, mask_emb: np.ndarray, prompt_emb: np.ndarray, n_entities: np.ndarray,
    *, top_k: int = 20, pool: int = 128, pad: str = "agree", weights: EgrWeights = EgrWeights(),
    absent_rank: int = 10000, batch_size: int = 16, timings: dict | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Plain, EGR, TBR and EGR+TBR lists for both directions: ``{method: {direction: (Q, <=top_k)}}``.

    t2i_cand/t2i_s (Nc, P): image rows + cosines per caption; i2t_cand/i2t_s (Ni, P): caption
    rows + cosines per image (pools from retrieval, best first). image_emb (Ni, D),
    mask_emb/prompt_emb (Nc, S, D) unit rows; n_entities (Nc,). TBR reorders the plain lists
    with the other direction's plain lists as back lists; EGR+TBR does the same on EGR lists.
    """
    import time

    if int(top_k) < 1 or int(pool) < 1:
        raise ValueError(f"rerank.top_k and rerank.pool must be >= 1, got {top_k!r}, {pool!r}")
    if int(top_k) > int(pool):
        raise ValueError(f"params.yaml: rerank.top_k ({top_k}) is larger than rerank.pool ({pool})")
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
    S_, S1 = egr_t2i_from_embeddings(image_emb, t2i_cand, t2i_s, mask_emb, prompt_emb, counted, weights, batch_size)
    out["egr"]["t2i"] = np.take_along_axis(t2i_cand, egr_order(S_, S1, t2i_s, t2i_cand >= 0), 1)[:, :top_k]
    m, p = i2t_slot_scores(image_emb, i2t_cand, mask_emb, prompt_emb)
    out["egr"]["i2t"] = egr_rerank("i2t", i2t_cand, i2t_s, m, p, counted[np.maximum(i2t_cand, 0)], top_k, weights)
    del m, p
    t["egr_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for src, dst in (("plain", "tbr"), ("egr", "egr_tbr")):
        out[dst]["t2i"], _ = tbr_rerank(out[src]["t2i"], out[src]["i2t"], absent_rank)
        out[dst]["i2t"], _ = tbr_rerank(out[src]["i2t"], out[src]["t2i"], absent_rank)
    t["tbr_s"] = time.perf_counter() - t0
    return out

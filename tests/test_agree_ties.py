"""Retrieval lists equal AGREE's ordering exactly, exact ties included (duplicate captions and images).

The reference below follows DESIGN.md one query at a time, in plain Python: the pool is the
first ``pool`` of a stable argsort of -s over the whole gallery; EGR evaluates the formulas
per slot and sorts the pool with stable sorts (by s, then S1, then S, so that S decides and
ties fall to S1, then s, then the pool order); TBR is AGREE's back-rank rule. Embedding
entries are multiples of 1/4 and slot counts are powers of two, so every cosine, sum and mean
is exact: the ties in these sets (boundary of the pool, duplicates, equal S with different
inputs) are real ties, and any rounding in the code under test would show as a different list.
"""
import numpy as np
import pytest

from pipeline.retrieval.index import TIE_FETCH, VectorIndex
from pipeline.retrieval.rerank import METHODS, EgrWeights, rerank_all

DYADIC = EgrWeights(t2i_s=0.875, t2i_mask=0.125, t2i_s1=0.96875, t2i_prompt=0.03125,
                    i2t_s=0.75, i2t_prompt=0.25, i2t_s1=0.984375, i2t_mask=0.015625)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.astype(np.float64), b.astype(np.float64)))


def ref_scores(direction: str, s: float, m: list[float], p: list[float], w: EgrWeights) -> tuple[float, float]:
    """(S, S1) of one candidate from its counted slots, as DESIGN.md writes the formulas."""
    p_mean = sum(p) / len(p) if p else s  # no counted slot: p := s
    if direction == "t2i":
        s1 = w.t2i_s * s + w.t2i_mask * sum(s - mj for mj in m)
        return w.t2i_s1 * s1 + w.t2i_prompt * p_mean, s1
    s1 = w.i2t_s * s + w.i2t_prompt * p_mean
    return w.i2t_s1 * s1 + w.i2t_mask * sum(min(0.0, s - mj) for mj in m), s1


def ref_lists(img, cap, mask, prm, n_ent, pad, w, pool, top_k, absent=10000):
    """AGREE's four lists per direction, ``{method: {direction: [[row, ...] per query]}}``."""
    S = mask.shape[1]
    slots = [list(range(S)) if pad == "agree" else list(range(min(int(n), S))) for n in n_ent]
    out = {m: {} for m in METHODS}
    for d, queries, gallery in (("t2i", cap, img), ("i2t", img, cap)):
        plain, egr = [], []
        for q in range(len(queries)):
            s_all = np.array([cos(queries[q], g) for g in gallery])
            ids = np.argsort(-s_all, kind="stable")[:pool]
            plain.append(ids[:top_k].tolist())
            scores = []
            for g in ids:
                c, i = (q, g) if d == "t2i" else (g, q)  # the caption whose slots count, the image
                scores.append(ref_scores(d, s_all[g], [cos(mask[c, j], img[i]) for j in slots[c]],
                                         [cos(prm[c, j], img[i]) for j in slots[c]], w))
            order = np.arange(len(ids))
            for key in (s_all[ids], np.array([x[1] for x in scores]), np.array([x[0] for x in scores])):
                order = order[np.argsort(-key[order], kind="stable")]  # the last sort decides
            egr.append(ids[order][:top_k].tolist())
        out["plain"][d], out["egr"][d] = plain, egr
    for src, dst in (("plain", "tbr"), ("egr", "egr_tbr")):
        for d, o in (("t2i", "i2t"), ("i2t", "t2i")):
            out[dst][d] = [ref_tbr(q, lst, out[src][o], absent) for q, lst in enumerate(out[src][d])]
    return out


def ref_tbr(q: int, fwd: list[int], back: list[list[int]], absent: int) -> list[int]:
    if back[fwd[0]][:1] == [q]:
        return fwd
    key = [(r + (back[c].index(q) if q in back[c] else absent)) / 2 for r, c in enumerate(fwd)]
    return [fwd[i] for i in np.argsort(key, kind="stable")]


def our_lists(img, cap, mask, prm, n_ent, pad, w, pool, top_k):
    """Search both directions (flat FAISS, as the retrieve stage) and re-rank (as the rerank stage)."""
    s_t, c_t = VectorIndex(img, "flat", normalize=False).search(cap, pool, batch_size=23)
    s_i, c_i = VectorIndex(cap, "flat", normalize=False).search(img, pool, batch_size=23)
    return rerank_all(c_t, s_t, c_i, s_i, img, mask, prm, n_ent, top_k=top_k, pool=pool, pad=pad,
                      weights=w, batch_size=7)


def dyadic_set(seed: int, n_img: int = 30, n_cap: int = 48, dim: int = 6, slots: int = 4):
    """Entries in {-1/2, -1/4, 0, 1/4, 1/2}; a quarter of the images and captions duplicated
    (a caption with its slots and entity count); entity counts 0, 1, 2 or 4."""
    rng = np.random.default_rng(seed)
    vals = lambda *shape: (rng.integers(-2, 3, shape) / 4).astype(np.float32)  # noqa: E731
    img, cap = vals(n_img, dim), vals(n_cap, dim)
    mask, prm = vals(n_cap, slots, dim), vals(n_cap, slots, dim)
    n_ent = rng.choice([0, 1, 2, 4], n_cap)
    for a, b in rng.integers(0, n_img, (n_img // 4, 2)):
        img[b] = img[a]
    for a, b in rng.integers(0, n_cap, (n_cap // 4, 2)):
        cap[b], mask[b], prm[b], n_ent[b] = cap[a], mask[a], prm[a], n_ent[a]
    return img, cap, mask, prm, n_ent


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pad", ["agree", "entities"])
@pytest.mark.parametrize("w", [EgrWeights(), DYADIC], ids=["agree_weights", "dyadic_weights"])
def test_lists_equal_agree_reference_on_exact_ties(seed, pad, w):
    img, cap, mask, prm, n_ent = dyadic_set(seed)
    ours = our_lists(img, cap, mask, prm, n_ent, pad, w, pool=10, top_k=6)
    ref = ref_lists(img, cap, mask, prm, n_ent, pad, w, pool=10, top_k=6)
    for method in METHODS:
        for d in ("t2i", "i2t"):
            assert ours[method][d].tolist() == ref[method][d], (method, d)


def test_the_sets_hold_the_ties_they_are_meant_to():
    img, cap, *_ = dyadic_set(0)
    s = cap.astype(np.float64) @ img.T.astype(np.float64)  # (Nc, Ni), exact
    kth = -np.sort(-s, 1)[:, 9:11]
    assert (kth[:, 0] == kth[:, 1]).sum() > 10  # many queries have ties across the pool boundary
    assert len(np.unique(img, axis=0)) < len(img) and len(np.unique(cap, axis=0)) < len(cap)


def test_continuous_data_with_duplicates_equals_reference():
    """Float32 unit vectors (inexact arithmetic): only duplicates tie; they must tie exactly."""
    rng = np.random.default_rng(7)
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    n_img, n_cap, dim, slots = 26, 44, 16, 10
    img = unit(rng.standard_normal((n_img, dim)))
    cap = unit(img[np.arange(n_cap) % n_img] + 0.7 * rng.standard_normal((n_cap, dim)))
    mask, prm = unit(rng.standard_normal((n_cap, slots, dim))), unit(rng.standard_normal((n_cap, slots, dim)))
    n_ent = rng.integers(0, slots + 1, n_cap)
    img[[3, 17, 25]] = img[8]
    for a, b in ((1, 30), (1, 43), (5, 6)):
        cap[b], mask[b], prm[b], n_ent[b] = cap[a], mask[a], prm[a], n_ent[a]
    for pad in ("agree", "entities"):
        ours = our_lists(img, cap, mask, prm, n_ent, pad, EgrWeights(), pool=12, top_k=8)
        ref = ref_lists(img, cap, mask, prm, n_ent, pad, EgrWeights(), pool=12, top_k=8)
        for method in METHODS:
            for d in ("t2i", "i2t"):
                assert ours[method][d].tolist() == ref[method][d], (pad, method, d)


def test_pool_boundary_with_more_ties_than_the_extra_fetch():
    # 3 * TIE_FETCH copies tie at the pool boundary: the search must widen twice
    g = np.zeros((200, 4), np.float32)
    g[:, 0] = 0.25
    g[::7, 0] = 0.5  # 29 rows above the tie
    q = np.tile(np.array([[1, 0, 0, 0]], np.float32), (25, 1))  # >= 20 queries: FAISS's BLAS path
    k = 29 + 5
    assert 200 - 29 > 3 * TIE_FETCH
    s, i = VectorIndex(g, "flat", normalize=False).search(q, k)
    ref = np.argsort(-(q @ g.T), 1, kind="stable")[:, :k]
    np.testing.assert_array_equal(i, ref)
    assert s[0, -1] == 0.25 and i[0, -5:].tolist() == [1, 2, 3, 4, 5]

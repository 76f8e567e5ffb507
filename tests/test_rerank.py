"""EGR and TBR on small cases worked out by hand (expected numbers written out, not recomputed)."""
import numpy as np
import pytest

from pipeline.retrieval.rerank import (
    EgrWeights,
    egr_from_embeddings,
    egr_order,
    egr_t2i_from_embeddings,
    egr_rerank,
    egr_scores,
    i2t_slot_scores,
    plain_lists,
    rerank_all,
    slot_mask,
    t2i_slot_scores,
    tbr_rerank,
)

W = EgrWeights()  # AGREE's defaults

# ---- EGR, text to image: one query caption, candidates A=0, B=1 (pool order A, B), 2 slots
T_S = np.array([[0.5, 0.4]])
T_M = np.array([[[0.3, 0.5], [-0.5, -0.4]]])  # masked caption j vs image
T_P = np.array([[[0.2, 0.2], [0.6, 0.4]]])    # prompt j vs image


def test_egr_t2i_agree_padding_by_hand():
    # A: S1 = .9*.5 + .1*((.5-.3)+(.5-.5)) = .47 ; p = .2 ; S = .99*.47 + .01*.2 = .4673
    # B: S1 = .9*.4 + .1*((.4+.5)+(.4+.4)) = .53 ; p = .5 ; S = .99*.53 + .01*.5 = .5297
    counted = slot_mask([2], 2, "agree")[:, None, :]
    S, S1 = egr_scores("t2i", T_S, T_M, T_P, counted, W)
    np.testing.assert_allclose(S1, [[0.47, 0.53]], atol=1e-12)
    np.testing.assert_allclose(S, [[0.4673, 0.5297]], atol=1e-12)
    assert egr_rerank("t2i", np.array([[0, 1]]), T_S, T_M, T_P, counted, 2, W).tolist() == [[1, 0]]


def test_egr_t2i_entities_only_by_hand():
    # one real entity: only slot 0 counts
    # A: S1 = .45 + .1*.2 = .47, p = .2, S = .4673 ; B: S1 = .36 + .1*.9 = .45, p = .6, S = .4515
    counted = slot_mask([1], 2, "entities")[:, None, :]
    S, _ = egr_scores("t2i", T_S, T_M, T_P, counted, W)
    np.testing.assert_allclose(S, [[0.4673, 0.4515]], atol=1e-12)
    assert egr_rerank("t2i", np.array([[0, 1]]), T_S, T_M, T_P, counted, 2, W).tolist() == [[0, 1]]


def test_egr_t2i_zero_entities_falls_back_to_s():
    # no counted slot: mask sum 0, prompt mean := s -> S = .99*.9*s + .01*s
    counted = slot_mask([0], 2, "entities")[:, None, :]
    assert not counted.any()
    S, S1 = egr_scores("t2i", T_S, T_M, T_P, counted, W)
    np.testing.assert_allclose(S, [[0.4505, 0.3604]], atol=1e-12)  # .891*.5+.005, .891*.4+.004
    np.testing.assert_allclose(S1, [[0.45, 0.36]], atol=1e-12)


# ---- EGR, image to text: one query image, candidate captions C1=0, C2=1, their own slots
I_S = np.array([[0.5, 0.45]])
I_P = np.array([[[0.1, 0.9], [0.5, 0.3]]])  # C1's slot 1 is "" padding that looks like the image
I_M = np.array([[[0.6, 0.4], [0.3, 0.5]]])
N_ENT = np.array([1, 2])  # C1 has one real entity, C2 two


def test_egr_i2t_agree_vs_entities_by_hand():
    cand = np.array([[0, 1]])
    # agree: C1: p = .5, S1 = .8*.5 + .2*.5 = .5, masks min(0,-.1)+min(0,.1) = -.1, S = .98*.5 - .002 = .488
    #        C2: p = .4, S1 = .36 + .08 = .44, masks 0 + min(0,-.05) = -.05, S = .98*.44 - .001 = .4302
    c_agree = slot_mask(N_ENT, 2, "agree")[cand]
    S, S1 = egr_scores("i2t", I_S, I_M, I_P, c_agree, W)
    np.testing.assert_allclose(S1, [[0.5, 0.44]], atol=1e-12)
    np.testing.assert_allclose(S, [[0.488, 0.4302]], atol=1e-12)
    assert egr_rerank("i2t", cand, I_S, I_M, I_P, c_agree, 2, W).tolist() == [[0, 1]]
    # entities: C1 only slot 0: p = .1, S1 = .42, masks -.1, S = .4116 - .002 = .4096 ; C2 as above
    c_ent = slot_mask(N_ENT, 2, "entities")[cand]
    S, _ = egr_scores("i2t", I_S, I_M, I_P, c_ent, W)
    np.testing.assert_allclose(S, [[0.4096, 0.4302]], atol=1e-12)
    assert egr_rerank("i2t", cand, I_S, I_M, I_P, c_ent, 2, W).tolist() == [[1, 0]]
    # C1 with no entity: p := s = .5, S1 = .4 + .1 = .5, no mask term, S = .49
    c_zero = slot_mask(np.array([0, 2]), 2, "entities")[cand]
    S, _ = egr_scores("i2t", I_S, I_M, I_P, c_zero, W)
    np.testing.assert_allclose(S, [[0.49, 0.4302]], atol=1e-12)


def test_egr_ties_follow_s1_then_s_then_pool_order():
    # dyadic weights so that the ties are exact: S1 = s - m/2, S = S1/2 + p/2 (one slot)
    w = EgrWeights(t2i_s=0.5, t2i_mask=0.5, t2i_s1=0.5, t2i_prompt=0.5)
    # pool order A, D, B, C (ids 0, 3, 1, 2); every S = .375
    # A: s=.25 m=0 -> S1=.25, p=.5 ; D: same as A ; B: s=.5 m=0 -> S1=.5, p=.25 ; C: s=.75 m=.5 -> S1=.5, p=.25
    cand = np.array([[0, 3, 1, 2]])
    s = np.array([[0.25, 0.25, 0.5, 0.75]])
    m = np.array([[[0.0], [0.0], [0.0], [0.5]]])
    p = np.array([[[0.5], [0.5], [0.25], [0.25]]])
    S, S1 = egr_scores("t2i", s, m, p, np.ones((1, 1, 1), bool), w)
    np.testing.assert_array_equal(S, [[0.375] * 4])
    # S ties -> S1 (B, C before A, D) -> s (C before B) -> pool order (A before D)
    assert egr_rerank("t2i", cand, s, m, p, np.ones((1, 1, 1), bool), 4, w).tolist() == [[2, 1, 0, 3]]
    assert egr_rerank("t2i", cand, s, m, p, np.ones((1, 1, 1), bool), 2, w).tolist() == [[2, 1]]  # top_k


def test_empty_slots_stay_last_and_plain_is_stable():
    cand = np.array([[4, -1, 2, 7]])
    s = np.array([[0.5, -np.inf, 0.5, 0.9]], np.float32)
    assert plain_lists(cand, s, 4).tolist() == [[7, 4, 2, -1]]
    m = np.zeros((1, 4, 1))
    p = np.zeros((1, 4, 1))
    assert egr_rerank("t2i", cand, s, m, p, np.ones((1, 1, 1), bool), 4).tolist()[0][-1] == -1


def test_slot_mask_and_params():
    np.testing.assert_array_equal(slot_mask([0, 2, 12], 3, "entities"),
                                  [[0, 0, 0], [1, 1, 0], [1, 1, 1]])
    assert slot_mask([0, 2], 3, "agree").all()
    with pytest.raises(ValueError, match="rerank.egr.pad"):
        slot_mask([1], 3, "none")
    w = EgrWeights.from_params({"t2i": {"s": 0.9, "mask": 0.1, "s1": 0.99, "prompt": 0.01},
                                "i2t": {"s": 0.8, "prompt": 0.2, "s1": 0.98, "mask": 0.02}})
    assert w == EgrWeights()
    with pytest.raises(ValueError, match="rerank.egr.i2t.mask"):
        EgrWeights.from_params({"t2i": {"s": 1, "mask": 1, "s1": 1, "prompt": 1},
                                "i2t": {"s": 1, "prompt": 1, "s1": 1, "mask": "x"}})


def test_slot_scores_match_loops():
    rng = np.random.default_rng(0)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    img = unit(rng.standard_normal((7, 8))).astype(np.float32)
    mask = unit(rng.standard_normal((5, 3, 8))).astype(np.float32)
    prm = unit(rng.standard_normal((5, 3, 8))).astype(np.float32)
    cand_t = rng.integers(0, 7, (5, 4))
    m, p = t2i_slot_scores(img, cand_t, mask, prm)
    for q in range(5):
        for k in range(4):
            for j in range(3):
                assert m[q, k, j] == pytest.approx(float(mask[q, j] @ img[cand_t[q, k]]), abs=1e-6)
                assert p[q, k, j] == pytest.approx(float(prm[q, j] @ img[cand_t[q, k]]), abs=1e-6)
    cand_i = rng.integers(0, 5, (7, 4))
    cand_i[0, 3] = -1
    m, p = i2t_slot_scores(img, cand_i, mask, prm)
    for q in range(7):
        for k in range(4):
            c = cand_i[q, k]
            for j in range(3):
                assert m[q, k, j] == pytest.approx(0.0 if c < 0 else float(mask[c, j] @ img[q]), abs=1e-6)
                assert p[q, k, j] == pytest.approx(0.0 if c < 0 else float(prm[c, j] @ img[q]), abs=1e-6)


def test_t2i_from_embeddings_equals_per_slot_formula_bitwise():
    rng = np.random.default_rng(5)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    img = unit(rng.standard_normal((30, 16))).astype(np.float32)
    cap = unit(rng.standard_normal((12, 16))).astype(np.float32)
    mask = unit(rng.standard_normal((12, 4, 16))).astype(np.float32)
    prm = unit(rng.standard_normal((12, 4, 16))).astype(np.float32)
    cand = np.argsort(-(cap @ img.T), 1)[:, :10]
    cand[0, 9] = -1
    s = np.take_along_axis(cap @ img.T, np.maximum(cand, 0), 1)
    for pad, n_ent in (("agree", rng.integers(0, 6, 12)), ("entities", np.array([0, 1, 2, 3, 4, 5] * 2))):
        counted = slot_mask(n_ent, 4, pad)
        m, p = t2i_slot_scores(img, cand, mask, prm)
        ref_S, ref_S1 = egr_scores("t2i", s, m, p, counted[:, None, :])
        S, S1 = egr_t2i_from_embeddings(img, cand, s, mask, prm, counted, batch_size=5)  # 3 batches
        ok = cand >= 0
        np.testing.assert_array_equal(S[ok], ref_S[ok])
        np.testing.assert_array_equal(S1[ok], ref_S1[ok])
        np.testing.assert_array_equal(egr_order(S, S1, s, ok), egr_order(ref_S, ref_S1, s, ok))


def test_duplicates_get_bit_equal_slot_cosines_in_any_pool_count():
    # caption 3 is in every image's pool, its copy 29 in one: their cosines come from groups of
    # 40 and of 1 pairs; image 5 and its copy 0 sit at other places and in other t2i batches
    rng = np.random.default_rng(0)
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    for dim in (16, 512):
        img = unit(rng.standard_normal((40, dim)))
        img[0] = img[5]
        mask, prm = unit(rng.standard_normal((30, 10, dim))), unit(rng.standard_normal((30, 10, dim)))
        mask[29], prm[29] = mask[3], prm[3]
        cand = np.stack([rng.permutation(np.arange(4, 29))[:12] for _ in range(40)])
        cand[:, 0] = 3
        cand[7, 5] = 29
        m, p = i2t_slot_scores(img, cand, mask, prm)
        np.testing.assert_array_equal(m[7, 5], m[7, 0])
        np.testing.assert_array_equal(p[7, 5], p[7, 0])
        s = rng.random((40, 12))
        s[7, 5] = s[7, 0]
        S, S1 = egr_scores("i2t", s, m, p, np.ones((1, 1, 10), bool))
        assert S[7, 5] == S[7, 0] and S1[7, 5] == S1[7, 0]
        S_b, S1_b = egr_from_embeddings("i2t", img, cand, s, mask, prm, np.ones((30, 10), bool), batch_size=3)
        np.testing.assert_array_equal(S_b, S)  # batches of 3 images: other groups, same bits
        np.testing.assert_array_equal(S1_b, S1)
        t_cand = rng.integers(1, 40, (30, 12))
        t_cand[2, 3], t_cand[2, 11], t_cand[25, 0] = 5, 0, 0
        s_t = np.full((30, 12), 0.5)
        S, S1 = egr_t2i_from_embeddings(img, t_cand, s_t, mask, prm, np.ones((30, 10), bool), batch_size=4)
        assert S[2, 3] == S[2, 11] and S1[2, 3] == S1[2, 11]
        m, p = t2i_slot_scores(img, t_cand, mask, prm)
        np.testing.assert_array_equal(m[2, 3], m[2, 11])
        np.testing.assert_array_equal(p[2, 3], p[2, 11])


def test_t2i_equal_S_and_S1_fall_to_s_then_pool_order():
    # One query caption, 10 slots (AGREE's padding count), dyadic weights: every value below is
    # exact, so A and B tie exactly on S and on S1 while s differs. Summing the prompt vectors
    # first and dividing by 10 rounds A's and B's prompt means differently and used to put B first.
    w = EgrWeights(t2i_s=0.875, t2i_mask=0.125, t2i_s1=0.96875, t2i_prompt=0.03125)
    dim = 13  # 0: s; 1-10: the masked captions; 11, 12: the prompts (vectors need not be unit here)
    mask = np.zeros((1, 10, dim), np.float32)
    mask[0, np.arange(10), 1 + np.arange(10)] = 1
    prm = np.zeros((1, 10, dim), np.float32)
    prm[0, :9, 11] = 1  # p_j = image[11] for slots 0-8
    prm[0, 9, 12] = 1   # p_9 = image[12]
    A = np.zeros(dim, np.float32)
    A[[0, 11]] = 0.5, 0.125  # s = 1/2, m = (1/2 x 8, 1/8 x 2), p = (1/8 x 9, 0)
    A[1:9], A[9:11] = 0.5, 0.125
    B = np.zeros(dim, np.float32)
    B[[0, 12]] = 0.25, 1.125  # s = 1/4, m = 0, p = (0 x 9, 9/8)
    img = np.stack([B, A, B])  # pool order B, A, B' (B' a copy of B)
    cand = np.array([[0, 1, 2]])
    s = np.array([[0.25, 0.5, 0.25]])
    # S1_A = 7/8 * 1/2 + 1/8 * (2 * 3/8) = 17/32 = 7/8 * 1/4 + 1/8 * (10 * 1/4) = S1_B ; p_A = p_B = 9/80
    S, S1 = egr_t2i_from_embeddings(img, cand, s, mask, prm, np.ones((1, 10), bool), w)
    assert S1.tolist() == [[17 / 32] * 3]
    assert S[0, 0] == S[0, 1] == S[0, 2]
    ref_S, ref_S1 = egr_scores("t2i", s, *t2i_slot_scores(img, cand, mask, prm), np.ones((1, 1, 10), bool), w)
    np.testing.assert_array_equal(S, ref_S)
    assert np.take_along_axis(cand, egr_order(S, S1, s), 1).tolist() == [[1, 0, 2]]  # by s, then pool order


# ---- TBR ----------------------------------------------------------------------------------
# captions q0..q2, images i0..i2
T2I = np.array([[0, 1, 2],   # q0: i0 i1 i2
                [0, 1, 2],   # q1: i0 i1 i2
                [2, 0, 1]])  # q2: i2 i0 i1
I2T = np.array([[0, 2, 1],    # i0: q0 q2 q1
                [1, 2, 0],    # i1: q1 q2 q0
                [2, 0, -1]])  # i2: q2 q0 (q1 absent)


def test_tbr_text_to_image_by_hand():
    out, kept = tbr_rerank(T2I, I2T)
    # q0: q0 is first in i0's list -> kept
    # q1: q1 at rank 2 in i0's list -> re-rank: i0 (0+2)/2=1, i1 (1+0)/2=.5, i2 (2+10000)/2=5001
    # q2: q2 first in i2's list -> kept
    assert out.tolist() == [[0, 1, 2], [1, 0, 2], [2, 0, 1]]
    assert kept.tolist() == [True, False, True]


def test_tbr_image_to_text_by_hand():
    out, kept = tbr_rerank(I2T, T2I)
    # i0: i0 first in q0's list -> kept ; i2: i2 first in q2's list -> kept (its empty slot stays last)
    # i1: i1 at rank 1 in q1's list -> q1 (0+1)/2=.5, q2 (1+2)/2=1.5, q0 (2+1)/2=1.5: tie, q2 stays before q0
    assert out.tolist() == [[0, 2, 1], [1, 2, 0], [2, 0, -1]]
    assert kept.tolist() == [True, False, True]


def test_tbr_ties_are_stable_and_absent_rank_is_a_param():
    # query 0, forward [0, 1, 2, 3]; ranks of q0 in the back lists: item0 3, item1 2, item2 0, item3 absent
    fwd = np.array([[0, 1, 2, 3]] * 4)
    back = np.array([[1, 2, 3, 0], [1, 2, 0, 3], [0, 1, 2, 3], [1, 2, 3, -1]])
    out, _ = tbr_rerank(fwd, back)
    # keys 1.5, 1.5, 1, 5001.5 -> [2, 0, 1, 3] (0 before 1: stable)
    assert out[0].tolist() == [2, 0, 1, 3]
    # absent rank 0: item3 key (3+0)/2 = 1.5 ties with 0 and 1 and stays behind them
    assert tbr_rerank(fwd, back, absent_rank=0)[0][0].tolist() == [2, 0, 1, 3]
    # absent rank -3: item3 key 0 -> first
    assert tbr_rerank(fwd, back, absent_rank=-3)[0][0].tolist() == [3, 2, 0, 1]
    with pytest.raises(ValueError, match="back lists"):
        tbr_rerank(np.array([[5]]), back)


def test_rerank_all_lists_are_consistent():
    rng = np.random.default_rng(3)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    img = unit(rng.standard_normal((6, 8))).astype(np.float32)
    cap = unit(rng.standard_normal((9, 8))).astype(np.float32)
    mask = unit(rng.standard_normal((9, 4, 8))).astype(np.float32)
    prm = unit(rng.standard_normal((9, 4, 8))).astype(np.float32)
    sim = cap @ img.T  # (9, 6)
    t2i = np.argsort(-sim, 1, kind="stable")
    i2t = np.argsort(-sim.T, 1, kind="stable")
    lists = rerank_all(t2i, np.take_along_axis(sim, t2i, 1), i2t, np.take_along_axis(sim.T, i2t, 1),
                       img, mask, prm, rng.integers(0, 5, 9), top_k=3, pool=5, pad="entities")
    assert lists["plain"]["t2i"].tolist() == t2i[:, :3].tolist()
    assert lists["tbr"]["i2t"].tolist() == tbr_rerank(lists["plain"]["i2t"], lists["plain"]["t2i"])[0].tolist()
    assert lists["egr_tbr"]["t2i"].tolist() == tbr_rerank(lists["egr"]["t2i"], lists["egr"]["i2t"])[0].tolist()
    for meth in lists.values():
        assert meth["t2i"].shape == (9, 3) and meth["i2t"].shape == (6, 3)
    # EGR only reorders the pool: every EGR pick comes from the first 5 by s
    assert all(set(r) <= set(p) for r, p in zip(lists["egr"]["t2i"].tolist(), t2i[:, :5].tolist()))
    with pytest.raises(ValueError, match="rerank.top_k"):
        rerank_all(t2i, sim, i2t, sim.T, img, mask, prm, np.zeros(9, int), top_k=6, pool=5)

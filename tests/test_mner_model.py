"""MNER model: CRF decoding vs brute force, padding invariance, ablation switches, gradients."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.mner.data import MNERDataset, Sample, collate, make_collate, type_prompt_tensor
from pipeline.mner.model import MNERConfig, MNERModel, bio_tags

torch.set_num_threads(1)

TYPES = ["LOC", "PER"]
DIMS = dict(d_text=16, n_text_layers=2, d_pooled=8, d_patch=6, d_region=8, n_region_labels=5)


# ---- in-memory sources with the cache interfaces (shared with tests/test_train.py) ---------
class MemText:
    """TextFeatures-like: .get(sample_id) -> (n_kept, L, d), .type_prompts."""

    def __init__(self, feats: dict, prompts: dict) -> None:
        self.feats, self.type_prompts = feats, prompts

    def get(self, sid: str) -> np.ndarray:
        return self.feats[sid]


class MemReader:
    """ShardReader-like: .ids, in, .get(id) -> dict of arrays."""

    def __init__(self, recs: dict) -> None:
        self.recs, self.ids = recs, list(recs)

    def __contains__(self, k: str) -> bool:
        return k in self.recs

    def get(self, k: str, names=None) -> dict:
        rec = self.recs[k]
        return {n: rec[n] for n in (names or rec) if n in rec}


def synth(n: int, seed: int, prefix: str = "s", L: int = 2, d: int = 16, D: int = 8, P: int = 4, W: int = 6,
          K: int = 3, signal: tuple[str, ...] = ("pooled", "patches", "regions")):
    """A task where the entity type is only recoverable from the image.

    Every sentence holds one name word with the SAME text feature; its type (LOC or PER) is
    written only into the image features (a per-type direction) of the branches in ``signal``.
    """
    rng = np.random.default_rng(seed)
    fixed = np.random.default_rng(1234)
    name = fixed.normal(size=(L, d)).astype(np.float32)
    dirs = fixed.normal(size=(len(TYPES), max(D, W))).astype(np.float32) * 2
    prompts = {t: fixed.normal(size=(L, d)).astype(np.float32) for t in TYPES}
    samples, feats, prec, rrec = [], {}, {}, {}
    for i in range(n):
        sid, iid = f"{prefix}{i}", f"img-{prefix}{i}"
        m, t = int(rng.integers(3, 8)), int(rng.integers(0, len(TYPES)))
        pos = int(rng.integers(0, m))
        f = rng.normal(size=(m, L, d)).astype(np.float32)
        f[pos] = name + 0.1 * rng.normal(size=(L, d))
        tags = ["O"] * m
        tags[pos] = f"B-{TYPES[t]}"
        samples.append(Sample(sid, iid, [f"w{j}" for j in range(m)], tags))
        feats[sid] = f
        on = {k: dirs[t] if k in signal else 0 * dirs[t] for k in ("pooled", "patches", "regions")}
        prec[iid] = {"pooled": (rng.normal(size=D) + on["pooled"][:D]).astype(np.float32),
                     "patch_tokens": (rng.normal(size=(P, W)) + on["patches"][:W]).astype(np.float32),
                     "is_fallback": np.bool_(False)}
        rrec[iid] = {"feats": (rng.normal(size=(K, D)) + on["regions"][:D]).astype(np.float32),
                     "boxes": np.tile(np.array([0.1, 0.1, 0.5, 0.6], np.float32), (K, 1)),
                     "labels": rng.integers(0, 5, size=K), "scores": rng.uniform(size=K).astype(np.float32),
                     "mask": np.array([True] * (K - 1) + [False]), "is_fallback": np.bool_(False)}
    return samples, MemText(feats, prompts), MemReader(prec), MemReader(rrec)


def tag_index() -> dict[str, int]:
    return {t: i for i, t in enumerate(bio_tags(TYPES))}


def tiny_cfg(**kw) -> MNERConfig:
    base = dict(types=TYPES, **DIMS, hidden=16, layers=1, heads=2, slots_per_type=2, dropout=0.0)
    base.update(kw)
    return MNERConfig(**base)


def make_batch(n: int = 4, seed: int = 0):
    samples, text, pr, rr = synth(n, seed)
    ds = MNERDataset(samples, text, tag_index(), patches=pr, regions=rr)
    tp = type_prompt_tensor(text.type_prompts, TYPES)
    return ds, tp, collate([ds[i] for i in range(len(ds))], tp)


# ---- CRF --------------------------------------------------------------------------------
@torch.no_grad()
def _brute_force(crf, em: torch.Tensor, n: int) -> list[int]:
    best, best_path = -float("inf"), None
    for path in itertools.product(range(em.shape[-1]), repeat=n):
        s = crf.start_transitions[path[0]] + em[0, path[0]]
        for i in range(1, n):
            s = s + crf.transitions[path[i - 1], path[i]] + em[i, path[i]]
        s = s + crf.end_transitions[path[-1]]
        if s > best:
            best, best_path = float(s), list(path)
    return best_path


def test_viterbi_equals_brute_force():
    torch.manual_seed(0)
    model = MNERModel(tiny_cfg(types=["A"]))  # 3 tags: O B-A I-A
    with torch.no_grad():
        for p in model.crf.parameters():
            p.normal_()
    for trial in range(30):
        B, N, T = 3, 4, 3
        em = torch.randn(B, N, T) * 2
        lengths = torch.randint(1, N + 1, (B,))
        mask = torch.arange(N)[None] < lengths[:, None]
        paths = model.decode(em, mask)
        for b in range(B):
            assert paths[b] == _brute_force(model.crf, em[b], int(lengths[b])), (trial, b)


# ---- padding ----------------------------------------------------------------------------
@pytest.mark.parametrize("context,adaptive,pq", [("lstm", "gate", 0), ("transformer", "scalar", 3), ("none", "none", 0)])
def test_padding_never_changes_a_result(context, adaptive, pq):
    torch.manual_seed(1)
    model = MNERModel(tiny_cfg(text_context=context, adaptive=adaptive, patch_queries=pq, layers=2)).eval()
    ds, tp, batch = make_batch(6, seed=3)
    lengths = batch["word_mask"].sum(1)
    assert lengths.min() < lengths.max()  # the batch really pads
    with torch.no_grad():
        em_all = model(batch)["emissions"]
        dec_all = model.decode(em_all, batch["word_mask"])
        for i in range(len(ds)):
            one = collate([ds[i]], tp)
            em_one = model(one)["emissions"]
            n = int(lengths[i])
            assert one["words"].shape[1] == n
            torch.testing.assert_close(em_one[0], em_all[i, :n], atol=1e-5, rtol=1e-4)
            assert model.decode(em_one, one["word_mask"])[0] == dec_all[i]


# ---- ablation switches ------------------------------------------------------------------
def _perturbed(batch: dict, keys: tuple[str, ...]) -> dict:
    out = dict(batch)
    g = torch.Generator().manual_seed(7)
    for k in keys:
        v = batch[k]
        if v.dtype == torch.bool:
            out[k] = ~v if k != "region_mask" else torch.ones_like(v)
        elif v.dtype == torch.long:
            out[k] = (v + 1) % 5
        else:
            out[k] = v + torch.randn(v.shape, generator=g) * 3
    return out


PATCH_KEYS = ("pooled", "patches")
REGION_KEYS = ("region_feats", "region_boxes", "region_labels", "region_scores", "region_mask")


@pytest.mark.parametrize("flags,removed,kept", [
    (dict(use_image=False), PATCH_KEYS + REGION_KEYS, ()),
    (dict(use_patches=False), PATCH_KEYS, REGION_KEYS),
    (dict(use_regions=False), REGION_KEYS, PATCH_KEYS),
    (dict(), (), PATCH_KEYS + REGION_KEYS),
])
def test_ablation_switch_removes_its_input(flags, removed, kept):
    torch.manual_seed(2)
    model = MNERModel(tiny_cfg(**flags)).eval()
    _, _, batch = make_batch(4)
    with torch.no_grad():
        ref = model(batch)["emissions"]
        if removed:
            assert torch.equal(model(_perturbed(batch, removed))["emissions"], ref)
            # the dataset never even reads a removed branch
            for key in removed:
                assert key not in _batch_for(model.cfg)
        for key in kept:  # each input that stays on really matters
            assert not torch.allclose(model(_perturbed(batch, (key,)))["emissions"], ref), key
    if flags.get("use_image") is False:
        assert model.vision is None and all(layer.q_vis is None for layer in model.layers)


def _batch_for(cfg: MNERConfig) -> dict:
    samples, text, pr, rr = synth(2, 0)
    ds = MNERDataset(samples, text, tag_index(), patches=pr if cfg.uses_patches else None,
                     regions=rr if cfg.uses_regions else None)
    return collate([ds[0], ds[1]], type_prompt_tensor(text.type_prompts, TYPES))


def test_no_image_sample_ignores_its_vision_inputs():
    torch.manual_seed(3)
    model = MNERModel(tiny_cfg()).eval()
    _, _, batch = make_batch(3)
    batch["has_image"] = torch.tensor([False, True, True])
    with torch.no_grad():
        ref = model(batch)["emissions"]
        pert = _perturbed(batch, PATCH_KEYS + REGION_KEYS)
        out = model(pert)["emissions"]
    torch.testing.assert_close(out[0], ref[0], atol=0, rtol=0)
    assert not torch.allclose(out[1], ref[1])


# ---- alignment loss ---------------------------------------------------------------------
def test_alignment_loss_counts_only_real_images():
    torch.manual_seed(4)
    model = MNERModel(tiny_cfg(align_pooling="mean")).train()
    _, _, batch = make_batch(4)
    assert model(batch)["align"] is not None
    batch["has_image"] = torch.tensor([True, False, False, False])
    assert model(batch)["align"] is None  # fewer than two real images: skipped
    batch["has_image"] = torch.tensor([True, True, False, False])
    a = model.align_loss(*_align_inputs(model, batch))
    pert = _perturbed(batch, PATCH_KEYS + REGION_KEYS)
    pert["has_image"] = batch["has_image"]
    # only samples 2,3 change -> their vision never reaches the loss
    for k in PATCH_KEYS + REGION_KEYS:
        pert[k][:2] = batch[k][:2]
    torch.testing.assert_close(model.align_loss(*_align_inputs(model, pert)), a)
    # hand check with cls pooling against an explicit InfoNCE
    model.cfg.align_pooling = "cls"
    t, tm, v, vm, hi = _align_inputs(model, batch)
    tv = torch.nn.functional.normalize(model.align_text(t[:2, 0]), dim=-1)
    vv = torch.nn.functional.normalize(model.align_vis(v[:2, 1]), dim=-1)  # index 1: the global image token
    logits = tv @ vv.T / model.cfg.align_temperature
    expect = 0.5 * (torch.logsumexp(logits, 1) - logits.diag() + torch.logsumexp(logits, 0) - logits.diag()).mean()
    torch.testing.assert_close(model.align_loss(t, tm, v, vm, hi), expect)


def _align_inputs(model: MNERModel, batch: dict):
    t = model.text(batch, batch["word_mask"])
    v, vm = model.vision(batch)
    return t, batch["word_mask"], v, vm, batch["has_image"]


# ---- gradients --------------------------------------------------------------------------
def test_gradient_reaches_vision_regions_and_queries():
    torch.manual_seed(5)
    model = MNERModel(tiny_cfg(patch_queries=2, layers=2)).train()
    _, _, batch = make_batch(6)
    out = model(batch)
    loss = model.crf_nll(out["emissions"], batch["tags"], batch["word_mask"]) + 0.1 * out["align"]
    loss.backward()
    must = ["vision.global_proj.1.weight", "vision.patch_proj.1.weight", "vision.resample_queries",
            "vision.region_proj.1.weight", "vision.label_emb.weight", "vision.box_mlp.0.weight",
            "vision.score_emb.weight", "vision.branch.weight", "slot_offset", "query_proj.0.weight",
            "text.layer_logits", "layers.0.q_vis.attn.in_proj_weight", "layers.1.t_q.attn.in_proj_weight",
            "align_vis.weight", "crf.transitions", "gate.weight"]
    grads = dict(model.named_parameters())
    for name in must:
        g = grads[name].grad
        assert g is not None and g.abs().sum() > 0, name
    # queries flow back into the text stream: emissions depend on the slot offsets
    model.eval()
    with torch.no_grad():
        ref = model(batch)["emissions"]
        model.slot_offset.add_(1.0)
        assert not torch.allclose(model(batch)["emissions"], ref)


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="fusion.text_context"):
        tiny_cfg(text_context="gru")
    with pytest.raises(ValueError, match="multiple of fusion.heads"):
        tiny_cfg(hidden=15, heads=2)


def test_dataset_rejects_unknown_tags_and_counts_fallbacks():
    samples, text, pr, rr = synth(3, 0)
    samples[1].tags[0] = "B-ORG"
    with pytest.raises(ValueError, match="B-ORG"):
        MNERDataset(samples, text, tag_index())
    samples, text, pr, rr = synth(3, 0)
    pr.recs[samples[0].image_id]["is_fallback"] = np.bool_(True)
    del rr.recs[samples[2].image_id]
    ds = MNERDataset(samples, text, tag_index(), patches=pr, regions=rr, image_fallback={samples[1].image_id: True})
    b = make_collate(type_prompt_tensor(text.type_prompts, TYPES))([ds[i] for i in range(3)])
    assert b["has_image"].tolist() == [False, False, False]
    assert ds.n_image_fallbacks == 3
    assert ds.fallback_reasons == {"patches": 1, "manifest": 1, "not_in_region_cache": 1}
    assert b["region_mask"][2].sum() == 0 and b["region_feats"][2].abs().sum() == 0  # zero-filled

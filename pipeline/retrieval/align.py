"""Optional light alignment: projection heads trained on cached TRAIN-split embeddings.

Two linear heads (image: D -> d, text: D -> d, no bias) start as the same map (identity when
d = D, else one seeded orthonormal projection), so training starts from the zero-shot
geometry. Loss per batch of train images, each with one of its captions drawn per epoch:

    L = InfoNCE(image, caption) + entity_weight * InfoNCE(image, entity prompts)

both symmetric with temperature ``temperature``; the entity side of a caption is the mean
of its real entity-prompt embeddings (captions without entities sit out of that term).
The text head also maps the prompt and masked-caption embeddings, so EGR runs in the
adapted space. Deterministic: seeded init and batch order, fixed thread count.
This is an option; the zero-shot path stays the default.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.retrieval.data import ALIGNED_IMAGES, DISABLED_MARK, RetrievalSet


@dataclass(frozen=True)
class AlignConfig:
    enabled: bool = False
    dim: int = 0                # output size; 0 keeps the embedding size
    epochs: int = 100
    lr: float = 1e-2
    batch_size: int = 64
    temperature: float = 0.05
    entity_weight: float = 0.5
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 1

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> AlignConfig:
        """From the ``align_retrieval`` params section (checked by pipeline.schema)."""
        from pipeline.schema import validate_section
        validate_section("align_retrieval", p)
        return cls(**{k: p[k] for k in p})


def entity_means(prompt_emb: np.ndarray, n_entities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Nc, D) mean of the real entity-prompt embeddings and (Nc,) bool: has at least one."""
    S = prompt_emb.shape[1]
    n = np.minimum(np.asarray(n_entities), S)
    w = (np.arange(S)[None, :] < n[:, None]).astype(np.float32)  # (Nc, S)
    s = np.einsum("ns,nsd->nd", w, prompt_emb)
    return s / np.maximum(n, 1)[:, None], n > 0


def init_head(D: int, d: int, seed: int) -> np.ndarray:
    """(D, d): identity if d == D, else a seeded orthonormal projection."""
    if d == D:
        return np.eye(D, dtype=np.float32)
    if d > D:
        raise ValueError(f"align_retrieval.dim ({d}) exceeds the embedding size {D}")
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((D, d)))
    return q.astype(np.float32)


def train_heads(train: RetrievalSet, cfg: AlignConfig) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Train the heads on ``train``; returns (W_image (D, d), W_text (D, d), per-epoch history)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    D = train.image_emb.shape[1]
    d = cfg.dim or D
    row_of_cap = {c: i for i, c in enumerate(train.caption_ids)}
    caps_of_img = [[row_of_cap[c] for c in train.i2t_gold[i] if c in row_of_cap] for i in train.image_ids]
    usable = np.array([i for i, cs in enumerate(caps_of_img) if cs], dtype=np.int64)
    if usable.size < 2:
        raise ValueError(f"align: the train split has {usable.size} images with captions; need at least 2")
    ent, has_ent = entity_means(train.prompt_emb, train.n_entities)
    img = torch.from_numpy(train.image_emb)
    cap = torch.from_numpy(train.caption_emb)
    ent_t = torch.from_numpy(ent.astype(np.float32))
    has_t = torch.from_numpy(has_ent)
    w0 = torch.from_numpy(init_head(D, d, cfg.seed))
    wi = torch.nn.Parameter(w0.clone())
    wt = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([wi, wt], lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []

    def nce(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / cfg.temperature  # (B, B)
        y = torch.arange(a.shape[0])
        return (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y)) / 2

    from pipeline.progress import progress

    for epoch in progress(range(cfg.epochs), desc="align", unit="epoch", mininterval=1.0):
        order = rng.permutation(usable)
        picks = np.array([caps_of_img[i][rng.integers(len(caps_of_img[i]))] for i in order], dtype=np.int64)
        tot = {"loss": 0.0, "clip": 0.0, "entity": 0.0}
        n_batches = 0
        for s in range(0, order.size, cfg.batch_size):
            bi, bc = order[s:s + cfg.batch_size], picks[s:s + cfg.batch_size]
            if bi.size < 2:
                continue
            zi = img[bi] @ wi  # (B, d)
            clip = nce(zi, cap[bc] @ wt)
            m = has_t[bc]
            ent_loss = nce(zi[m], ent_t[bc][m] @ wt) if int(m.sum()) >= 2 else torch.zeros(())
            loss = clip + cfg.entity_weight * ent_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot["loss"] += loss.item()
            tot["clip"] += clip.item()
            tot["entity"] += ent_loss.item()
            n_batches += 1
        history.append({"epoch": epoch + 1, **{k: v / max(n_batches, 1) for k, v in tot.items()}})
    return wi.detach().numpy().copy(), wt.detach().numpy().copy(), history


def project(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(..., D) @ (D, d) -> (..., d), rows L2-normalised (zero rows stay zero)."""
    y = (np.asarray(x, np.float32) @ w).astype(np.float32)
    n = np.linalg.norm(y, axis=-1, keepdims=True)
    return np.divide(y, n, out=np.zeros_like(y), where=n > 0)


def t2i_r1(rs: RetrievalSet, img: np.ndarray, cap: np.ndarray) -> float:
    """Text-to-image R@1 (percent) by brute force (for the report)."""
    best = np.argmax(cap @ img.T, axis=1)
    return float(100.0 * np.mean([rs.image_ids[b] in rs.t2i_gold[c] for c, b in zip(rs.caption_ids, best)]))


def write_disabled(out_dir: str | os.PathLike) -> Path:
    """The stub output when alignment is off (byte-stable, so `retrieve` does not rerun)."""
    from pipeline.artifacts import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_json(out / DISABLED_MARK, {"enabled": False})


def run_align(train: RetrievalSet, test: RetrievalSet, cfg: AlignConfig, out_dir: str | os.PathLike,
              provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Train the heads, write the adapted TEST-split embeddings and the heads; returns a report."""
    import pyarrow as pa

    from pipeline.stores.tables import write_caption_features, write_feature_table

    t0 = time.perf_counter()
    wi, wt, history = train_heads(train, cfg)
    train_s = time.perf_counter() - t0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prov = {**dict(provenance), "config": asdict(cfg), "train_images": len(train.image_ids),
            "train_captions": len(train.caption_ids), "final_loss": history[-1] if history else None}
    img = project(test.image_emb, wi)
    write_feature_table(out / ALIGNED_IMAGES, {"image_id": pa.array(test.image_ids, pa.string())}, {"emb": img}, prov)
    cap = project(test.caption_emb, wt)
    write_caption_features(out, test.caption_ids, cap, project(test.prompt_emb, wt), project(test.mask_emb, wt),
                           test.n_entities, prov)
    write_feature_table(out / "heads.parquet", {"name": pa.array(["image", "text"], pa.string())},
                        {"weight": np.stack([wi, wt])}, prov)
    return {"train_s": round(train_s, 3), "history": history,
            "train_t2i_r1": {"zero_shot": t2i_r1(train, train.image_emb, train.caption_emb),
                             "aligned": t2i_r1(train, project(train.image_emb, wi), project(train.caption_emb, wt))},
            "test_t2i_r1": {"zero_shot": t2i_r1(test, test.image_emb, test.caption_emb),
                            "aligned": t2i_r1(test, img, cap)}}

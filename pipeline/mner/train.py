"""Training loop, prediction and checkpoints for the MNER model.

AdamW with per-group learning rates (``lr`` for the network, ``lr_crf`` for the CRF
transitions, ``lr_encoder`` with its own warmup for the tuned top encoder layers when
``text.tune_top`` > 0), linear warmup then linear decay, gradient clipping, early stopping on valid
entity F1, the best weights kept. A fixed seed gives the same parameters and metrics
(single process, no data-loader workers). Each epoch logs its loss parts and valid P/R/F1
to an optional DVCLive ``Live``.
"""
from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.artifacts import atomic_path, canonical_json
from pipeline.metrics.ner import entity_scores
from pipeline.mner.data import MNERDataset
from pipeline.encoders.text import hf_config_dict
from pipeline.mner.model import MNERConfig, MNERModel
from pipeline.progress import progress as progress_bar

CHECKPOINT = "model.pt"


@dataclass
class TrainConfig:
    seed: int = 42
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    lr_crf: float = 1e-2
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    patience: int = 6
    lr_encoder: float = 5e-5
    encoder_warmup_ratio: float = 0.1
    threads: int = 1
    align_weight: float = 0.0

    def __post_init__(self) -> None:
        checks = [(self.epochs >= 1, "train.epochs must be >= 1"), (self.batch_size >= 1, "train.batch_size must be >= 1"),
                  (self.lr > 0 and self.lr_crf > 0 and self.lr_encoder > 0,
                   "train.lr, train.lr_crf and train.lr_encoder must be > 0"),
                  (0 <= self.warmup_ratio < 1 and 0 <= self.encoder_warmup_ratio < 1,
                   "train.warmup_ratio and train.encoder_warmup_ratio must be in [0, 1)"),
                  (self.threads >= 0, "train.threads must be >= 0 (0 = torch's default)"),
                  (self.patience >= 1, "train.patience must be >= 1"), (self.align_weight >= 0, "align.weight must be >= 0")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @classmethod
    def from_params(cls, train: Any, align: Any) -> "TrainConfig":
        """From the ``train`` and ``align`` sections (types and ranges checked by pipeline.schema)."""
        t = {k: train[k] for k in ("seed", "epochs", "batch_size", "lr", "lr_crf", "weight_decay",
                                   "warmup_ratio", "grad_clip", "patience", "lr_encoder", "encoder_warmup_ratio",
                                   "threads")}
        return cls(**t, align_weight=align["weight"])


@dataclass
class FitResult:
    model: MNERModel              # holds the best weights
    best_epoch: int
    best_valid: dict
    history: list[dict] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)  # wall time per epoch (not in the checkpoint)
    counts: dict = field(default_factory=dict)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_linear(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR factor: linear warmup over ``warmup_ratio`` of the steps, then linear decay to 0."""
    warm = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))
    return f


def optimizer_and_schedule(model: MNERModel, cfg: TrainConfig, total_steps: int) -> tuple[Any, Any]:
    """AdamW over the model's groups; each group warms up and decays linearly, the tuned
    encoder layers with ``encoder_warmup_ratio``, the rest with ``warmup_ratio``."""
    groups = model.param_groups(cfg.lr, cfg.lr_crf, cfg.weight_decay, cfg.lr_encoder)
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [
        warmup_linear(total_steps, cfg.encoder_warmup_ratio if g["name"].startswith("encoder") else cfg.warmup_ratio)
        for g in groups])
    return opt, sched


def _loader(ds: MNERDataset, batch_size: int, collate_fn: Callable, shuffle: bool, seed: int = 0) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn, num_workers=0, generator=g)


@torch.no_grad()
def predict(model: MNERModel, ds: MNERDataset, collate_fn: Callable, batch_size: int = 64,
            progress: bool = False) -> list[list[str]]:
    """Predicted tags per sample over the FULL sentence: words cut off by the encoder are ``O``."""
    model.eval()
    out: list[list[str] | None] = [None] * len(ds)
    tags = model.cfg.tags
    for batch in progress_bar(_loader(ds, batch_size, collate_fn, False), desc="predict", unit="batch", disable=not progress):
        em = model(batch)["emissions"]
        for i, path in zip(batch["index"].tolist(), model.decode(em, batch["word_mask"])):
            full = len(ds.samples[i].tokens)
            out[i] = [tags[k] for k in path] + ["O"] * (full - len(path))
    return out  # type: ignore[return-value]


def evaluate(model: MNERModel, ds: MNERDataset, collate_fn: Callable, batch_size: int = 64) -> tuple[dict, list[list[str]]]:
    """Entity scores against the full gold sequences, and the predictions."""
    pred = predict(model, ds, collate_fn, batch_size)
    return entity_scores([s.tags for s in ds.samples], pred), pred


def train_step(model: MNERModel, batch: dict, opt: Any, sched: Any, cfg: TrainConfig) -> dict:
    """One optimisation step; returns the loss parts as floats (``align`` None when unused)."""
    out = model(batch)
    crf = model.crf_nll(out["emissions"], batch["tags"], batch["word_mask"])
    loss, align = crf, None
    if out["align"] is not None and cfg.align_weight > 0:
        loss = loss + cfg.align_weight * out["align"]
        align = out["align"].item()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    sched.step()
    return {"crf": crf.item(), "loss": loss.item(), "align": align}


def fit(model_cfg: MNERConfig, cfg: TrainConfig, train_ds: MNERDataset, valid_ds: MNERDataset,
        collate_fn: Callable, live: Any = None, progress: bool = True,
        encoder_state: dict[str, torch.Tensor] | None = None) -> FitResult:
    """Train from a fixed seed; returns the model with its best-valid-F1 weights.

    ``encoder_state``: pretrained weights of the tuned top encoder layers (``tune_top`` > 0).
    """
    set_seed(cfg.seed)
    model = MNERModel(model_cfg)
    if model.text.top is not None:
        if encoder_state is None:
            raise ValueError("tune_top > 0 needs the pretrained weights of the top encoder layers")
        model.text.top.load_state_dict(encoder_state)
    loader = _loader(train_ds, cfg.batch_size, collate_fn, True, cfg.seed)
    opt, sched = optimizer_and_schedule(model, cfg, cfg.epochs * len(loader))
    best_f1, best_epoch, best_state, best_valid = -1.0, 0, None, {}
    history: list[dict] = []
    bad_epochs = 0
    seconds: list[float] = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        sums = {"crf": 0.0, "align": 0.0, "loss": 0.0}
        n_batches = n_align = 0
        bar = progress_bar(loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=not progress, leave=False)
        for batch in bar:
            parts = train_step(model, batch, opt, sched, cfg)
            if parts["align"] is not None:
                sums["align"] += parts["align"]
                n_align += 1
            sums["crf"] += parts["crf"]
            sums["loss"] += parts["loss"]
            n_batches += 1
            bar.set_postfix(loss=f"{parts['loss']:.3f}")
        scores, _ = evaluate(model, valid_ds, collate_fn)
        m = scores["micro"]
        row = {"epoch": epoch, "loss": sums["loss"] / max(1, n_batches), "loss_crf": sums["crf"] / max(1, n_batches),
               "loss_align": sums["align"] / n_align if n_align else 0.0,
               "valid_precision": m["precision"], "valid_recall": m["recall"], "valid_f1": m["f1"]}
        history.append(row)
        seconds.append(time.perf_counter() - t0)
        if live is not None:
            for k in ("loss", "loss_crf", "loss_align"):
                live.log_metric(f"train/{k}", row[k])
            for k in ("precision", "recall", "f1"):
                live.log_metric(f"valid/{k}", row[f"valid_{k}"])
            live.next_step()
        if progress:
            tqdm.write(f"epoch {epoch}: loss {row['loss']:.4f} (crf {row['loss_crf']:.4f}, align {row['loss_align']:.4f}) "
                       f"valid P {m['precision']:.4f} R {m['recall']:.4f} F1 {m['f1']:.4f}")
        if m["f1"] > best_f1:
            best_f1, best_epoch, best_valid, bad_epochs = m["f1"], epoch, scores, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(model, best_epoch, best_valid, history, seconds)


def save_checkpoint(directory: str | Path, model: MNERModel, meta: dict[str, Any]) -> Path:
    """Write ``model.pt`` (config, label map, weights, meta) and readable JSON beside it, atomically."""
    directory = Path(directory)
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        torch.save({"config": model.cfg.to_dict(), "tags": list(model.cfg.tags),
                    "state_dict": model.state_dict(), "meta": meta}, tmp / CHECKPOINT)
        (tmp / "config.json").write_text(canonical_json({"model": model.cfg.to_dict(), **meta}) + "\n", encoding="utf-8")
        (tmp / "labels.json").write_text(canonical_json(list(model.cfg.tags)) + "\n", encoding="utf-8")
    return directory / CHECKPOINT


def load_checkpoint(directory: str | Path) -> tuple[MNERModel, dict[str, Any]]:
    """The model (eval mode) and the meta dict saved with it."""
    path = Path(directory) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint (run the train stage first)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = MNERModel(MNERConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt["meta"]


def train_config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


@dataclass
class TrainingSetup:
    """Everything a training run on the caches needs, built the one way (stage and benchmarks)."""

    model_cfg: MNERConfig
    train_cfg: TrainConfig
    train_ds: MNERDataset
    valid_ds: MNERDataset
    collate_fn: Callable
    encoder_state: dict | None
    caches: Any
    image_branches: str


def training_setup(dataset: str, fusion: Any, train: Any, align: Any) -> TrainingSetup:
    """Open the caches of ``dataset`` and build the model config, datasets and encoder weights."""
    from pipeline.extract.common import setup_torch
    from pipeline.mner.data import make_collate, open_caches, type_prompt_tensor

    tcfg = TrainConfig.from_params(train, align)
    setup_torch(tcfg.threads)
    use_image = bool(fusion["use_image"])  # a switched-off branch is never opened
    caches = open_caches(dataset, use_image and bool(fusion["use_patches"]), use_image and bool(fusion["use_regions"]))
    types = sorted(caches.text.types)
    dims = caches.dims()
    tune_top = int(caches.text.provenance.get("params", {}).get("tune_top", 0) or 0)
    encoder_state = None
    if tune_top:
        top = load_encoder_top(caches.text, tune_top)
        dims.update(tune_top=tune_top, encoder_config=hf_config_dict(top.config))
        encoder_state = top.state_dict()
    if not caches.has_images:
        dims["use_image"] = False  # recorded in the checkpoint and the metrics: what really ran
    mcfg = MNERConfig.from_params(fusion, align, types=types, **dims)
    image_branches = ("on" if mcfg.has_vision else "off: fusion.use_image is false" if caches.has_images
                      else f"off: dataset {dataset} has no images")
    tag_index = {t: i for i, t in enumerate(mcfg.tags)}
    chars = bool(mcfg.char_dim or mcfg.shape_dim)
    train_ds = caches.dataset_for("train", tag_index, chars=chars, states=bool(tune_top))
    valid_ds = caches.dataset_for("valid", tag_index, chars=chars, states=bool(tune_top))
    collate_fn = make_collate(type_prompt_tensor(caches.text.type_prompts, types))
    return TrainingSetup(mcfg, tcfg, train_ds, valid_ds, collate_fn, encoder_state, caches, image_branches)


def train_on_caches(dataset: str, fusion: Any, train: Any, align: Any, model_dir: str | Path,
                    live_dir: str | Path | None = None, progress: bool = True) -> FitResult:
    """Train on ``features/<dataset>`` + ``data/prepared/<dataset>``; write the best checkpoint.

    ``fusion``, ``train``, ``align`` are the params sections (Mappings). Curves go to a
    DVCLive dir ``live_dir`` (metrics.json + plots/metrics/*.tsv), when given. A dataset
    without images trains the text branch only (``counts["image_branches"]`` says so).
    """
    setup = training_setup(dataset, fusion, train, align)
    mcfg, tcfg, train_ds, valid_ds = setup.model_cfg, setup.train_cfg, setup.train_ds, setup.valid_ds
    collate_fn, encoder_state, caches = setup.collate_fn, setup.encoder_state, setup.caches
    live = None
    if live_dir is not None:
        from dvclive import Live

        live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
    try:
        res = fit(mcfg, tcfg, train_ds, valid_ds, collate_fn, live=live, progress=progress,
                  encoder_state=encoder_state)
        if live is not None:
            live.summary["best_epoch"] = res.best_epoch
            live.summary["best_valid_f1"] = res.best_valid["micro"]["f1"]
    finally:
        if live is not None:
            live.end()
    n_trunc = sum(len(s.tokens) - k for s, k in zip(train_ds.samples, train_ds.kept_words()))
    meta = {
        "dataset": dataset, "train": asdict(tcfg), "inputs": caches.provenance(),
        "best_epoch": res.best_epoch, "best_valid": res.best_valid["micro"], "history": res.history,
        "counts": {"train_samples": len(train_ds), "valid_samples": len(valid_ds),
                   "train_truncated_words": n_trunc, "train_image_fallbacks": train_ds.n_image_fallbacks,
                   "image_branches": setup.image_branches, "tune_top": mcfg.tune_top,
                   "parameters": sum(p.numel() for p in res.model.parameters()),
                   "encoder_parameters": sum(p.numel() for p in res.model.text.top.parameters())
                   if res.model.text.top is not None else 0},
    }
    save_checkpoint(model_dir, res.model, meta)
    res.counts = meta["counts"]
    return res


def load_encoder_top(text: Any, n: int) -> Any:
    """The pretrained top ``n`` layers of the encoder that built the text cache ``text``.

    The weights must be the ones the cache was made with (same sha256 as its provenance).
    """
    from pipeline.artifacts import weights_id
    from pipeline.encoders.text import EncoderTop, resolve_text_model

    enc = text.provenance.get("encoder", {})
    path = resolve_text_model(enc["model"])
    want, have = enc.get("weights", {}).get("sha256"), weights_id(str(path))
    if want and want != have:
        raise RuntimeError(f"{text.dir}: the text cache was built with other weights of {enc['model']} "
                           f"({want[:12]}..., now {have[:12]}... at {path}); rerun the text stage")
    return EncoderTop.from_pretrained(path, n)

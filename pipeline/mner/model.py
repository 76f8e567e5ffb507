"""The MNER model trained on cached tensors: vision tokens, text stream, type queries,
query-guided fusion, adaptive fusion, emissions + linear-chain CRF, alignment loss.

Every part is trainable (no ``no_grad`` anywhere in the forward pass); the frozen encoders
live upstream, in the extraction stages. The CRF runs over WORD positions only (one
position per word, masked by ``word_mask``), never over sub-words or special tokens.

Batch layout (see :mod:`pipeline.mner.data`):
  words (B, N, L, d_t) float, word_mask (B, N) bool, tags (B, N) long,
  chars (B, N, C) long, shapes (B, N) long (character features, when on),
  sub_states (B, S, d_t), sub_mask (B, S) bool, first (B, N) long (``tune_top`` > 0),
  pooled (B, D), patches (B, P, W),
  region_feats (B, K, Dr), region_boxes (B, K, 4) normalised x1y1x2y2, region_labels (B, K) long,
  region_scores (B, K), region_mask (B, K) bool, has_image (B,) bool,
  type_prompts (T, L, d_t).
Keys of inputs that the config switches off may be absent.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchcrf import CRF

TEXT_CONTEXTS = ("lstm", "transformer", "none")
ADAPTIVE = ("gate", "scalar", "none")
POOLINGS = ("mean", "cls")


def bio_tags(types: list[str]) -> list[str]:
    """The label map: ``O`` then ``B-T``, ``I-T`` for each type, in the given order."""
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


@dataclass
class MNERConfig:
    """Everything needed to rebuild the model (stored in the checkpoint)."""

    types: list[str]                 # entity types, in the order of the type prompts
    d_text: int                      # word feature size d_t
    n_text_layers: int = 1           # L: encoder layers stored per word
    d_pooled: int = 0                # D: pooled image embedding size
    d_patch: int = 0                 # W: patch token width
    d_region: int = 0                # Dr: region feature size
    n_region_labels: int = 91        # detector class ids 0..n-1; others map to an "unknown" slot
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    slots_per_type: int = 2
    text_context: str = "lstm"
    adaptive: str = "gate"
    patch_queries: int = 0
    dropout: float = 0.1
    use_image: bool = True
    use_patches: bool = True
    use_regions: bool = True
    align_pooling: str = "mean"
    align_temperature: float = 0.07
    char_dim: int = 0                # character CNN output size (0 = off)
    shape_dim: int = 0               # word-shape embedding size (0 = off)
    tune_top: int = 0                # encoder layers tuned on the cached sub-word states (0 = frozen)
    text_layers: list[int] = field(default_factory=list)  # stored layers as hidden_states indices (0..depth)
    depth: int = 0                   # encoder layers in all (hidden_states has depth + 1 entries)
    encoder_config: dict = field(default_factory=dict)  # Hugging Face config of the tuned layers
    tags: list[str] = field(default_factory=list)  # filled from types when empty

    def __post_init__(self) -> None:
        if not self.tags:
            self.tags = bio_tags(list(self.types))
        checks = [
            (self.text_context in TEXT_CONTEXTS, f"fusion.text_context: {self.text_context!r} is not one of {TEXT_CONTEXTS}"),
            (self.adaptive in ADAPTIVE, f"fusion.adaptive: {self.adaptive!r} is not one of {ADAPTIVE}"),
            (self.align_pooling in POOLINGS, f"align.pooling: {self.align_pooling!r} is not one of {POOLINGS}"),
            (self.hidden > 0 and self.hidden % self.heads == 0, f"fusion.hidden ({self.hidden}) must be a positive multiple of fusion.heads ({self.heads})"),
            (self.text_context != "lstm" or self.hidden % 2 == 0, f"fusion.hidden ({self.hidden}) must be even for the BiLSTM context"),
            (self.layers >= 0, f"fusion.layers must be >= 0, got {self.layers}"),
            (self.slots_per_type >= 1, f"fusion.slots_per_type must be >= 1, got {self.slots_per_type}"),
            (self.patch_queries >= 0, f"fusion.patch_queries must be >= 0, got {self.patch_queries}"),
            (0.0 <= self.dropout < 1.0, f"fusion.dropout must be in [0, 1), got {self.dropout}"),
            (self.align_temperature > 0, f"align.temperature must be > 0, got {self.align_temperature}"),
            (len(self.types) > 0, "no entity types (the text cache holds no type prompts)"),
            (not self.uses_patches or (self.d_pooled > 0 and self.d_patch > 0), "patch branch on but d_pooled / d_patch unknown"),
            (not self.uses_regions or self.d_region > 0, "region branch on but d_region unknown"),
            (self.char_dim >= 0 and self.shape_dim >= 0, "fusion.char_dim and fusion.shape_dim must be >= 0"),
            (self.tune_top == 0 or (0 < self.tune_top <= self.depth and self.encoder_config
                                    and len(self.text_layers) == self.n_text_layers),
             f"tune_top {self.tune_top} needs the encoder's config, depth and stored layers"),
            (self.tune_top == 0 or bool(self.tuned_slots),
             f"text.tune_top: {self.tune_top} tunes hidden_states {self.depth - self.tune_top + 1}..{self.depth}, "
             f"but text.layers stores none of them ({self.text_layers}); add -1 to text.layers"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def uses_patches(self) -> bool:
        return bool(self.use_image and self.use_patches)

    @property
    def uses_regions(self) -> bool:
        return bool(self.use_image and self.use_regions)

    @property
    def has_vision(self) -> bool:
        return self.uses_patches or self.uses_regions

    @property
    def tuned_slots(self) -> dict[int, int]:
        """Stored-layer slot -> output of the tuned top layers that replaces it."""
        if not self.tune_top:
            return {}
        base = self.depth - self.tune_top  # hidden_states index of the cached input
        return {j: a - base - 1 for j, a in enumerate(self.text_layers) if a > base}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_params(cls, fusion: Any, align: Any, **dims: Any) -> "MNERConfig":
        """Build from the ``fusion`` and ``align`` params sections plus data dimensions."""
        keys = ("hidden", "layers", "heads", "slots_per_type", "text_context", "adaptive",
                "patch_queries", "dropout", "use_image", "use_patches", "use_regions", "char_dim", "shape_dim")
        kw = {k: fusion[k] for k in keys}
        kw["align_pooling"] = align["pooling"]
        kw["align_temperature"] = align["temperature"]
        kw.update(dims)  # data dimensions, and what the data forces (use_image False without images)
        return cls(**kw)


def _ensure_one(mask: torch.Tensor) -> torch.Tensor:
    """Rows with no valid key get their first key switched on (avoids NaN softmax); (B, M)."""
    empty = ~mask.any(dim=1)
    if empty.any():
        mask = mask.clone()
        mask[empty, 0] = True
    return mask


class CrossBlock(nn.Module):
    """x attends to kv; residual + layer norm."""

    def __init__(self, h: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(h, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(h)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None) -> torch.Tensor:
        # x (B, M, h), kv (B, M', h), kv_mask (B, M') True = valid
        pad = None if kv_mask is None else ~kv_mask
        out, _ = self.attn(x, kv, kv, key_padding_mask=pad, need_weights=False)
        return self.norm(x + self.drop(out))


class FFNBlock(nn.Module):
    def __init__(self, h: int, dropout: float, mult: int = 2) -> None:
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(h, mult * h), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * h, h))
        self.norm = nn.LayerNorm(h)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop(self.ff(x)))


class FusionLayer(nn.Module):
    """One query-guided fusion layer.

    queries <- text, queries <- vision, FFN; text <- vision, text <- queries, FFN.
    The last text step is what lets the (vision-informed) queries steer the tagger.
    """

    def __init__(self, h: int, heads: int, dropout: float, vision: bool) -> None:
        super().__init__()
        self.q_text = CrossBlock(h, heads, dropout)
        self.q_vis = CrossBlock(h, heads, dropout) if vision else None
        self.q_ffn = FFNBlock(h, dropout)
        self.t_vis = CrossBlock(h, heads, dropout) if vision else None
        self.t_q = CrossBlock(h, heads, dropout)
        self.t_ffn = FFNBlock(h, dropout)

    def forward(self, q: torch.Tensor, t: torch.Tensor, t_mask: torch.Tensor,
                v: torch.Tensor | None, v_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # q (B, Q, h), t (B, N, h), t_mask (B, N), v (B, V, h), v_mask (B, V)
        q = self.q_text(q, t, t_mask)
        if self.q_vis is not None and v is not None:
            q = self.q_vis(q, v, v_mask)
        q = self.q_ffn(q)
        if self.t_vis is not None and v is not None:
            t = self.t_vis(t, v, v_mask)
        t = self.t_q(t, q, None)
        t = self.t_ffn(t)
        return q, t


class VisionTokens(nn.Module):
    """Patch branch (global token + patch tokens, optionally resampled) and region branch.

    Output tokens: [null] + [global, patches...] + [regions...] with a branch-type embedding;
    the learned null token is always present so attention has a key even without an image.
    Tokens of samples without a real image (``has_image`` False) are masked out.
    """

    NULL, PATCH, REGION = 0, 1, 2

    def __init__(self, cfg: MNERConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.cfg = cfg
        self.null = nn.Parameter(torch.randn(h) * 0.02)
        self.branch = nn.Embedding(3, h)
        if cfg.uses_patches:
            self.global_proj = nn.Sequential(nn.LayerNorm(cfg.d_pooled), nn.Linear(cfg.d_pooled, h))
            self.patch_proj = nn.Sequential(nn.LayerNorm(cfg.d_patch), nn.Linear(cfg.d_patch, h))
            if cfg.patch_queries > 0:
                self.resample_queries = nn.Parameter(torch.randn(cfg.patch_queries, h) * 0.02)
                self.resampler = CrossBlock(h, cfg.heads, cfg.dropout)
        if cfg.uses_regions:
            self.region_proj = nn.Sequential(nn.LayerNorm(cfg.d_region), nn.Linear(cfg.d_region, h))
            self.label_emb = nn.Embedding(cfg.n_region_labels + 1, h)  # last row: unknown label
            self.box_mlp = nn.Sequential(nn.Linear(5, h), nn.GELU(), nn.Linear(h, h))
            self.score_emb = nn.Linear(1, h)
            self.region_norm = nn.LayerNorm(h)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        has_image = batch["has_image"].bool()  # (B,)
        B = has_image.shape[0]
        h = self.null.shape[0]
        tokens = [(self.null + self.branch.weight[self.NULL]).expand(B, 1, h)]
        masks = [torch.ones(B, 1, dtype=torch.bool, device=has_image.device)]
        if self.cfg.uses_patches:
            g = self.global_proj(batch["pooled"].float())[:, None]  # (B, 1, h)
            p = self.patch_proj(batch["patches"].float())  # (B, P, h)
            if self.cfg.patch_queries > 0:
                q = self.resample_queries.expand(B, -1, -1)  # (B, Q, h)
                p = self.resampler(q, p, None)  # (B, Q, h)
            pt = torch.cat([g, p], dim=1) + self.branch.weight[self.PATCH]
            tokens.append(pt)
            masks.append(has_image[:, None].expand(B, pt.shape[1]))
        if self.cfg.uses_regions:
            boxes = batch["region_boxes"].float()  # (B, K, 4)
            area = ((boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0))
            labels = batch["region_labels"].long()
            labels = torch.where((labels < 0) | (labels >= self.cfg.n_region_labels),
                                 torch.full_like(labels, self.cfg.n_region_labels), labels)
            r = (self.region_proj(batch["region_feats"].float())
                 + self.label_emb(labels)
                 + self.box_mlp(torch.cat([boxes, area[..., None]], dim=-1))
                 + self.score_emb(batch["region_scores"].float()[..., None]))
            r = self.region_norm(r) + self.branch.weight[self.REGION]  # (B, K, h)
            tokens.append(r)
            masks.append(batch["region_mask"].bool() & has_image[:, None])
        return torch.cat(tokens, dim=1), torch.cat(masks, dim=1)


class TextStream(nn.Module):
    """Word features -> (B, N, h): the tuned top encoder layers (``tune_top`` > 0) replace their
    cached layers, a learned softmax mix over the stored layers, character and word-shape
    features concatenated, projection to h, optional context layer."""

    def __init__(self, cfg: MNERConfig) -> None:
        super().__init__()
        from pipeline.mner.chars import SHAPES, CharCNN

        h = cfg.hidden
        self.cfg = cfg
        self.layer_logits = nn.Parameter(torch.zeros(cfg.n_text_layers))
        self.top = None
        if cfg.tune_top:
            from pipeline.encoders.text import EncoderTop

            self.top = EncoderTop(cfg.encoder_config, cfg.tune_top)
        self.chars = CharCNN(cfg.char_dim) if cfg.char_dim else None
        self.shapes = nn.Embedding(len(SHAPES), cfg.shape_dim, padding_idx=0) if cfg.shape_dim else None
        self.proj = nn.Sequential(nn.Linear(cfg.d_text + cfg.char_dim + cfg.shape_dim, h), nn.LayerNorm(h))
        self.drop = nn.Dropout(cfg.dropout)
        self.kind = cfg.text_context
        if cfg.text_context == "lstm":
            self.context = nn.LSTM(h, h // 2, batch_first=True, bidirectional=True)
            self.norm = nn.LayerNorm(h)
        elif cfg.text_context == "transformer":
            self.context = nn.TransformerEncoderLayer(h, cfg.heads, 2 * h, cfg.dropout, batch_first=True)

    def mix(self, feats: torch.Tensor) -> torch.Tensor:
        # feats (..., L, d_t) -> (..., d_t)
        w = torch.softmax(self.layer_logits, dim=0)
        return (feats.float() * w[:, None]).sum(dim=-2)

    def layer_features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, N, L, d_t): the cached layers, with the tuned layers' outputs at first sub-words."""
        words = batch["words"].float()
        if self.top is None:
            return words
        outs = self.top(batch["sub_states"].float(), batch["sub_mask"].bool())  # [(B, S, d_t)] * tune_top
        idx = batch["first"].long()[..., None].expand(-1, -1, words.shape[-1])  # (B, N, d_t)
        slots = self.cfg.tuned_slots
        cols = [outs[slots[j]].gather(1, idx) if j in slots else words[:, :, j] for j in range(words.shape[2])]
        return torch.stack(cols, dim=2)

    def forward(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        # mask (B, N) -> (B, N, h)
        parts = [self.mix(self.layer_features(batch))]
        if self.chars is not None:
            parts.append(self.chars(batch["chars"]))
        if self.shapes is not None:
            parts.append(self.shapes(batch["shapes"]))
        x = self.drop(self.proj(torch.cat(parts, dim=-1)))
        if self.kind == "lstm":
            lengths = mask.sum(dim=1).clamp(min=1).cpu()
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, _ = self.context(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
            x = self.norm(x + self.drop(out))
        elif self.kind == "transformer":
            x = self.context(x, src_key_padding_mask=~_ensure_one(mask))
        return x


class MNERModel(nn.Module):
    """Query-guided multimodal tagger with a CRF over words."""

    def __init__(self, cfg: MNERConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.text = TextStream(cfg)
        self.vision = VisionTokens(cfg) if cfg.has_vision else None
        T, S = len(cfg.types), cfg.slots_per_type
        self.query_proj = nn.Sequential(nn.Linear(cfg.d_text, h), nn.LayerNorm(h))
        self.slot_offset = nn.Parameter(torch.randn(T, S, h) * 0.02)
        self.layers = nn.ModuleList(FusionLayer(h, cfg.heads, cfg.dropout, cfg.has_vision) for _ in range(cfg.layers))
        if cfg.adaptive == "gate":
            self.gate = nn.Linear(2 * h, h)
        elif cfg.adaptive == "scalar":
            self.alpha = nn.Parameter(torch.tensor(0.5))  # weight of the plain text stream
            self.beta = nn.Parameter(torch.tensor(0.5))   # weight of the fused stream
        self.drop = nn.Dropout(cfg.dropout)
        self.emit = nn.Linear(h, len(cfg.tags))
        self.crf = CRF(len(cfg.tags), batch_first=True)
        if cfg.has_vision:
            self.align_text = nn.Linear(h, h)
            self.align_vis = nn.Linear(h, h)

    # ---- parts ---------------------------------------------------------------------------
    def queries(self, type_prompts: torch.Tensor, batch_size: int) -> torch.Tensor:
        # type_prompts (T, L, d_t) -> (B, T*S, h)
        base = self.query_proj(self.text.mix(type_prompts))  # (T, h)
        q = (base[:, None, :] + self.slot_offset).reshape(-1, base.shape[-1])  # (T*S, h)
        return q.expand(batch_size, -1, -1)

    def _adapt(self, plain: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
        if self.cfg.adaptive == "gate":
            g = torch.sigmoid(self.gate(torch.cat([plain, fused], dim=-1)))  # (B, N, h)
            return g * fused + (1 - g) * plain
        if self.cfg.adaptive == "scalar":
            return self.alpha * plain + self.beta * fused
        return fused

    def align_loss(self, text: torch.Tensor, t_mask: torch.Tensor, vis: torch.Tensor,
                   v_mask: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor | None:
        """Symmetric InfoNCE between pooled text and pooled vision over samples with an image.

        ``None`` when fewer than two samples qualify. The null vision token is not pooled.
        """
        vis, v_mask = vis[:, 1:], v_mask[:, 1:]  # drop the null token
        ok = has_image.bool() & v_mask.any(dim=1) & t_mask.any(dim=1)
        if int(ok.sum()) < 2:
            return None
        text, t_mask, vis, v_mask = text[ok], t_mask[ok], vis[ok], v_mask[ok]
        if self.cfg.align_pooling == "mean":
            tv = (text * t_mask[..., None]).sum(1) / t_mask.sum(1, keepdim=True)
            vv = (vis * v_mask[..., None]).sum(1) / v_mask.sum(1, keepdim=True)
        else:  # cls: first word; first valid vision token (the global image token when patches are on)
            tv = text[:, 0]
            first = v_mask.float().argmax(dim=1)
            vv = vis[torch.arange(vis.shape[0], device=vis.device), first]
        tv = F.normalize(self.align_text(tv), dim=-1)
        vv = F.normalize(self.align_vis(vv), dim=-1)
        logits = tv @ vv.T / self.cfg.align_temperature  # (B', B')
        target = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    # ---- forward -------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """Emissions (B, N, n_tags) and the alignment loss (or None)."""
        t_mask = batch["word_mask"].bool()  # (B, N)
        B = t_mask.shape[0]
        plain = self.text(batch, t_mask)  # (B, N, h)
        v = v_mask = None
        if self.vision is not None:
            v, v_mask = self.vision(batch)  # (B, V, h), (B, V)
        q = self.queries(batch["type_prompts"], B)
        t = plain
        t_keys = _ensure_one(t_mask)
        for layer in self.layers:
            q, t = layer(q, t, t_keys, v, v_mask)
        fused = self._adapt(plain, t)
        emissions = self.emit(self.drop(fused))  # (B, N, n_tags)
        align = None
        if self.vision is not None and self.training:
            align = self.align_loss(plain, t_mask, v, v_mask, batch["has_image"])
        return {"emissions": emissions, "align": align}

    def crf_nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood over the batch; (B, N, n_tags), (B, N), (B, N)."""
        return -self.crf(emissions, tags, mask=_crf_mask(mask), reduction="mean")

    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """Viterbi paths, one per sample, each as long as its word mask."""
        paths = self.crf.decode(emissions, mask=_crf_mask(mask))
        lengths = mask.bool().sum(dim=1).tolist()
        return [p[:n] for p, n in zip(paths, lengths)]

    def param_groups(self, lr: float, lr_crf: float, weight_decay: float,
                     lr_encoder: float | None = None) -> list[dict]:
        """AdamW groups: decayed weights, non-decayed (biases, norms, embeddings offsets), CRF,
        and the tuned encoder layers (``lr_encoder``; decayed except biases and LayerNorms)."""
        crf, decay, no_decay, enc_decay, enc_no_decay = [], [], [], [], []
        for name, p in self.named_parameters():
            if name.startswith("text.top."):
                (enc_decay if p.ndim >= 2 else enc_no_decay).append(p)
            elif name.startswith("crf."):
                crf.append(p)
            elif p.ndim >= 2 and "norm" not in name and not name.endswith(("slot_offset", "null")):
                decay.append(p)
            else:
                no_decay.append(p)
        return [
            {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
            {"params": crf, "lr": lr_crf, "weight_decay": 0.0, "name": "crf"},
        ] + ([] if not (enc_decay or enc_no_decay) else [
            {"params": enc_decay, "lr": lr_encoder or lr, "weight_decay": weight_decay, "name": "encoder"},
            {"params": enc_no_decay, "lr": lr_encoder or lr, "weight_decay": 0.0, "name": "encoder_no_decay"},
        ])


def _crf_mask(mask: torch.Tensor) -> torch.Tensor:
    """torchcrf needs the first step on for every sample; empty samples get it (ignored later)."""
    mask = mask.bool()
    if not mask[:, 0].all():
        mask = mask.clone()
        mask[:, 0] = True
    return mask

"""Frozen CLIP (open_clip) from a local checkpoint: image embeddings, patch tokens, text embeddings.

``load_clip(params["clip"])`` builds an open_clip model by name (built-in configs plus the
configs shipped in ``pipeline/encoders/model_configs``) and loads a LOCAL checkpoint; nothing
is ever downloaded. Accepted checkpoints:

- ``random-init``: the architecture with a fixed torch seed (deterministic; recorded as such);
- open_clip / HF-style state dicts: ``.pt``, ``.pth``, ``.bin`` (loaded weights-only) and ``.safetensors``;
- OpenAI TorchScript archives (e.g. ``ViT-L-14.pt``): need a ``-quickgelu`` model config and
  ``clip.trusted_torchscript: true``, because loading them runs pickled code (not weights-only).

``encode_images`` returns the projected pooled embedding exactly as ``model.encode_image``
gives it (NOT normalised; retrieval normalises) and the patch tokens after the final layer
norm, before projection (open_clip ``VisionTransformer.output_tokens``).

``clip.precision: bf16`` runs the image tower under bfloat16 autocast (matrix products and
convolutions in bfloat16, layer norms, softmax and the residual stream in float32; the
weights of those products are cast once at load, not per batch, and attention is computed
with ``scaled_dot_product_attention`` on contiguous tensors, which autocast's slow
``nn.MultiheadAttention`` path would not do). It changes the features, so the image stages
put the precision used in their fingerprints. On a CPU without bfloat16 instructions
(``avx512_bf16``/``amx_bf16`` on x86, ``bf16`` on Arm, per /proc/cpuinfo) it falls back to
fp32 with a message, and the fallback is what gets recorded. The text tower always runs in fp32.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import types
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.artifacts import RANDOM_INIT, sha256_file
from pipeline.paths import project_path

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
RANDOM_INIT_SEED = 0
_STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
PRECISIONS = ("fp32", "bf16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 flags / Arm Features that mean native bfloat16


class ClipLoadError(RuntimeError):
    """The CLIP params name a model or checkpoint that cannot be loaded."""


@dataclass
class ClipBundle:
    """A frozen CLIP model ready for inference, with what is needed to reproduce it."""

    model: torch.nn.Module  # model.visual returns (pooled, tokens): output_tokens is on
    preprocess: Callable  # PIL image -> (3, S, S) float tensor (open_clip eval transform)
    tokenizer: Callable  # list[str] -> (N, context_length) long tensor (open_clip BPE)
    provenance: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: dict[str, Any] = field(default_factory=lambda: {"requested": "fp32", "used": "fp32"})

    @property
    def precision_used(self) -> str:
        """``fp32`` or ``bf16``: what the image tower really runs in (the fingerprint's value)."""
        return str(self.precision["used"])

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def width(self) -> int:
        return int(self.model.visual.transformer.width)

    @property
    def image_size(self) -> tuple[int, int]:
        s = self.model.visual.image_size
        return (int(s[0]), int(s[1])) if isinstance(s, (tuple, list)) else (int(s), int(s))

    @property
    def n_patches(self) -> int:
        gh, gw = self.model.visual.grid_size
        return int(gh) * int(gw)


@contextlib.contextmanager
def _quiet_open_clip():
    """Silence open_clip's 'no pretrained weights loaded' warning: weights are loaded here, not there."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def register_model_configs() -> None:
    """Make the configs in ``pipeline/encoders/model_configs`` known to open_clip (idempotent)."""
    import open_clip
    from open_clip import factory

    if MODEL_CONFIG_DIR not in [Path(p) for p in factory._MODEL_CONFIG_PATHS]:
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def is_torchscript_file(path: str | Path) -> bool:
    """True if ``path`` is a TorchScript archive (``torch.jit.save``), not a plain state dict."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    # torch.jit.save archives carry the serialized code and constants; torch.save ones do not
    return any(n.endswith("/constants.pkl") for n in names) or any("/code/" in n for n in names)


def preprocess_description(model: torch.nn.Module, preprocess: Callable) -> dict[str, Any]:
    """A JSON-able description of the image preprocessing (goes into fingerprints)."""
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    return {"cfg": {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(cfg.items())},
            "transform": repr(preprocess)}


def _load_torchscript(model: torch.nn.Module, path: Path) -> None:
    """Copy the weights of a (trusted) TorchScript CLIP archive into ``model`` (strict)."""
    scripted = torch.jit.load(str(path), map_location="cpu")
    state = dict(scripted.state_dict())
    del scripted
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI archive extras
        state.pop(key, None)
    # buffers the open_clip module keeps out of its state dict (e.g. the causal attn_mask)
    non_persistent = set(dict(model.named_buffers())) - set(model.state_dict())
    for key in non_persistent:
        state.pop(key, None)
    model.load_state_dict(state, strict=True)


# ---- precision ------------------------------------------------------------------------------

def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo (x86 ``flags``, Arm ``Features``); {} if unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def resolve_precision(requested: str, device: torch.device, flags: set[str] | None = None) -> dict[str, Any]:
    """``{"requested", "used"[, "fallback"]}``: bf16 runs only where the hardware has bfloat16 arithmetic."""
    if requested not in PRECISIONS:
        raise ClipLoadError(f"params.yaml: clip.precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    out: dict[str, Any] = {"requested": requested, "used": requested}
    if requested == "fp32":
        return out
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            out.update(used="fp32", fallback=f"{device} has no bfloat16 support")
        return out
    if device.type != "cpu":
        out.update(used="fp32", fallback=f"bf16 autocast is not supported here on device {device}")
        return out
    flags = cpu_flags() if flags is None else flags
    have = sorted(set(CPU_BF16_FLAGS) & flags)
    if have:
        out["cpu_flags"] = have
    else:
        out.update(used="fp32", fallback="this CPU has no bfloat16 instructions (none of "
                                         f"{', '.join(CPU_BF16_FLAGS)} in /proc/cpuinfo)")
    return out


def _sdpa_attention(self: torch.nn.Module, q_x: torch.Tensor, k_x: torch.Tensor | None = None,
                    v_x: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """open_clip ``ResidualAttentionBlock.attention`` (self-attention, no mask) on contiguous tensors.

    The same arithmetic as ``nn.MultiheadAttention``; under autocast its slow path multiplies a
    transposed input, which copies the in-projection weight once per token position.
    """
    attn = self.attn
    if k_x is not None or v_x is not None or attn_mask is not None:
        return self._mha_attention(q_x, k_x, v_x, attn_mask)
    x = q_x if attn.batch_first else q_x.transpose(0, 1)  # (N, L, E)
    n, length, e = x.shape
    h = attn.num_heads
    qkv = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (N, L, 3E)
    q, k, v = qkv.view(n, length, 3, h, e // h).permute(2, 0, 3, 1, 4)  # each (N, h, L, E/h)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (N, h, L, E/h)
    o = torch.nn.functional.linear(o.transpose(1, 2).reshape(n, length, e), attn.out_proj.weight, attn.out_proj.bias)
    return o if attn.batch_first else o.transpose(0, 1)


def _enable_bf16(visual: torch.nn.Module, device: torch.device) -> None:
    """Run ``visual`` under bfloat16 autocast: product weights cast once, attention on contiguous tensors."""
    from open_clip.transformer import ResidualAttentionBlock

    for m in visual.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.to(torch.bfloat16)
        elif isinstance(m, torch.nn.MultiheadAttention) and m.in_proj_weight is not None:
            m.in_proj_weight.data = m.in_proj_weight.data.to(torch.bfloat16)
            if m.in_proj_bias is not None:
                m.in_proj_bias.data = m.in_proj_bias.data.to(torch.bfloat16)
        if isinstance(m, ResidualAttentionBlock) and isinstance(getattr(m, "attn", None), torch.nn.MultiheadAttention) \
                and m.attn.in_proj_weight is not None:
            m._mha_attention = m.attention
            m.attention = types.MethodType(_sdpa_attention, m)
    if isinstance(getattr(visual, "proj", None), torch.nn.Parameter):
        visual.proj.data = visual.proj.data.to(torch.bfloat16)
    forward = visual.forward

    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    visual.forward = autocast_forward


def load_clip(params_clip: Mapping[str, Any], device: str | None = None, image_tower: bool = True) -> ClipBundle:
    """Build the frozen CLIP model that ``params_clip`` (the ``clip`` params section) names.

    ``image_tower=False``: for text only (the captions stage). ``clip.precision`` is checked
    but not applied: the text tower runs fp32 anyway, so a CPU without bfloat16 gets no message.
    """
    import open_clip

    register_model_configs()
    name = str(params_clip["model"])
    checkpoint = str(params_clip["checkpoint"] or "")
    trusted = bool(params_clip.get("trusted_torchscript", False))
    device = torch.device(device or params_clip.get("device", "cpu") or "cpu")

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ClipLoadError(
            f"params.yaml: clip.model: unknown open_clip model {name!r}; use a built-in name "
            f"(open_clip.list_models()) or a config in {MODEL_CONFIG_DIR}")

    if not checkpoint or checkpoint == RANDOM_INIT:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            with _quiet_open_clip():
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device="cpu")
        weights = {"checkpoint": RANDOM_INIT, "sha256": RANDOM_INIT, "seed": RANDOM_INIT_SEED, "format": RANDOM_INIT}
    else:
        path = project_path(checkpoint)
        if not path.is_file():
            raise ClipLoadError(f"params.yaml: clip.checkpoint: file {path} not found "
                                f"(a local open_clip .pt/.bin/.safetensors or OpenAI TorchScript file, or random-init)")
        if is_torchscript_file(path):
            if not trusted:
                raise ClipLoadError(
                    f"params.yaml: clip.checkpoint: {path} is a TorchScript archive; loading it runs pickled "
                    f"code. Set clip.trusted_torchscript: true only if you trust the file")
            if not cfg.get("quick_gelu", False):
                raise ClipLoadError(
                    f"params.yaml: clip.model: {name!r} uses GELU, but the OpenAI TorchScript checkpoint {path} "
                    f"was trained with QuickGELU; use the '-quickgelu' variant (e.g. {name}-quickgelu)")
            fmt, weights_only = "torchscript", False
        elif path.suffix in _STATE_DICT_SUFFIXES:
            fmt, weights_only = ("safetensors" if path.suffix == ".safetensors" else "state_dict"), True
        else:
            raise ClipLoadError(f"params.yaml: clip.checkpoint: {path}: unsupported file type {path.suffix!r} "
                                f"(expected one of {', '.join(_STATE_DICT_SUFFIXES)})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            with _quiet_open_clip():
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device="cpu")
        try:
            if fmt == "torchscript":
                _load_torchscript(model, path)
            else:
                open_clip.load_checkpoint(model, str(path), strict=True, weights_only=weights_only)
        except Exception as e:  # wrong architecture, corrupt file, pickle refused by weights_only ...
            raise ClipLoadError(f"params.yaml: clip.checkpoint: cannot load {path} into {name!r} "
                                f"({type(e).__name__}: {e})") from e
        weights = {"checkpoint": checkpoint, "sha256": sha256_file(path), "format": fmt}

    visual = model.visual
    if not hasattr(visual, "output_tokens") or not hasattr(visual, "transformer"):
        raise ClipLoadError(f"params.yaml: clip.model: {name!r} has a {type(visual).__name__} image tower; "
                            f"patch tokens need an open_clip VisionTransformer (a ViT model)")
    visual.output_tokens = True  # visual(x) -> (pooled (B, D), tokens (B, P, W))
    model = model.to(device).eval().requires_grad_(False)
    requested = str(params_clip.get("precision", "fp32") or "fp32")
    precision = resolve_precision(requested, device)
    if not image_tower:  # clip.precision concerns the image tower only
        precision = {"requested": requested, "used": "fp32"}
    if precision.get("fallback"):
        print(f"clip.precision: bf16 requested, running fp32: {precision['fallback']} (recorded as fp32 in the "
              f"fingerprint and the report; set clip.precision: fp32 to silence this)", file=sys.stderr)
    if precision["used"] == "bf16":
        _enable_bf16(visual, device)
    tokenizer = open_clip.get_tokenizer(name)
    provenance = {
        "model": name,
        "weights": weights,
        "preprocessing": preprocess_description(model, preprocess),
        "embed_dim": int(visual.output_dim),
        "patch_width": int(visual.transformer.width),
    }
    return ClipBundle(model=model, preprocess=preprocess, tokenizer=tokenizer, provenance=provenance, device=device,
                      precision=precision)


@torch.inference_mode()
def encode_images(bundle: ClipBundle, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed images (B, 3, S, S) -> pooled (B, D) projected embedding, patch tokens (B, P, W).

    ``pooled`` is exactly ``model.encode_image(batch)`` (unnormalised); ``tokens`` are the
    final-layer-norm outputs at the patch positions (class token excluded), before projection.
    Both are float32 on the CPU (with ``clip.precision: bf16``, bfloat16 values widened).
    """
    pooled, tokens = bundle.model.visual(batch.to(bundle.device, non_blocking=True))
    return pooled.float().cpu(), tokens.float().cpu()


@torch.inference_mode()
def encode_pooled(bundle: ClipBundle, batch: torch.Tensor) -> torch.Tensor:
    """Preprocessed images (B, 3, S, S) -> pooled (B, D) projected embedding only."""
    return encode_images(bundle, batch)[0]


@torch.inference_mode()
def encode_texts(bundle: ClipBundle, texts: Sequence[str], batch_size: int = 64,
                 progress: str | None = None) -> torch.Tensor:
    """Texts -> (N, D) float32 projected CLIP text embeddings (unnormalised), in batches.

    ``progress``: label of a progress bar (texts/s) on stderr; None shows none.
    """
    from pipeline.progress import progress as progress_bar

    out = []
    texts = [str(t) for t in texts]
    step = max(1, int(batch_size))
    with progress_bar(total=len(texts), desc=progress, unit="text", disable=progress is None, mininterval=1.0) as bar:
        for i in range(0, len(texts), step):
            tokens = bundle.tokenizer(texts[i:i + step]).to(bundle.device)  # (b, context_length)
            out.append(bundle.model.encode_text(tokens).float().cpu())  # (b, D)
            bar.update(len(tokens))
    if not out:
        return torch.zeros((0, bundle.embed_dim), dtype=torch.float32)
    return torch.cat(out, 0)

"""Robust image loading: every file gives an RGB image and a status, nothing raises.

A run over thousands of web images meets missing files, empty files, truncated JPEGs,
text files named ``.jpg``, CMYK and 16-bit files, transparent PNGs, animated GIFs and
decompression bombs. :func:`load_image` turns each into either

* a real RGB image (status ``"ok"``, or ``"converted_<mode>"`` / ``"animated"`` when the
  file needed converting; ``is_fallback=False``), or
* the grey fallback image, RGB (128, 128, 128) of ``policy.fallback_size`` pixels square,
  with ``is_fallback=True`` and a reason status (see :data:`FALLBACK_STATUSES`).

With ``policy.fallback == "zero"`` the loader still returns the grey image; the feature
extractor writes zeros for every item whose ``is_fallback`` is true.

Conversions (documented choices):

* transparency (RGBA, LA, PA, RGBa, La, P/L/RGB with a transparency key) is composited
  onto a WHITE background, the way a browser shows a transparent sticker or logo;
* 16-bit integer modes (``I;16*``) are scaled by 255/65535; ``I`` (32-bit int) and ``F``
  (float) are kept if they already lie in 0..255, scaled by 255/65535 if they lie in
  0..65535, scaled by 255 if float within 0..1, otherwise min-max normalised; NaN -> 0;
* animated files (GIF, APNG, WebP) give their first frame, status ``"animated"``;
* EXIF orientation is NOT applied: pixels are used as stored, so boxes shipped with a
  dataset (pixel coordinates of the stored image) stay aligned.

Sizes are checked from the header before any pixel is decoded: more than
``policy.max_pixels`` pixels -> ``"too_large"`` (Pillow's own DecompressionBombError,
raised above 2 x ``PIL.Image.MAX_IMAGE_PIXELS``, gives the same status); a side shorter
than ``policy.min_side`` -> ``"too_small"``. Only the formats in ``policy.formats`` are
opened (so e.g. EPS, which would start Ghostscript, is refused as ``"not_image"``).
Files are always closed before returning. Python's warnings filter is touched around
``Image.open`` (``warnings.catch_warnings``), which is process-wide: use processes, not
threads, to decode in parallel (a torch DataLoader with workers does).
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.paths import PathEscapeError, safe_join

FALLBACK_RGB = (128, 128, 128)
BACKGROUND_RGB = (255, 255, 255)  # transparent pixels are composited onto white
SAFE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")  # JPEG also opens MPO

STATUS_OK = "ok"
#: statuses that mean "unusable, the fallback image was returned"
FALLBACK_STATUSES = frozenset({
    "missing",       # no such file (or a dangling symlink)
    "refused",       # the id would resolve outside the images folder (see load_image_by_id)
    "unreadable",    # exists but cannot be read (a directory, no permission, I/O error)
    "zero_byte",     # empty file
    "not_image",     # not an image in an allowed format (text, HTML, EPS, ...)
    "truncated",     # an image whose data ends early
    "corrupt",       # an image whose data cannot be decoded for another reason
    "too_large",     # more pixels than policy.max_pixels (decompression bomb guard)
    "too_small",     # a side shorter than policy.min_side
    "unsupported_mode",  # decoded, but its pixel mode cannot be turned into RGB
})
#: statuses that keep a real image (besides "converted_<mode>")
KEPT_STATUSES = frozenset({STATUS_OK, "animated"})

_MAGIC = (
    b"\xff\xd8\xff",          # JPEG
    b"\x89PNG\r\n\x1a\n",     # PNG
    b"GIF87a", b"GIF89a",     # GIF
    b"BM",                    # BMP
    b"II*\x00", b"MM\x00*",   # TIFF
    b"RIFF",                  # WebP (RIFF....WEBP)
    b"P1", b"P2", b"P3", b"P4", b"P5", b"P6",  # PPM family
)


@dataclass(frozen=True)
class ImagePolicy:
    """How to treat unusable and odd images."""

    fallback: str = "blank"            # "blank": encode the grey image | "zero": zero features
    max_pixels: int = 89_478_485       # more pixels (from the header) -> "too_large"
    min_side: int = 4                  # a shorter side -> "too_small"
    fallback_size: int = 224           # side of the square grey fallback image
    formats: tuple[str, ...] = SAFE_FORMATS  # Pillow format names allowed to open

    def __post_init__(self) -> None:
        if self.fallback not in ("blank", "zero"):
            raise ValueError(f"images.fallback: must be 'blank' or 'zero', got {self.fallback!r}")
        for name in ("max_pixels", "min_side", "fallback_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"images.{name}: must be a positive integer, got {v!r}")
        if not self.formats or not all(isinstance(f, str) for f in self.formats):
            raise ValueError(f"images.formats: must be a non-empty list of Pillow format names, got {self.formats!r}")
        Image.init()
        unknown = [f for f in self.formats if f not in Image.OPEN]
        if unknown:
            raise ValueError(f"images.formats: Pillow cannot open format(s) {unknown} (known: {', '.join(sorted(Image.OPEN))})")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "ImagePolicy":
        """Build from the ``images`` params section; unknown keys are an error naming the key."""
        known = {"fallback", "max_pixels", "min_side", "fallback_size", "formats"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"params.yaml: images.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
        kw: dict[str, Any] = {k: params[k] for k in known if k in params}
        if "formats" in kw:
            kw["formats"] = tuple(str(f).upper() for f in kw["formats"])
        return cls(**kw)


@dataclass
class LoadedImage:
    """An RGB image (real, or the grey fallback) and why it looks the way it does."""

    image: Image.Image   # PIL RGB, fully loaded, no open file behind it
    status: str          # "ok", "converted_<mode>", "animated", or a FALLBACK_STATUSES reason
    is_fallback: bool
    size: tuple[int, int] | None = None  # original (width, height) if the header was read


def is_fallback_status(status: str) -> bool:
    """True for statuses that mean the fallback image was used."""
    return status in FALLBACK_STATUSES


def image_path(images_dir: str | os.PathLike, image_id: str, suffix: str = ".jpg") -> Path:
    """``<images_dir>/<image_id><suffix>``; raises PathEscapeError if it would leave images_dir."""
    if not isinstance(image_id, str):
        raise TypeError(f"image id must be a str, got {type(image_id).__name__} {image_id!r}")
    if not image_id.strip():
        raise PathEscapeError(f"image id {image_id!r} is empty")
    return safe_join(images_dir, f"{image_id}{suffix}", what="image id")


def fallback_image(policy: ImagePolicy) -> Image.Image:
    """The grey RGB fallback image, ``fallback_size`` square."""
    return Image.new("RGB", (policy.fallback_size, policy.fallback_size), FALLBACK_RGB)


def _fallback(policy: ImagePolicy, status: str, size: tuple[int, int] | None = None) -> LoadedImage:
    return LoadedImage(fallback_image(policy), status, True, size)


def _looks_like_image(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return head.startswith(_MAGIC)


def _decode_failure(err: BaseException) -> str:
    msg = str(err).lower()
    if isinstance(err, EOFError) or "truncat" in msg or "end of file" in msg or "eof" in msg:
        return "truncated"
    return "corrupt"


def _open_checks(path: Path, policy: ImagePolicy) -> tuple[str | None, Image.Image | None]:
    """Common pre-decode steps. Returns (fallback status, None) or (None, open image)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing", None
    except OSError:
        return "unreadable", None
    if not path.is_file():
        return "unreadable", None
    if st.st_size == 0:
        return "zero_byte", None
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below decides; Pillow's warning threshold is not policy
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path, formats=list(policy.formats))
    except Image.DecompressionBombError:
        return "too_large", None
    except UnidentifiedImageError:
        return ("corrupt" if _looks_like_image(path) else "not_image"), None
    except (PermissionError, IsADirectoryError):
        return "unreadable", None
    except Exception as e:  # Pillow raises OSError/SyntaxError/ValueError/... on bad headers
        return _decode_failure(e), None
    return None, im


def _size_status(im: Image.Image, policy: ImagePolicy) -> str | None:
    w, h = im.size
    if w * h > policy.max_pixels:
        return "too_large"
    if min(w, h) < policy.min_side:
        return "too_small"
    return None


def probe_image(path: str | os.PathLike | None, policy: ImagePolicy) -> str:
    """Cheap status from the header only (no pixel decoding).

    Gives every fallback status except "truncated"/"corrupt" found only when decoding, so a
    probe "ok" can still fail in :func:`load_image`; conversions are reported as
    "converted_<mode>" / "animated" like the loader does.
    """
    if path is None or str(path) == "":
        return "refused"
    status, im = _open_checks(Path(path), policy)
    if im is None:
        return status  # type: ignore[return-value]
    with im:
        return _size_status(im, policy) or _mode_status(im)


def _is_animated(im: Image.Image) -> bool:
    try:
        return bool(getattr(im, "is_animated", False)) or int(getattr(im, "n_frames", 1)) > 1
    except Exception:
        return False


def _mode_status(im: Image.Image) -> str:
    if _is_animated(im):
        return "animated"
    return STATUS_OK if im.mode == "RGB" and "transparency" not in im.info else f"converted_{im.mode}"


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map a single-band int/float array to uint8 (rules in the module docstring)."""
    a = arr.astype(np.float64)
    a = np.where(np.isfinite(a), a, 0.0)
    if mode.startswith("I;16"):
        a = a * (255.0 / 65535.0)
    else:
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            a = a * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            pass
        elif lo >= 0.0 and hi <= 65535.0:
            a = a * (255.0 / 65535.0)
        elif hi > lo:
            a = (a - lo) * (255.0 / (hi - lo))
        # else: a constant image outside 0..65535 is clipped below (to 0 or 255)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded frame to a new RGB image (no link to the file)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im.copy()
    if mode.startswith("I") or mode == "F":
        grey = Image.fromarray(_scale_to_uint8(np.asarray(im), mode))  # uint8 (H, W) -> "L"
        return grey.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")  # premultiplied and keyed transparency become straight alpha
        bg = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: str | os.PathLike | None, policy: ImagePolicy) -> LoadedImage:
    """Load ``path`` as RGB; never raises for bad files (see the module docstring).

    ``path=None`` (an id refused by :func:`image_path`) gives the fallback with status
    "refused".
    """
    if path is None or str(path) == "":
        return _fallback(policy, "refused")
    status, im = _open_checks(Path(path), policy)
    if im is None:
        return _fallback(policy, status)  # type: ignore[arg-type]
    with im:
        size = im.size
        bad = _size_status(im, policy)
        if bad:
            return _fallback(policy, bad, size)
        status = _mode_status(im)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                if status == "animated":
                    im.seek(0)
                im.load()
                mode = im.mode
                rgb = _to_rgb(im)
                rgb.load()
        except Image.DecompressionBombError:
            return _fallback(policy, "too_large", size)
        except MemoryError:
            return _fallback(policy, "too_large", size)
        except Exception as e:  # truncated / corrupt data, odd modes
            if isinstance(e, (ValueError, KeyError)) and "mode" in str(e).lower():
                return _fallback(policy, "unsupported_mode", size)
            return _fallback(policy, _decode_failure(e), size)
    if status != "animated" and mode != "RGB":  # some decoders settle the mode only on load
        status = f"converted_{mode}"
    return LoadedImage(rgb, status, False, size)


def load_image_by_id(images_dir: str | os.PathLike, image_id: str, policy: ImagePolicy,
                     suffix: str = ".jpg") -> LoadedImage:
    """:func:`image_path` + :func:`load_image`; an escaping id gives status "refused"."""
    try:
        path = image_path(images_dir, image_id, suffix)
    except (PathEscapeError, TypeError):
        return _fallback(policy, "refused")
    return load_image(path, policy)


@dataclass
class ImageReport:
    """Counts image statuses and lists every item that was not plain "ok"."""

    counts: Counter = field(default_factory=Counter)
    items: list[dict[str, str]] = field(default_factory=list)
    fallbacks: int = 0

    def add(self, image_id: str, status: str) -> None:
        self.counts[status] += 1
        if status != STATUS_OK:
            self.items.append({"image_id": str(image_id), "status": status})
        if is_fallback_status(status):
            self.fallbacks += 1

    def update(self, other: "ImageReport") -> None:
        """Merge another report (e.g. from another shard or worker)."""
        self.counts.update(other.counts)
        self.items.extend(other.items)
        self.fallbacks += other.fallbacks

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __len__(self) -> int:
        return self.total

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "counts": dict(sorted(self.counts.items())),
            "fallbacks": self.fallbacks,
            "items": list(self.items),
        }

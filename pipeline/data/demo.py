"""Deterministic generator of the embedded demo dataset, written in the real formats.

Two sets, both synthetic (drawn with PIL, no downloaded data):

- ``tweets/``: an MNER set in Twitter-2017 CoNLL (``IMGID:<id>``, ``token<TAB>tag``, blank line
  between tweets) with ``images/<id>.jpg`` and ``boxes.jsonl``. A share of the tweets mention an
  *ambiguous* name ("Jordan", "Paris", "Golden State", ...) inside a fixed, type-neutral template
  ("Look at {E} today !"); the name's type (PER/LOC/ORG/MISC) is shown only by the picture. The
  ambiguous tweets come in minimal pairs: the same name in the same template with different types.
- ``flickr/``: a retrieval set in AGREE's JSON-lines files with ``images/<image_id>.jpg`` and
  ``boxes.jsonl``. Captions mention 1-3 entities ("a red car", "a beach") verbatim; images come in
  groups that share one object, so that distractors share objects with their targets.

Same :class:`DemoSpec` -> byte-identical files: every random draw comes from
``numpy.random.Generator`` streams seeded by ``seed``, JPEGs are written with a fixed quality and
no metadata, and every listing is sorted. The MNER and retrieval sets draw from separate streams,
so changing one set's params leaves the other set's bytes unchanged.
"""
from __future__ import annotations

import io
import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.artifacts import atomic_path

TYPES = ("PER", "LOC", "ORG", "MISC")
JPEG_QUALITY = 90
BROKEN_KINDS = ("truncated", "not_image", "zero_byte")  # cycled through for broken images
NOT_AN_IMAGE = b"this is not an image: a text file with a .jpg name (demo, on purpose)\n"

# COCO category names (torchvision FasterRCNN COCO_V1 meta) used per picture kind. Disjoint
# between entity types so that region labels alone can carry the type.
TYPE_LABELS = {
    "PER": ("person", "tie"),
    "LOC": ("boat", "bench"),
    "ORG": ("laptop", "tv", "cell phone"),
    "MISC": ("sports ball", "kite"),
    None: ("cup", "pizza"),  # tweets without an entity
}

# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class MnerSpec:
    train: int = 320
    valid: int = 80
    test: int = 120
    ambiguous_share: float = 0.5
    missing_images: int = 2
    broken_images: int = 2


@dataclass(frozen=True)
class RetrievalSpec:
    train_images: int = 60
    test_images: int = 40
    captions_per_image: int = 3
    missing_images: int = 1
    broken_images: int = 1


@dataclass(frozen=True)
class DemoSpec:
    seed: int = 13
    image_size: int = 64
    mner: MnerSpec = field(default_factory=MnerSpec)
    retrieval: RetrievalSpec = field(default_factory=RetrievalSpec)

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> "DemoSpec":
        """Build and validate from the ``demo`` params section (pipeline.schema); errors name the param."""
        from pipeline.schema import validate_section
        validate_section("demo", p)
        spec = cls(seed=p["seed"], image_size=p["image_size"], mner=MnerSpec(**p["mner"]),
                   retrieval=RetrievalSpec(**p["retrieval"]))
        spec.validate()
        return spec

    def validate(self) -> None:
        m, r = self.mner, self.retrieval
        if m.train - _n_ambiguous(m.train, m.ambiguous_share) < 1:
            raise ValueError("params.yaml: demo.mner.ambiguous_share: leaves no non-ambiguous train tweet "
                             "for the I- trap tweet; lower it or raise demo.mner.train")
        if m.missing_images + m.broken_images > m.train + m.valid + m.test:
            raise ValueError("params.yaml: demo.mner.missing_images + broken_images exceed the number of tweets")
        if r.missing_images + r.broken_images > r.train_images + r.test_images:
            raise ValueError("params.yaml: demo.retrieval.missing_images + broken_images exceed the number of images")
        if r.captions_per_image > 20:
            raise ValueError("params.yaml: demo.retrieval.captions_per_image: at most 20")


def _n_ambiguous(n: int, share: float) -> int:
    return int(math.floor(n * share + 0.5))


# ----------------------------------------------------------------------------- vocabulary

# Ambiguous names and the types each may take; the picture decides which.
AMBIGUOUS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Jordan", ("PER", "LOC", "ORG")),
    ("Paris", ("PER", "LOC")),
    ("Washington", ("PER", "LOC", "ORG")),
    ("Chelsea", ("PER", "LOC", "ORG")),
    ("Victoria", ("PER", "LOC")),
    ("Phoenix", ("PER", "LOC", "MISC")),
    ("Amazon", ("LOC", "ORG")),
    ("Mercedes", ("PER", "ORG")),
    ("Georgia", ("PER", "LOC")),
    ("Hamilton", ("PER", "LOC", "MISC")),
    ("Dallas", ("LOC", "ORG", "MISC")),
    ("Chicago", ("LOC", "ORG", "MISC")),
    ("Casablanca", ("LOC", "MISC")),
    ("Golden State", ("LOC", "ORG")),
    ("New England", ("LOC", "ORG")),
    ("Harry Potter", ("PER", "MISC")),
    ("Sherlock Holmes", ("PER", "MISC")),
)

# Type-neutral templates: every token is fixed, so the words around the name are the same
# whatever its type. "{E}" is the ambiguous name.
NEUTRAL_TEMPLATES = (
    "Look at {E} today !",
    "RT @daily_snaps : {E} right now 😍 http://t.co/x7Yq2Lm",
    "Can't stop thinking about {E} #mood",
    "{E} &amp; chill tonight",
    "Wow , {E} !!! http://t.co/Pq81Zz",
    "Nothing beats {E} 🔥",
    "Just saw {E} . Unreal",
    "Throwback to {E} #tbt",
    "@mike_22 have you seen {E} ? 👀",
    "Best picture of {E} ever http://t.co/3vBn0k",
)

NAMES = {
    "PER": ("Barack Obama", "Taylor Swift", "LeBron James", "Emma Watson", "Kevin Durant", "Serena Williams",
            "Tom Hanks", "Ed Sheeran", "Rihanna", "Drake", "Lady Gaga", "Justin Bieber", "Angela Merkel",
            "Cristiano Ronaldo"),
    "LOC": ("London", "New York", "Tokyo", "Texas", "California", "Berlin", "Lake Tahoe", "Mount Everest",
            "Brooklyn", "Florida", "Sydney", "Rome", "Los Angeles", "Miami Beach"),
    "ORG": ("Google", "Microsoft", "NASA", "Real Madrid", "Manchester United", "United Nations", "Starbucks",
            "CNN", "Tesla", "Netflix", "Warner Bros", "Facebook", "FBI", "New York Times"),
    "MISC": ("iPhone", "Super Bowl", "Oscars", "Game of Thrones", "World Cup", "Christmas", "Star Wars",
             "Coachella", "Brexit", "Grammys", "Olympics", "Mexican", "Thanksgiving", "Xbox One"),
}

# Templates whose words tell the type ("President {PER}", "the city of {LOC}").
TYPED_TEMPLATES = {
    "PER": ("President {PER} speaks at the rally", "Happy birthday {PER} ! 🎉", "{PER} says he will be back",
            "Great interview with {PER} on @TheEllenShow", "Singer {PER} cancels her tour",
            "Actor {PER} wins again", "Coach says {PER} is out for the season"),
    "LOC": ("Greetings from the city of {LOC} !", "Heavy rain in {LOC} tonight", "Flights to {LOC} are cancelled",
            "Moving to {LOC} next month", "Sunset over {LOC} 🌅", "Traffic jam in downtown {LOC}"),
    "ORG": ("{ORG} announced a new CEO", "Shares of {ORG} rose 5 % today", "I just applied for a job at {ORG}",
            "{ORG} fans are celebrating tonight", "The company {ORG} reported record profits"),
    "MISC": ("Can't wait for the {MISC} 🎉", "Tickets for the {MISC} sold out", "My review of {MISC} is up",
             "Everyone is talking about {MISC}", "New {MISC} trailer looks amazing"),
}
MULTI_TEMPLATES = (
    "{PER} visits {LOC} ahead of the {MISC}",
    "{PER} joins {ORG} on a two year deal",
    "{ORG} opens a new office in {LOC}",
    "{PER} and {PER2} spotted in {LOC} 📸",
    "{ORG} CEO {PER} talks about {MISC}",
)
NO_ENTITY_TEMPLATES = (
    "Good morning everyone ☀️", "lol this is so true", "can't sleep again 😩", "Monday mood &amp; coffee ☕",
    "who else is watching this ?", "best day ever !!!", "when the weekend finally comes",
)
USERS = ("@nytimes", "@bbcnews", "@jess_m", "@sportsdaily", "@k_lee92", "@CityNews")
HASHTAGS = ("#news", "#love", "#tbt", "#nofilter", "#breaking", "#weekend")
EMOJI = ("😂", "❤️", "🙌", "😍", "🔥", "👏")
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

# ----------------------------------------------------------------------------- drawing helpers

SKIN = ((241, 194, 155), (224, 172, 125), (198, 134, 96), (141, 85, 54), (255, 219, 182))
PALETTE = {
    "red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (240, 220, 30),
    "white": (245, 245, 245), "black": (20, 20, 20), "orange": (250, 140, 20), "purple": (140, 50, 170),
}
COLOURS = tuple(PALETTE)


class _Canvas:
    """An RGB image plus the boxes (pixels) and COCO labels drawn on it."""

    def __init__(self, size: int, bg: tuple[int, int, int]) -> None:
        self.size = size
        self.img = Image.new("RGB", (size, size), bg)
        self.draw = ImageDraw.Draw(self.img)
        self.boxes: list[list[int]] = []
        self.labels: list[str] = []

    def add_box(self, label: str, x1: float, y1: float, x2: float, y2: float) -> None:
        s = self.size
        b = [int(max(0, min(s, math.floor(x1)))), int(max(0, min(s, math.floor(y1)))),
             int(max(0, min(s, math.ceil(x2)))), int(max(0, min(s, math.ceil(y2))))]
        if b[2] > b[0] and b[3] > b[1]:
            self.boxes.append(b)
            self.labels.append(label)

    def finish(self, rng: np.random.Generator, noise: float = 5.0) -> tuple[bytes, dict]:
        arr = np.asarray(self.img, dtype=np.float32)  # (S, S, 3)
        arr = arr + rng.normal(0.0, noise, arr.shape)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
        return _jpeg(img), {"boxes": self.boxes, "labels": self.labels}


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False, subsampling=2)
    return buf.getvalue()


def _jit(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _vivid(rng: np.random.Generator) -> tuple[int, int, int]:
    return PALETTE[("red", "blue", "green", "yellow", "orange", "purple")[int(rng.integers(6))]]


def _outline(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return (200, 200, 200) if sum(colour) < 150 else (15, 15, 15)


# ---- tweet pictures: one scene kind per entity type --------------------------------------


def _person(c: _Canvas, rng: np.random.Generator, cx: float, h: float) -> None:
    s = c.size
    top = s - h
    skin, shirt = SKIN[int(rng.integers(len(SKIN)))], _vivid(rng)
    hw, hh = 0.40 * h, 0.42 * h
    head = (cx - hw / 2, top, cx + hw / 2, top + hh)
    body = (cx - 0.34 * h, top + 0.38 * h, cx + 0.34 * h, s + 0.1 * h)
    c.draw.rounded_rectangle(body, radius=max(2, int(0.15 * h)), fill=shirt, outline=(40, 30, 30))
    c.draw.ellipse(head, fill=skin, outline=(60, 40, 30))
    ey = top + 0.45 * hh
    for dx in (-0.22 * hw, 0.22 * hw):
        c.draw.ellipse((cx + dx - 1, ey - 1, cx + dx + 1, ey + 1), fill=(30, 20, 20))
    c.add_box("person", body[0], top, body[2], s)
    if rng.random() < 0.5:
        ty = top + hh + 0.02 * h
        tie = [(cx - 0.05 * h, ty), (cx + 0.05 * h, ty), (cx + 0.07 * h, ty + 0.3 * h), (cx, ty + 0.38 * h),
               (cx - 0.07 * h, ty + 0.3 * h)]
        c.draw.polygon(tie, fill=(25, 25, 60))
        c.add_box("tie", cx - 0.07 * h, ty, cx + 0.07 * h, ty + 0.38 * h)


def _draw_per(c: _Canvas, rng: np.random.Generator) -> None:
    s = c.size
    if rng.random() < 0.3:
        h = s * _u(rng, 0.55, 0.65)
        for cx in (s * _u(rng, 0.24, 0.3), s * _u(rng, 0.7, 0.76)):
            _person(c, rng, cx, h)
    else:
        _person(c, rng, s * _u(rng, 0.4, 0.6), s * _u(rng, 0.72, 0.85))


def _draw_loc(c: _Canvas, rng: np.random.Generator) -> None:
    s, d = c.size, c.draw
    horizon = int(s * _u(rng, 0.42, 0.52))
    top, low = _jit(rng, (60, 120, 215), 15), _jit(rng, (170, 205, 245), 10)
    for y in range(horizon):
        t = y / max(1, horizon - 1)
        d.line((0, y, s, y), fill=tuple(int(a + (b - a) * t) for a, b in zip(top, low)))
    d.rectangle((0, horizon, s, s), fill=_jit(rng, (80, 150, 70), 15))
    for _ in range(int(rng.integers(1, 4))):
        x0, w = s * _u(rng, -0.2, 0.7), s * _u(rng, 0.35, 0.6)
        peak = horizon - s * _u(rng, 0.15, 0.3)
        d.polygon([(x0, horizon), (x0 + w / 2, peak), (x0 + w, horizon)], fill=_jit(rng, (110, 115, 130), 12))
    if rng.random() < 0.7:
        sx, sy, r = s * _u(rng, 0.7, 0.88), s * _u(rng, 0.08, 0.18), s * 0.07
        d.ellipse((sx - r, sy - r, sx + r, sy + r), fill=(250, 220, 60))
    water = int(s * 0.74)
    d.rectangle((0, water, s, s), fill=_jit(rng, (35, 85, 165), 10))
    left = rng.random() < 0.5
    w = s * _u(rng, 0.3, 0.4)
    x = s * _u(rng, 0.05, 0.15) if left else s * _u(rng, 0.5, 0.62)
    hull_h = s * 0.1
    d.polygon([(x, water), (x + w, water), (x + 0.85 * w, water + hull_h), (x + 0.15 * w, water + hull_h)],
              fill=_jit(rng, (120, 70, 30), 20), outline=(20, 20, 20))
    mast = x + 0.5 * w
    sail_top = water - s * 0.28
    d.line((mast, water, mast, sail_top), fill=(30, 30, 30), width=1)
    d.polygon([(mast + 1, sail_top), (mast + 1, water - 2), (mast + 0.45 * w, water - 2)], fill=(250, 250, 250))
    c.add_box("boat", x, sail_top, x + w, water + hull_h)
    if rng.random() < 0.5:
        bw = s * 0.28
        bx = s * 0.62 if left else s * 0.08
        by = horizon + (water - horizon) * 0.35
        d.rectangle((bx, by, bx + bw, by + s * 0.04), fill=(110, 70, 35))
        d.rectangle((bx, by - s * 0.08, bx + bw, by - s * 0.05), fill=(110, 70, 35))
        for lx in (bx + 2, bx + bw - 3):
            d.line((lx, by, lx, by + s * 0.1), fill=(50, 35, 20), width=1)
        c.add_box("bench", bx, by - s * 0.08, bx + bw, by + s * 0.1)


def _logo(d: ImageDraw.ImageDraw, rng: np.random.Generator, cx: float, cy: float, r: float,
          colour: tuple[int, int, int]) -> None:
    kind = int(rng.integers(3))
    if kind == 0:
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif kind == 1:
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)


def _phone(c: _Canvas, rng: np.random.Generator, x: float, y: float) -> None:
    s = c.size
    w, h = s * 0.2, s * 0.38
    c.draw.rounded_rectangle((x, y, x + w, y + h), radius=2, fill=(45, 45, 50), outline=(150, 150, 160))
    c.draw.rectangle((x + 2, y + 3, x + w - 2, y + h - 4), fill=(225, 235, 250))
    _logo(c.draw, rng, x + w / 2, y + h / 2, w * 0.22, _vivid(rng))
    c.add_box("cell phone", x, y, x + w, y + h)


def _draw_org(c: _Canvas, rng: np.random.Generator) -> None:
    s, d = c.size, c.draw
    d.rectangle((0, int(s * 0.78), s, s), fill=_jit(rng, (70, 50, 38), 10))  # desk
    kind = ("laptop", "tv", "cell phone")[int(rng.integers(3))]
    if kind == "laptop":
        w, h = s * _u(rng, 0.5, 0.6), s * _u(rng, 0.34, 0.4)
        x, y = s * _u(rng, 0.08, 0.2), s * 0.78 - h - s * 0.06
        d.rectangle((x, y, x + w, y + h), fill=(170, 170, 180))
        d.rectangle((x + 2, y + 2, x + w - 2, y + h - 2), fill=(235, 235, 245))
        _logo(d, rng, x + w / 2, y + h / 2, h * 0.25, _vivid(rng))
        d.polygon([(x, y + h), (x + w, y + h), (x + w + s * 0.06, y + h + s * 0.06), (x - s * 0.06, y + h + s * 0.06)],
                  fill=(150, 150, 160))
        c.add_box("laptop", x - s * 0.06, y, x + w + s * 0.06, y + h + s * 0.06)
    elif kind == "tv":
        w, h = s * _u(rng, 0.62, 0.75), s * _u(rng, 0.4, 0.48)
        x, y = (s - w) / 2, s * 0.12
        d.rectangle((x, y, x + w, y + h), fill=(8, 8, 8))
        screen = _vivid(rng)
        d.rectangle((x + 2, y + 2, x + w - 2, y + h - 2), fill=screen)
        _logo(d, rng, x + w / 2, y + h / 2, h * 0.25, (250, 250, 250))
        d.rectangle((s / 2 - 2, y + h, s / 2 + 2, s * 0.78), fill=(60, 60, 60))
        c.add_box("tv", x, y, x + w, s * 0.78)
    else:
        _phone(c, rng, s * _u(rng, 0.3, 0.45), s * _u(rng, 0.2, 0.3))
    if kind != "cell phone" and rng.random() < 0.35:
        _phone(c, rng, s * 0.76, s * 0.55)


def _draw_misc(c: _Canvas, rng: np.random.Generator) -> None:
    s, d = c.size, c.draw
    base = c.img.getpixel((0, 0))
    light = tuple(min(255, v + 18) for v in base)
    stripe = max(2, s // 8)
    for i in range(0, s, 2 * stripe):
        d.rectangle((i, 0, i + stripe - 1, s), fill=light)
    d.line((s / 2, 0, s / 2, s), fill=(245, 245, 245), width=1)
    r = s * 0.18
    d.ellipse((s / 2 - r, s / 2 - r, s / 2 + r, s / 2 + r), outline=(245, 245, 245), width=1)
    br = s * _u(rng, 0.08, 0.12)
    bx, by = s * _u(rng, 0.2, 0.8), s * _u(rng, 0.6, 0.85)
    d.ellipse((bx - br, by - br, bx + br, by + br), fill=(250, 250, 250), outline=(10, 10, 10))
    for dx, dy in ((0, 0), (-0.5, -0.45), (0.5, 0.4)):
        q = br * 0.28
        d.ellipse((bx + dx * br - q, by + dy * br - q, bx + dx * br + q, by + dy * br + q), fill=(15, 15, 15))
    c.add_box("sports ball", bx - br, by - br, bx + br, by + br)
    if rng.random() < 0.6:
        kx, ky, kw, kh = s * _u(rng, 0.2, 0.8), s * _u(rng, 0.15, 0.3), s * 0.12, s * 0.16
        d.polygon([(kx, ky - kh), (kx + kw, ky), (kx, ky + kh), (kx - kw, ky)], fill=_vivid(rng), outline=(10, 10, 10))
        d.line((kx, ky + kh, kx + s * 0.05, ky + kh + s * 0.15), fill=(20, 20, 20), width=1)
        c.add_box("kite", kx - kw, ky - kh, kx + kw, ky + kh)


def _draw_none(c: _Canvas, rng: np.random.Generator) -> None:
    s, d = c.size, c.draw
    d.rectangle((0, int(s * 0.6), s, s), fill=_jit(rng, (140, 100, 60), 12))
    cx, cy = s * _u(rng, 0.35, 0.65), s * _u(rng, 0.55, 0.7)
    if rng.random() < 0.5:
        w, h = s * 0.24, s * 0.3
        d.rectangle((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), fill=_vivid(rng), outline=(30, 30, 30))
        d.arc((cx + w / 2 - s * 0.06, cy - h / 4, cx + w / 2 + s * 0.08, cy + h / 4), -90, 90,
              fill=(30, 30, 30), width=2)
        c.add_box("cup", cx - w / 2, cy - h / 2, cx + w / 2 + s * 0.08, cy + h / 2)
    else:
        r = s * 0.2
        d.ellipse((cx - r, cy - r * 0.7, cx + r, cy + r * 0.7), fill=(240, 170, 60), outline=(150, 90, 30))
        for _ in range(5):
            px, py = cx + _u(rng, -0.6, 0.6) * r, cy + _u(rng, -0.4, 0.4) * r
            d.ellipse((px - 1.5, py - 1.5, px + 1.5, py + 1.5), fill=(190, 30, 30))
        c.add_box("pizza", cx - r, cy - r * 0.7, cx + r, cy + r * 0.7)


# background colour per type: distinct dominant colours so global features differ too
_TYPE_BG = {"PER": (236, 214, 196), "LOC": (140, 190, 240), "ORG": (28, 28, 40), "MISC": (40, 150, 60),
            None: (225, 225, 215)}
_TYPE_DRAW = {"PER": _draw_per, "LOC": _draw_loc, "ORG": _draw_org, "MISC": _draw_misc, None: _draw_none}


def render_type_picture(rng: np.random.Generator, etype: str | None, size: int) -> tuple[bytes, dict]:
    """A JPEG whose content shows entity type ``etype`` (None: no entity) and its boxes/labels."""
    c = _Canvas(size, _jit(rng, _TYPE_BG[etype], 12))
    _TYPE_DRAW[etype](c, rng)
    return c.finish(rng)


# ---- retrieval pictures: a scene plus 2-3 coloured objects ---------------------------------

OBJECTS = {  # kind -> (COCO label, caption noun)
    "car": ("car", "car"), "bus": ("bus", "bus"), "boat": ("boat", "boat"), "kite": ("kite", "kite"),
    "umbrella": ("umbrella", "umbrella"), "ball": ("sports ball", "ball"), "dog": ("dog", "dog"),
    "bench": ("bench", "bench"), "bird": ("bird", "bird"), "person": ("person", "person"),
}
KINDS = tuple(OBJECTS)
SCENES = {  # scene -> (entity string, phrase containing it)
    "beach": ("a beach", "on a beach"), "park": ("a park", "in a park"),
    "street": ("a street", "on a street"), "snow": ("the snow", "in the snow"),
}
SCENE_NAMES = tuple(SCENES)


def entity_text(colour: str, kind: str) -> str:
    """The caption phrase of one object, e.g. 'a red car', 'an orange kite', 'a person in blue'."""
    if kind == "person":
        return f"a person in {colour}"
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {OBJECTS[kind][1]}"


def _draw_scene(c: _Canvas, rng: np.random.Generator, scene: str) -> None:
    s, d = c.size, c.draw
    if scene == "beach":
        d.rectangle((0, 0, s, s * 0.35), fill=_jit(rng, (150, 200, 240), 8))
        d.rectangle((0, s * 0.35, s, s * 0.5), fill=_jit(rng, (40, 110, 190), 8))
        d.rectangle((0, s * 0.5, s, s), fill=_jit(rng, (230, 205, 150), 8))
    elif scene == "park":
        d.rectangle((0, 0, s, s * 0.3), fill=_jit(rng, (140, 190, 240), 8))
        d.rectangle((0, s * 0.3, s, s), fill=_jit(rng, (70, 160, 70), 8))
    elif scene == "street":
        d.rectangle((0, 0, s, s * 0.3), fill=_jit(rng, (180, 190, 200), 8))
        for i in range(4):
            x = i * s / 4
            d.rectangle((x + 1, s * _u(rng, 0.05, 0.15), x + s / 4 - 1, s * 0.45), fill=_jit(rng, (120, 110, 105), 15))
        d.rectangle((0, s * 0.45, s, s), fill=_jit(rng, (90, 90, 95), 6))
        for x in range(0, s, max(4, s // 6)):
            d.line((x, s * 0.72, x + s / 14, s * 0.72), fill=(240, 240, 240), width=1)
    else:
        d.rectangle((0, 0, s, s * 0.35), fill=_jit(rng, (200, 215, 235), 6))
        d.rectangle((0, s * 0.35, s, s), fill=_jit(rng, (246, 246, 250), 4))


def _draw_object(c: _Canvas, kind: str, colour: str, box: tuple[float, float, float, float]) -> None:
    d = c.draw
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    col = PALETTE[colour]
    ol = _outline(col)
    if kind == "car":
        d.rectangle((x1 + 0.25 * w, y1 + 0.25 * h, x2 - 0.25 * w, y1 + 0.5 * h), fill=col, outline=ol)
        d.rectangle((x1, y1 + 0.5 * h, x2, y1 + 0.8 * h), fill=col, outline=ol)
        for wx in (x1 + 0.25 * w, x2 - 0.25 * w):
            d.ellipse((wx - 0.12 * w, y1 + 0.72 * h, wx + 0.12 * w, y2), fill=(15, 15, 15))
    elif kind == "bus":
        d.rectangle((x1, y1 + 0.2 * h, x2, y1 + 0.85 * h), fill=col, outline=ol)
        for i in range(3):
            wx = x1 + (0.1 + 0.3 * i) * w
            d.rectangle((wx, y1 + 0.3 * h, wx + 0.2 * w, y1 + 0.5 * h), fill=(200, 230, 250))
        for wx in (x1 + 0.2 * w, x2 - 0.2 * w):
            d.ellipse((wx - 0.1 * w, y1 + 0.78 * h, wx + 0.1 * w, y2), fill=(15, 15, 15))
    elif kind == "boat":
        d.polygon([(x1, y1 + 0.65 * h), (x2, y1 + 0.65 * h), (x2 - 0.15 * w, y2), (x1 + 0.15 * w, y2)],
                  fill=col, outline=ol)
        mx = x1 + 0.5 * w
        d.line((mx, y1, mx, y1 + 0.65 * h), fill=(30, 30, 30), width=1)
        d.polygon([(mx + 1, y1), (mx + 1, y1 + 0.6 * h), (x2 - 0.1 * w, y1 + 0.6 * h)],
                  fill=(250, 250, 250), outline=(90, 90, 90))
    elif kind == "kite":
        cx, cy = x1 + 0.5 * w, y1 + 0.4 * h
        d.polygon([(cx, y1), (x2, cy), (cx, y1 + 0.8 * h), (x1, cy)], fill=col, outline=ol)
        d.line((cx, y1 + 0.8 * h, cx + 0.2 * w, y2), fill=(20, 20, 20), width=1)
    elif kind == "umbrella":
        d.pieslice((x1, y1, x2, y1 + h), 180, 360, fill=col, outline=ol)
        d.line((x1 + 0.5 * w, y1 + 0.5 * h, x1 + 0.5 * w, y2), fill=(20, 20, 20), width=1)
    elif kind == "ball":
        r = min(w, h) / 2
        cx, cy = x1 + w / 2, y1 + h / 2
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=col, outline=ol)
        d.arc((cx - r, cy - r / 2, cx + r, cy + r / 2), 0, 180, fill=ol, width=1)
    elif kind == "dog":
        d.ellipse((x1 + 0.1 * w, y1 + 0.35 * h, x1 + 0.75 * w, y1 + 0.75 * h), fill=col, outline=ol)
        d.ellipse((x1 + 0.62 * w, y1 + 0.15 * h, x2, y1 + 0.5 * h), fill=col, outline=ol)
        for lx in (0.2, 0.35, 0.5, 0.65):
            d.line((x1 + lx * w, y1 + 0.7 * h, x1 + lx * w, y2), fill=ol, width=1)
        d.line((x1 + 0.1 * w, y1 + 0.45 * h, x1, y1 + 0.25 * h), fill=ol, width=1)
    elif kind == "bench":
        d.rectangle((x1, y1 + 0.25 * h, x2, y1 + 0.4 * h), fill=col, outline=ol)
        d.rectangle((x1, y1 + 0.55 * h, x2, y1 + 0.7 * h), fill=col, outline=ol)
        for lx in (x1 + 0.1 * w, x2 - 0.1 * w):
            d.line((lx, y1 + 0.25 * h, lx, y2), fill=ol, width=2)
    elif kind == "bird":
        d.ellipse((x1 + 0.1 * w, y1 + 0.3 * h, x1 + 0.8 * w, y1 + 0.75 * h), fill=col, outline=ol)
        d.ellipse((x1 + 0.6 * w, y1 + 0.15 * h, x1 + 0.9 * w, y1 + 0.45 * h), fill=col, outline=ol)
        d.polygon([(x1 + 0.9 * w, y1 + 0.27 * h), (x2, y1 + 0.32 * h), (x1 + 0.9 * w, y1 + 0.37 * h)],
                  fill=(250, 150, 20))
        d.polygon([(x1 + 0.3 * w, y1 + 0.45 * h), (x1 + 0.55 * w, y1 + 0.45 * h), (x1 + 0.35 * w, y1 + 0.1 * h)],
                  fill=ol)
        d.line((x1 + 0.45 * w, y1 + 0.75 * h, x1 + 0.45 * w, y2), fill=(40, 40, 40), width=1)
    elif kind == "person":
        cx = x1 + 0.5 * w
        d.ellipse((cx - 0.18 * w, y1, cx + 0.18 * w, y1 + 0.3 * h), fill=SKIN[1], outline=(60, 40, 30))
        d.rectangle((cx - 0.28 * w, y1 + 0.3 * h, cx + 0.28 * w, y1 + 0.7 * h), fill=col, outline=ol)
        for lx in (cx - 0.12 * w, cx + 0.12 * w):
            d.line((lx, y1 + 0.7 * h, lx, y2), fill=(40, 40, 60), width=2)
    else:  # pragma: no cover - KINDS is closed
        raise ValueError(kind)
    c.add_box(OBJECTS[kind][0], x1, y1, x2, y2)


def render_retrieval_picture(rng: np.random.Generator, scene: str, objects: list[tuple[str, str]],
                             size: int) -> tuple[bytes, dict]:
    """A JPEG of ``scene`` with ``objects`` [(colour, kind)] placed in distinct quadrants."""
    c = _Canvas(size, (128, 128, 128))
    _draw_scene(c, rng, scene)
    cells = rng.permutation(4)[: len(objects)]
    for (colour, kind), cell in zip(objects, cells):
        bw = size * _u(rng, 0.36, 0.46)
        bh = bw * (0.8 if kind in ("car", "bus", "bench") else 1.0)
        x0, y0 = (cell % 2) * size / 2, (cell // 2) * size / 2
        x1 = min(max(0.0, x0 + size * _u(rng, -0.02, 0.08)), size - bw - 1)
        y1 = min(max(0.0, y0 + size * _u(rng, -0.02, 0.08)), size - bh - 1)
        _draw_object(c, kind, colour, (x1, y1, x1 + bw, y1 + bh))
    return c.finish(rng)


# ----------------------------------------------------------------------------- MNER set


@dataclass
class Tweet:
    image_id: str
    tokens: list[str]
    tags: list[str]
    image_type: str | None  # the type the picture shows (None: no entity)
    ambiguous: bool = False
    trap: bool = False


def _fill(template: str, fills: Mapping[str, tuple[str, str]]) -> tuple[list[str], list[str]]:
    tokens, tags = [], []
    for piece in template.split(" "):
        if piece.startswith("{") and piece.endswith("}"):
            name, etype = fills[piece[1:-1]]
            for i, word in enumerate(name.split(" ")):
                tokens.append(word)
                tags.append(("B-" if i == 0 else "I-") + etype)
        else:
            tokens.append(piece)
            tags.append("O")
    return tokens, tags


def _pick(rng: np.random.Generator, seq: tuple | list) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _url(rng: np.random.Generator) -> str:
    return "http://t.co/" + "".join(_pick(rng, _ALNUM) for _ in range(7))


def _plain_tweet(rng: np.random.Generator, force_multiword: bool = False) -> tuple[list[str], list[str], str | None]:
    """A non-ambiguous tweet: textual cues tell the types. Returns tokens, tags, picture type."""
    u = rng.random()
    if force_multiword:
        etype = "PER"
        name = _pick(rng, [n for n in NAMES["PER"] if " " in n])
        tokens, tags = _fill(_pick(rng, TYPED_TEMPLATES["PER"]), {"PER": (name, "PER")})
        image_type: str | None = "PER"
    elif u < 0.1:
        tokens, tags = _fill(_pick(rng, NO_ENTITY_TEMPLATES), {})
        image_type = None
    elif u < 0.3:
        template = _pick(rng, MULTI_TEMPLATES)
        per = _pick(rng, NAMES["PER"])
        per2 = _pick(rng, [n for n in NAMES["PER"] if n != per])
        fills = {"PER": (per, "PER"), "PER2": (per2, "PER"), "LOC": (_pick(rng, NAMES["LOC"]), "LOC"),
                 "ORG": (_pick(rng, NAMES["ORG"]), "ORG"), "MISC": (_pick(rng, NAMES["MISC"]), "MISC")}
        tokens, tags = _fill(template, fills)
        image_type = tags[next(i for i, t in enumerate(tags) if t != "O")][2:]
    else:
        etype = _pick(rng, TYPES)
        name = _pick(rng, NAMES[etype])
        if u < 0.45:  # a neutral template with a name whose identity gives its type
            tokens, tags = _fill(_pick(rng, NEUTRAL_TEMPLATES), {"E": (name, etype)})
        else:
            tokens, tags = _fill(_pick(rng, TYPED_TEMPLATES[etype]), {etype: (name, etype)})
        image_type = etype
    # realistic decorations
    if rng.random() < 0.25:
        tokens[:0], tags[:0] = ["RT", _pick(rng, USERS), ":"], ["O", "O", "O"]
    if rng.random() < 0.2:
        tokens.append(_pick(rng, HASHTAGS)), tags.append("O")
    if rng.random() < 0.2:
        tokens.append(_pick(rng, EMOJI)), tags.append("O")
    if rng.random() < 0.3:
        tokens.append(_url(rng)), tags.append("O")
    return tokens, tags, image_type


def _ambiguous_tweets(rng: np.random.Generator, n: int) -> list[tuple[list[str], list[str], str]]:
    """``n`` ambiguous tweets in minimal pairs: each name gets one template per round, used for every type."""
    combos = [(name, t) for name, types in AMBIGUOUS for t in types]
    rounds, rest = divmod(n, len(combos))
    chosen: list[tuple[int, str, str]] = []  # (round, name, type)
    for r in range(rounds):
        chosen += [(r, name, t) for name, t in combos]
    if rest:
        extra = sorted(rng.choice(len(combos), size=rest, replace=False).tolist())
        chosen += [(rounds, *combos[i]) for i in extra]
    template_of: dict[tuple[int, str], str] = {}
    for r in range(rounds + 1):
        for name, _ in AMBIGUOUS:
            template_of[(r, name)] = _pick(rng, NEUTRAL_TEMPLATES)
    out = []
    for r, name, etype in chosen:
        tokens, tags = _fill(template_of[(r, name)], {"E": (name, etype)})
        out.append((tokens, tags, etype))
    return out


def build_tweets(spec: DemoSpec, rng: np.random.Generator) -> dict[str, list[Tweet]]:
    """The tweets of every split, in file order (picture content decided, images not drawn)."""
    m = spec.mner
    splits: dict[str, list[Tweet]] = {}
    counter = 0
    for split, n in (("train", m.train), ("valid", m.valid), ("test", m.test)):
        amb = _ambiguous_tweets(rng, _n_ambiguous(n, m.ambiguous_share))
        n_plain = n - len(amb)
        trap_at = int(rng.integers(n_plain)) if split == "train" else -1
        items: list[tuple[list[str], list[str], str | None, bool, bool]] = [(*a, True, False) for a in amb]
        for i in range(n_plain):
            tokens, tags, itype = _plain_tweet(rng, force_multiword=(i == trap_at))
            if i == trap_at:  # real-data trap: an entity that starts with I- (no B-)
                first = next(j for j, t in enumerate(tags) if t.startswith("B-"))
                tags[first] = "I-" + tags[first][2:]
            items.append((tokens, tags, itype, False, i == trap_at))
        order = rng.permutation(len(items))
        tweets = []
        for k in order:
            tokens, tags, itype, is_amb, trap = items[int(k)]
            mm, dd = int(rng.integers(1, 13)), int(rng.integers(1, 29))
            tweets.append(Tweet(f"17_{mm:02d}_{dd:02d}_{counter}", tokens, tags, itype, is_amb, trap))
            counter += 1
        splits[split] = tweets
    return splits


def conll_text(tweets: list[Tweet], trailing_blank: bool = True) -> str:
    """Twitter-2017 CoNLL; ``trailing_blank=False`` ends the file right after the last token line."""
    blocks = ["\n".join([f"IMGID:{t.image_id}"] + [f"{w}\t{g}" for w, g in zip(t.tokens, t.tags)]) + "\n"
              for t in tweets]
    return "\n".join(blocks) + ("\n" if trailing_blank else "")


def _count_entities(tags: list[str]) -> int:
    """Entity chunks, counting an I- that does not continue a same-type chunk as a start (conlleval)."""
    n, prev = 0, "O"
    for g in tags:
        if g.startswith("B-") or (g.startswith("I-") and prev[2:] != g[2:]):
            n += 1
        prev = g
    return n


def _broken_bytes(kind: str, good: bytes) -> bytes:
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "not_image":
        return NOT_AN_IMAGE
    return b""


def _spread(rng: np.random.Generator, pools: list[list[str]], n: int) -> list[str]:
    """``n`` ids taken round-robin from ``pools`` (each pool shuffled by ``rng``), sorted."""
    shuffled = [[p[int(i)] for i in rng.permutation(len(p))] for p in pools]
    out: list[str] = []
    i = 0
    while len(out) < n:
        pool = shuffled[i % len(shuffled)]
        if pool:
            out.append(pool.pop())
        i += 1
    return sorted(out)


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def build_mner(spec: DemoSpec, rng: np.random.Generator) -> tuple[dict[str, bytes], dict]:
    """Files of ``tweets/`` (relative path -> bytes) and a summary."""
    m = spec.mner
    splits = build_tweets(spec, rng)
    files: dict[str, bytes] = {}
    for split, tweets in splits.items():
        files[f"{split}.txt"] = conll_text(tweets, trailing_blank=(split != "train")).encode("utf-8")
    ids = {s: [t.image_id for t in ts] for s, ts in splits.items()}
    missing = _spread(rng, [ids["train"], ids["test"], ids["valid"]], m.missing_images)
    left = {s: [i for i in v if i not in missing] for s, v in ids.items()}
    broken_ids = _spread(rng, [left["train"], left["valid"], left["test"]], m.broken_images)
    broken = {i: BROKEN_KINDS[k % len(BROKEN_KINDS)] for k, i in enumerate(broken_ids)}
    boxes = []
    all_tweets = sorted((t for ts in splits.values() for t in ts), key=lambda t: t.image_id)
    for t in all_tweets:
        jpeg, ann = render_type_picture(rng, t.image_type, spec.image_size)  # drawn even if dropped: stable stream
        if t.image_id in missing:
            continue
        if t.image_id in broken:
            files[f"images/{t.image_id}.jpg"] = _broken_bytes(broken[t.image_id], jpeg)
            continue
        files[f"images/{t.image_id}.jpg"] = jpeg
        boxes.append({"image_id": t.image_id, **ann})
    files["boxes.jsonl"] = _jsonl(boxes)
    trap = next((s, t) for s, ts in splits.items() for t in ts if t.trap)
    amb_types: dict[str, set[str]] = {}
    for ts in splits.values():
        for t in ts:
            if t.ambiguous:
                name_tokens = [w for w, g in zip(t.tokens, t.tags) if g != "O"]
                amb_types.setdefault(" ".join(name_tokens), set()).add(t.image_type or "")
    summary = {
        "tweets": {s: len(ts) for s, ts in splits.items()},
        "ambiguous": {s: sum(t.ambiguous for t in ts) for s, ts in splits.items()},
        "entities": {s: sum(_count_entities(t.tags) for t in ts) for s, ts in splits.items()},
        "images_written": sum(1 for k in files if k.startswith("images/")),
        "boxes_lines": len(boxes),
        "missing_images": missing,
        "broken_images": {k: broken[k] for k in sorted(broken)},
        "trap_tweet": {"split": trap[0], "image_id": trap[1].image_id},
        "ambiguous_names": {k: sorted(v) for k, v in sorted(amb_types.items())},
    }
    return files, summary


# ----------------------------------------------------------------------------- retrieval set


@dataclass
class Picture:
    image_id: int
    split: str
    scene: str
    objects: list[tuple[str, str]]  # (colour, kind)
    captions: list[tuple[str, list[str]]] = field(default_factory=list)  # (text, entity strings)


def _caption(rng: np.random.Generator, pic: Picture) -> tuple[str, list[str]]:
    """One caption mentioning 1-3 of the picture's entities verbatim; entities in text order."""
    n_obj = len(pic.objects)
    k = int(rng.integers(1, min(3, n_obj) + 1))
    objs = [entity_text(*pic.objects[int(i)]) for i in sorted(rng.choice(n_obj, size=k, replace=False).tolist())]
    objs = [objs[int(i)] for i in rng.permutation(k)]
    with_scene = k < 3 and rng.random() < 0.6
    if k == 1:
        body = objs[0]
    elif k == 2:
        body = f"{objs[0]} {_pick(rng, ('and', 'next to', 'near', 'behind'))} {objs[1]}"
    else:
        body = f"{objs[0]} , {objs[1]} and {objs[2]}"
    prefix = _pick(rng, ("", "a photo of ", "there is ", "we can see "))
    scene_entity, scene_phrase = SCENES[pic.scene]
    text = f"{prefix}{body}" + (f" {scene_phrase}" if with_scene else "") + "."
    return text, objs + ([scene_entity] if with_scene else [])


def build_pictures(spec: DemoSpec, rng: np.random.Generator) -> list[Picture]:
    """Train and test pictures in groups that share one object (distractors share objects)."""
    r = spec.retrieval
    n_total = r.train_images + r.test_images
    ids: set[int] = set()
    while len(ids) < n_total:
        ids.add(int(rng.integers(1_000_000_000, 2_000_000_000)))
    id_list = [int(i) for i in rng.permutation(sorted(ids))]
    seen: set[tuple] = set()
    pics: list[Picture] = []
    for split, n in (("train", r.train_images), ("test", r.test_images)):
        made = 0
        while made < n:
            g = min(int(rng.integers(2, 4)), n - made)
            shared = (_pick(rng, COLOURS), _pick(rng, KINDS))
            group_scene = _pick(rng, SCENE_NAMES)
            for _ in range(g):
                for _attempt in range(1000):
                    others = []
                    kinds = {shared[1]}
                    for _o in range(int(rng.integers(1, 3))):
                        kind = _pick(rng, [k for k in KINDS if k not in kinds])
                        kinds.add(kind)
                        others.append((_pick(rng, COLOURS), kind))
                    scene = group_scene if rng.random() < 0.5 else _pick(rng, SCENE_NAMES)
                    objects = [shared] + others
                    objects = [objects[int(i)] for i in rng.permutation(len(objects))]
                    key = (scene, frozenset(objects))
                    if key not in seen:
                        break
                else:  # pragma: no cover - the space (4 scenes x 80^3) is far larger than any demo
                    raise RuntimeError("demo: could not draw a unique retrieval picture")
                seen.add(key)
                pics.append(Picture(id_list[len(pics)], split, scene, objects))
                made += 1
    for pic in pics:
        texts: set[str] = set()
        for _ in range(r.captions_per_image):
            for _attempt in range(50):
                text, segs = _caption(rng, pic)
                if text not in texts:
                    break
            texts.add(text)
            pic.captions.append((text, segs))
    return sorted(pics, key=lambda p: p.image_id)


def build_retrieval(spec: DemoSpec, rng: np.random.Generator) -> tuple[dict[str, bytes], dict]:
    """Files of ``flickr/`` (relative path -> bytes) and a summary."""
    r = spec.retrieval
    pics = build_pictures(spec, rng)
    train = [p for p in pics if p.split == "train"]
    test = [p for p in pics if p.split == "test"]
    files: dict[str, bytes] = {}
    files["train.jsonl"] = _jsonl([
        {"image": f"images/{p.image_id}.jpg", "caption": text, "image_id": p.image_id, "segs": segs}
        for p in train for text, segs in p.captions])
    texts, images, segs_rows = [], [], []
    qid = 0
    for p in test:
        qids = []
        for text, segs in p.captions:
            texts.append({"query_id": qid, "query_text": text, "item_ids": [p.image_id]})
            segs_rows.append({"query_id": qid, "query_text": text, "items": segs})
            qids.append(qid)
            qid += 1
        images.append({"image_id": p.image_id, "item_ids": qids})
    files["test_texts.jsonl"] = _jsonl(texts)
    files["test_images.jsonl"] = _jsonl(images)
    files["test_texts_segs.jsonl"] = _jsonl(segs_rows)
    ids = {"train": [str(p.image_id) for p in train], "test": [str(p.image_id) for p in test]}
    missing = _spread(rng, [ids["test"], ids["train"]], r.missing_images)
    left = {s: [i for i in v if i not in missing] for s, v in ids.items()}
    broken_ids = _spread(rng, [left["train"], left["test"]], r.broken_images)
    broken = {i: BROKEN_KINDS[k % len(BROKEN_KINDS)] for k, i in enumerate(broken_ids)}
    boxes = []
    for p in pics:
        jpeg, ann = render_retrieval_picture(rng, p.scene, p.objects, spec.image_size)
        key = str(p.image_id)
        if key in missing:
            continue
        if key in broken:
            files[f"images/{key}.jpg"] = _broken_bytes(broken[key], jpeg)
            continue
        files[f"images/{key}.jpg"] = jpeg
        boxes.append({"image_id": key, **ann})
    files["boxes.jsonl"] = _jsonl(boxes)
    summary = {
        "images": {"train": len(train), "test": len(test)},
        "captions": {"train": sum(len(p.captions) for p in train), "test": qid},
        "images_written": sum(1 for k in files if k.startswith("images/")),
        "boxes_lines": len(boxes),
        "missing_images": sorted(missing, key=int),
        "broken_images": {k: broken[k] for k in sorted(broken, key=int)},
    }
    return files, summary


# ----------------------------------------------------------------------------- the whole demo


def _stream(seed: int, part: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, part])))


def demo_markdown(spec: DemoSpec, mner: dict, retr: dict) -> str:
    """DEMO.md: what the demo is, its counts and what is broken on purpose (no timestamps)."""
    lines = [
        "# The embedded demo dataset",
        "",
        "Everything here is synthetic: generated by `python -m stages.demo` (pipeline/data/demo.py) from the",
        "`demo` section of params.yaml, with no downloaded data. The same params give byte-identical files.",
        "",
        f"Params: `{json.dumps(asdict(spec), sort_keys=True)}`",
        "",
        "## tweets/ (MNER, Twitter-2017 CoNLL)",
        "",
        "Files: train.txt, valid.txt, test.txt (`IMGID:<id>`, then `token<TAB>tag`, blank line between tweets;",
        "tags BIO over PER, LOC, ORG, MISC), images/<id>.jpg, boxes.jsonl (one line per readable image:",
        "pixel boxes x1 y1 x2 y2 and COCO category names).",
        "",
        "| split | tweets | ambiguous | entities |",
        "|---|---|---|---|",
    ]
    for s in ("train", "valid", "test"):
        lines.append(f"| {s} | {mner['tweets'][s]} | {mner['ambiguous'][s]} | {mner['entities'][s]} |")
    lines += [
        "",
        "**The image decides.** Ambiguous tweets mention a name that can take several types, inside a",
        "template whose every token is fixed (e.g. `Look at {E} today !`), so the words around the name are",
        "the same whatever its type; they come in minimal pairs (same name, same template, different types).",
        "Only the picture tells the type: PER = a person figure on a warm background (boxes `person`, `tie`);",
        "LOC = a landscape with sky, mountains and water (`boat`, `bench`); ORG = a device with a logo on a dark",
        "background (`laptop`, `tv`, `cell phone`); MISC = a green pitch (`sports ball`, `kite`); tweets",
        "without an entity show a table (`cup`, `pizza`). Other tweets carry textual cues",
        "(`President {PER}`, `the city of {LOC}`, ...) and a picture of their first entity's type.",
        "",
        "Ambiguous names and the types they take here:",
        "",
    ]
    lines += [f"- {name}: {', '.join(types)}" for name, types in mner["ambiguous_names"].items()]
    lines += [
        "",
        "Real-data traps, on purpose:",
        "",
        "- train.txt ends without a blank line after its last tweet (like the Twitter-2015 files).",
        f"- exactly one tweet in train.txt has an entity that starts with `I-` and no `B-`: "
        f"IMGID:{mner['trap_tweet']['image_id']}.",
        "- tokens include @names, http://t.co URLs, hashtags, emoji and `&amp`.",
        f"- missing images (referenced, no file): {', '.join(mner['missing_images']) or 'none'}.",
        "- broken images (file present, unreadable; not in boxes.jsonl): "
        + (", ".join(f"{k} ({v})" for k, v in mner["broken_images"].items()) or "none") + ".",
        "",
        "## flickr/ (image-text retrieval, AGREE's files)",
        "",
        "Files: train.jsonl (`image`, `caption`, `image_id`, `segs`), test_texts.jsonl (`query_id`,",
        "`query_text`, `item_ids` = image ids), test_images.jsonl (`image_id`, `item_ids` = query ids),",
        "test_texts_segs.jsonl (`query_id`, `query_text`, `items` = entity strings), images/<image_id>.jpg,",
        "boxes.jsonl (image_id as a string).",
        "",
        f"- images: {retr['images']['train']} train, {retr['images']['test']} test (ids disjoint);"
        f" captions: {retr['captions']['train']} train, {retr['captions']['test']} test.",
        "- each caption mentions 1-3 entities (coloured objects such as `a red car`, scenes such as `a beach`),",
        "  each appearing verbatim exactly once, so EGR can mask it with a plain replace.",
        "- pictures come in groups of 2-3 that share one object (same colour and kind): distractors share",
        "  objects with their targets, so entity-level re-ranking has work to do.",
        f"- missing images: {', '.join(retr['missing_images']) or 'none'}.",
        "- broken images (not in boxes.jsonl): "
        + (", ".join(f"{k} ({v})" for k, v in retr["broken_images"].items()) or "none") + ".",
        "",
    ]
    return "\n".join(lines)


def build_demo(spec: DemoSpec) -> tuple[dict[str, bytes], dict]:
    """Every file of the demo (path relative to the output root -> bytes) and a summary."""
    spec.validate()
    mner_files, mner = build_mner(spec, _stream(spec.seed, 1))
    retr_files, retr = build_retrieval(spec, _stream(spec.seed, 2))
    files = {f"tweets/{k}": v for k, v in mner_files.items()}
    files.update({f"flickr/{k}": v for k, v in retr_files.items()})
    files["DEMO.md"] = demo_markdown(spec, mner, retr).encode("utf-8")
    return dict(sorted(files.items())), {"tweets": mner, "flickr": retr}


def generate_demo(spec: DemoSpec, out_dir: str | Path) -> dict:
    """Write the demo under ``out_dir`` atomically (temp folder beside it, renamed into place)."""
    files, summary = build_demo(spec)
    with atomic_path(out_dir) as tmp:
        if tmp.exists():  # left by a killed run that had the same pid
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        tmp.mkdir()
        for rel, data in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return summary

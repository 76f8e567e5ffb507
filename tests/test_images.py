"""Robust image loader on real bad files written into tmp_path."""
import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.data.images import (FALLBACK_RGB, ImagePolicy, ImageReport, fallback_image, image_path, load_image,
                                  load_image_by_id, probe_image)
from pipeline.paths import PathEscapeError

POLICY = ImagePolicy(fallback_size=16)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def put(tmp_path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def png_header_only(width: int, height: int, bit_depth: int = 1, colour_type: int = 0) -> bytes:
    """A PNG that declares width x height but carries no pixel data (no IDAT)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def assert_fallback(r, status, policy=POLICY):
    assert (r.status, r.is_fallback) == (status, True)
    assert r.image.mode == "RGB" and r.image.size == (policy.fallback_size, policy.fallback_size)
    assert (np.asarray(r.image) == np.array(FALLBACK_RGB, dtype=np.uint8)).all()


def assert_real(r, status, size, pixel, tol=0):
    assert (r.status, r.is_fallback) == (status, False)
    assert r.image.mode == "RGB" and r.image.size == size
    got = r.image.getpixel((1, 1))
    assert all(abs(a - b) <= tol for a, b in zip(got, pixel)), (got, pixel)


# -- unusable files -> fallback ------------------------------------------------------
def test_missing_zero_byte_directory(tmp_path):
    assert_fallback(load_image(tmp_path / "nope.jpg", POLICY), "missing")
    assert_fallback(load_image(put(tmp_path, "zero.jpg", b""), POLICY), "zero_byte")
    (tmp_path / "dir.jpg").mkdir()
    assert_fallback(load_image(tmp_path / "dir.jpg", POLICY), "unreadable")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    assert_fallback(load_image(tmp_path / "dangling.jpg", POLICY), "missing")
    assert_fallback(load_image(None, POLICY), "refused")


def test_text_and_eps_are_not_images(tmp_path):
    assert_fallback(load_image(put(tmp_path, "t.jpg", b"<html>404 Not Found</html>\n"), POLICY), "not_image")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # would start Ghostscript
    assert_fallback(load_image(put(tmp_path, "e.jpg", eps), POLICY), "not_image")


def test_truncated_jpeg_and_png(tmp_path):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    jpg, png = encode(noise, "JPEG", quality=90), encode(noise, "PNG")
    for name, data in [("half.jpg", jpg[: len(jpg) // 2]), ("tail.jpg", jpg[:-200]),
                       ("half.png", png[: len(png) // 2])]:
        assert_fallback(load_image(put(tmp_path, name, data), POLICY), "truncated")
    # the intact files load (the truncation, not the content, is what fails)
    assert load_image(put(tmp_path, "ok.png", png), POLICY).status == "ok"
    assert load_image(put(tmp_path, "ok.jpg", jpg), POLICY).status == "ok"


def test_decompression_bomb_detected_from_header(tmp_path):
    # 50000 x 50000 is above Pillow's own hard limit (DecompressionBombError at open)
    r = load_image(put(tmp_path, "bomb.png", png_header_only(50000, 50000)), POLICY)
    assert_fallback(r, "too_large")
    # 10000 x 10000 is under Pillow's hard limit but over policy.max_pixels: refused from the
    # header alone (the file has no pixel data, so decoding would report "truncated" instead)
    big = put(tmp_path, "big.png", png_header_only(10000, 10000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        r = load_image(big, POLICY)
    assert_fallback(r, "too_large")
    assert r.size == (10000, 10000)
    assert probe_image(big, POLICY) == "too_large"
    # with a generous policy the header passes and decoding finds the data missing
    assert load_image(big, ImagePolicy(max_pixels=10**9)).status in ("truncated", "corrupt")
    # policy.max_pixels applies to real small images as well
    p = put(tmp_path, "20x20.png", encode(Image.new("RGB", (20, 20)), "PNG"))
    assert_fallback(load_image(p, ImagePolicy(max_pixels=399, fallback_size=16)), "too_large")
    assert load_image(p, ImagePolicy(max_pixels=400)).status == "ok"


def test_tiny_images(tmp_path):
    assert_fallback(load_image(put(tmp_path, "1x1.png", encode(Image.new("RGB", (1, 1)), "PNG")), POLICY), "too_small")
    thin = put(tmp_path, "3x40.png", encode(Image.new("RGB", (3, 40), (1, 2, 3)), "PNG"))
    assert_fallback(load_image(thin, POLICY), "too_small")  # min_side 4
    assert_real(load_image(thin, ImagePolicy(min_side=3)), "ok", (3, 40), (1, 2, 3))


# -- convertible files -> real RGB ------------------------------------------------------
def test_grayscale_palette_and_cmyk(tmp_path):
    assert_real(load_image(put(tmp_path, "l.png", encode(Image.new("L", (8, 6), 77), "PNG")), POLICY),
                "converted_L", (8, 6), (77, 77, 77))
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    assert_real(load_image(put(tmp_path, "p.png", encode(pal, "PNG")), POLICY), "converted_P", (8, 8), (10, 200, 30))
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    assert_real(load_image(put(tmp_path, "cmyk.jpg", encode(cmyk, "JPEG", quality=95)), POLICY),
                "converted_CMYK", (16, 16), (255, 0, 0), tol=3)


def test_transparency_is_composited_onto_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
    assert_real(load_image(put(tmp_path, "a0.png", encode(rgba, "PNG")), POLICY), "converted_RGBA", (8, 8),
                (255, 255, 255))
    half = Image.new("RGBA", (8, 8), (255, 0, 0, 128))  # half red over white: 255, 127, 127
    assert_real(load_image(put(tmp_path, "a1.png", encode(half, "PNG")), POLICY), "converted_RGBA", (8, 8),
                (255, 127, 127), tol=1)
    la = Image.new("LA", (8, 8), (0, 255))  # opaque black
    assert_real(load_image(put(tmp_path, "la.png", encode(la, "PNG")), POLICY), "converted_LA", (8, 8), (0, 0, 0))
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0] * 256)
    keyed = put(tmp_path, "pt.png", encode(pal, "PNG", transparency=0))  # index 0 is transparent
    assert_real(load_image(keyed, POLICY), "converted_P", (8, 8), (255, 255, 255))


def test_16bit_32bit_and_float(tmp_path):
    a16 = np.full((6, 6), 25700, dtype=np.uint16)  # 25700 * 255 / 65535 = 100
    a16[0, 0] = 65535
    p16 = put(tmp_path, "g16.png", encode(Image.fromarray(a16), "PNG"))
    with Image.open(p16) as im:
        assert im.mode.startswith("I;16")
    r = load_image(p16, POLICY)
    assert r.status.startswith("converted_I;16") and not r.is_fallback
    assert r.image.getpixel((1, 1)) == (100, 100, 100) and r.image.getpixel((0, 0)) == (255, 255, 255)
    i32 = put(tmp_path, "i32.tif", encode(Image.fromarray(np.full((6, 6), 1000, dtype=np.int32)), "TIFF"))
    assert_real(load_image(i32, POLICY), "converted_I", (6, 6), (4, 4, 4))  # 1000 * 255 / 65535 = 3.9
    f = np.full((6, 6), 0.2, dtype=np.float32)
    f[0, 0] = np.nan
    pf = put(tmp_path, "f.tif", encode(Image.fromarray(f), "TIFF"))
    r = load_image(pf, POLICY)
    assert_real(r, "converted_F", (6, 6), (51, 51, 51))  # 0.2 * 255
    assert r.image.getpixel((0, 0)) == (0, 0, 0)  # NaN -> 0
    wide = np.linspace(-1000, 1000, 36, dtype=np.float32).reshape(6, 6)  # min-max normalised
    r = load_image(put(tmp_path, "w.tif", encode(Image.fromarray(wide), "TIFF")), POLICY)
    assert r.image.getpixel((0, 0)) == (0, 0, 0) and r.image.getpixel((5, 5)) == (255, 255, 255)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    p = put(tmp_path, "anim.gif", data)
    assert_real(load_image(p, POLICY), "animated", (10, 10), (255, 0, 0))
    assert probe_image(p, POLICY) == "animated"
    still = put(tmp_path, "still.gif", encode(frames[1], "GIF"))
    assert_real(load_image(still, POLICY), "converted_P", (10, 10), (0, 0, 255))


def test_plain_rgb_is_ok_and_probe_matches(tmp_path):
    p = put(tmp_path, "ok.png", encode(Image.new("RGB", (12, 9), (5, 6, 7)), "PNG"))
    assert_real(load_image(p, POLICY), "ok", (12, 9), (5, 6, 7))
    assert probe_image(p, POLICY) == "ok"
    assert probe_image(tmp_path / "nope.jpg", POLICY) == "missing"
    assert probe_image(put(tmp_path, "z.jpg", b""), POLICY) == "zero_byte"
    assert probe_image(put(tmp_path, "t.jpg", b"hello"), POLICY) == "not_image"


def test_no_file_handles_left_open(tmp_path, monkeypatch):
    frames = [Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 0, 255)]]
    jpg = encode(Image.new("RGB", (32, 32)), "JPEG")
    paths = [
        put(tmp_path, "a.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:])),
        put(tmp_path, "b.jpg", jpg), put(tmp_path, "c.jpg", jpg[: len(jpg) // 2]),
        put(tmp_path, "d.png", png_header_only(10000, 10000)), put(tmp_path, "e.jpg", b"text"),
        put(tmp_path, "f.png", encode(Image.new("RGBA", (8, 8)), "PNG")),
        put(tmp_path, "g.png", encode(Image.new("RGB", (1, 1)), "PNG")),
        put(tmp_path, "h.png", png_header_only(50000, 50000)),
    ]
    # track every file opened; holding a reference means only an explicit close() closes it
    # (CPython would otherwise close a leaked file when it is garbage collected)
    opened = []
    real_open = open

    def tracking_open(*args, **kwargs):
        f = real_open(*args, **kwargs)
        opened.append((args[0], f))
        return f

    monkeypatch.setattr("builtins.open", tracking_open)
    loaded = [load_image(p, POLICY) for p in paths] + [probe_image(p, POLICY) for p in paths]
    monkeypatch.undo()
    assert {str(name) for name, _ in opened} >= {str(p) for p in paths}
    assert [str(name) for name, f in opened if not f.closed] == []
    for p in paths:  # images stay usable after their files are gone (fully decoded)
        p.unlink()
    assert all(x.image.tobytes() for x in loaded[: len(paths)])


# -- paths ------------------------------------------------------------------------------
def test_image_path_refuses_escapes(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "secret.jpg").write_bytes(encode(Image.new("RGB", (8, 8)), "JPEG"))
    assert image_path(images, "123") == images.resolve() / "123.jpg"
    assert image_path(images, "sub/2019/x") == images.resolve() / "sub/2019/x.jpg"  # NewsMKG-style relative path
    for bad in ["../secret", "sub/../../secret", "/etc/passwd", ""]:
        with pytest.raises(PathEscapeError):
            image_path(images, bad)
    with pytest.raises(PathEscapeError):
        image_path(images, "/etc/passwd", suffix="")
    os.symlink(tmp_path / "secret.jpg", images / "link.jpg")  # a link that points outside
    with pytest.raises(PathEscapeError):
        image_path(images, "link")
    os.symlink(tmp_path, images / "updir")  # a directory link that points outside
    with pytest.raises(PathEscapeError):
        image_path(images, "updir/secret")
    assert_fallback(load_image_by_id(images, "link", POLICY), "refused")
    assert_fallback(load_image_by_id(images, "../secret", POLICY), "refused")
    (images / "in.png").write_bytes(encode(Image.new("RGB", (8, 8), (9, 9, 9)), "PNG"))
    os.symlink(images / "in.png", images / "alias.png")  # a link that stays inside is fine
    assert_real(load_image_by_id(images, "alias", POLICY, suffix=".png"), "ok", (8, 8), (9, 9, 9))
    with pytest.raises(TypeError):
        image_path(images, 123)


# -- policy and report --------------------------------------------------------------------
def test_policy_from_params():
    p = ImagePolicy.from_params({"fallback": "zero", "max_pixels": 1000, "min_side": 2})
    assert (p.fallback, p.max_pixels, p.min_side, p.fallback_size) == ("zero", 1000, 2, 224)
    with pytest.raises(ValueError, match="images.fallback"):
        ImagePolicy.from_params({"fallback": "black"})
    with pytest.raises(ValueError, match="images.maxpixels: unknown key"):
        ImagePolicy.from_params({"maxpixels": 5})
    with pytest.raises(ValueError, match="images.min_side"):
        ImagePolicy.from_params({"min_side": 0})
    with pytest.raises(ValueError, match="images.formats"):
        ImagePolicy.from_params({"formats": ["NOSUCH"]})
    img = fallback_image(ImagePolicy(fallback_size=5))
    assert img.size == (5, 5) and img.getpixel((4, 4)) == FALLBACK_RGB


def test_report_counts_and_lists_non_ok():
    rep = ImageReport()
    for iid, st in [("a", "ok"), ("b", "missing"), ("c", "converted_CMYK"), ("d", "ok"), ("e", "too_large"),
                    ("f", "animated")]:
        rep.add(iid, st)
    other = ImageReport()
    other.add("g", "truncated")
    rep.update(other)
    assert rep.to_dict() == {
        "total": 7,
        "counts": {"animated": 1, "converted_CMYK": 1, "missing": 1, "ok": 2, "too_large": 1, "truncated": 1},
        "fallbacks": 3,
        "items": [{"image_id": "b", "status": "missing"}, {"image_id": "c", "status": "converted_CMYK"},
                  {"image_id": "e", "status": "too_large"}, {"image_id": "f", "status": "animated"},
                  {"image_id": "g", "status": "truncated"}],
    }

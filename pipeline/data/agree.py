"""Reader for Flickr30k in AGREE's JSON-lines files (image-text retrieval).

Files (one JSON object per line; other keys are ignored):

* train: ``{"image": <file name or path>, "caption": str, "image_id": int|str,
  "segs": [entity strings], ("caption_id": int|str optional), ...}``
* test texts: ``{"query_id": int|str, "query_text": str, "item_ids": [image ids]}``
* test images: ``{"image_id": int|str, "item_ids": [caption (query) ids]}``
* test entities: ``{"query_id": int|str, "query_text": str, "items": [entity strings]}``

Ids are kept as strings (``12`` and ``"12"`` are the same id); the JSON type each file used is
recorded in :attr:`AgreeData.id_types` so outputs can be written back in AGREE's type with
:func:`restore_id`.

Every line is validated (bad JSON, not an object, missing key, wrong type, empty text or id
list, duplicate ids) and the files are checked against each other: every query's image ids
exist in the images file, every image's caption ids exist in the texts file, entity rows
match the texts one to one with equal ``query_text``, train image ids map to one file, and
train caption ids do not collide with test ones. With ``on_bad_line="raise"`` the first
problem raises :class:`AgreeFormatError` naming the file and line (cross-file problems list
the first few offending ids and their count). With ``on_bad_line="skip"`` the offending
record is skipped and listed in :attr:`AgreeData.skipped`; skipping is repeated until the
test files are consistent again (a skipped image removes the queries that need it, and so
on), so what is returned is always coherent.

Empty entity strings are dropped (they would turn every position of a caption into a mask)
and counted in ``counts["empty_entities_dropped"]``.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ON_BAD_LINE = ("raise", "skip")
SHOW = 5  # offending ids shown in a cross-file error


class AgreeFormatError(ValueError):
    """Malformed or inconsistent AGREE files; ``path`` and ``line`` (1-based) say where."""

    def __init__(self, path: str | os.PathLike, line: int | None, reason: str, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Caption:
    """A caption (train) or query (test) with its ground-truth images and entities."""

    split: str               # "train" | "test"
    caption_id: str
    text: str
    image_ids: list[str]     # ground-truth image ids
    entities: list[str]      # entity strings (train: segs, test: the entities file's items)
    line: int                # line in its source file


@dataclass(frozen=True)
class GalleryImage:
    """An image of the gallery with the captions that describe it."""

    split: str
    image_id: str
    caption_ids: list[str]
    line: int                # first line that mentions it
    file: str | None = None  # train: the record's "image" value; test: None (<images>/<id>.jpg)


@dataclass
class AgreeData:
    """Everything read: captions, gallery, id types, skips, counts and warnings."""

    captions: list[Caption] = field(default_factory=list)
    gallery: list[GalleryImage] = field(default_factory=list)
    id_types: dict[str, str] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)

    def caption_rows(self) -> list[dict[str, Any]]:
        """Rows of the captions manifest: split, caption_id, text, image_ids, entities."""
        return [{"split": c.split, "caption_id": c.caption_id, "text": c.text,
                 "image_ids": list(c.image_ids), "entities": list(c.entities)} for c in self.captions]

    def gallery_rows(self) -> list[dict[str, Any]]:
        """Rows of the gallery manifest: split, image_id, caption_ids."""
        return [{"split": g.split, "image_id": g.image_id, "caption_ids": list(g.caption_ids)}
                for g in self.gallery]

    def meta(self) -> dict[str, str]:
        """Original JSON id types ("int" | "str" | "mixed"), for meta.json.

        Keys: query_id_type, image_id_type (test texts / images files), text_item_id_type,
        image_item_id_type (their item_ids), entity_query_id_type, train_image_id_type,
        train_caption_id_type; a key is absent when its file or field was not read.
        """
        return dict(self.id_types)

    def report(self) -> dict[str, Any]:
        """Counts, skips (with file, line, reason) and warnings, for the prepare report."""
        return {"counts": dict(self.counts), "skipped": list(self.skipped),
                "warnings": list(self.warnings), "id_types": self.meta()}


def restore_id(value: str, id_type: str) -> int | str:
    """An id in the JSON type AGREE used: int for "int", else the string unchanged."""
    return int(value) if id_type == "int" else value


def _type_name(types: set[str]) -> str | None:
    if not types:
        return None
    return types.pop() if len(types) == 1 else "mixed"


class _Reader:
    """Shared state: mode, skip list, id-type bookkeeping."""

    def __init__(self, on_bad_line: str) -> None:
        if on_bad_line not in ON_BAD_LINE:
            raise ValueError(f"on_bad_line must be one of {ON_BAD_LINE}, got {on_bad_line!r}")
        self.mode = on_bad_line
        self.skipped: list[dict[str, Any]] = []
        self.types: dict[str, set[str]] = {}
        self.empty_entities = 0

    # -- reporting ---------------------------------------------------------
    def bad(self, path: Path, line: int | None, reason: str, message: str, ident: str | None = None) -> None:
        """Raise, or record a skipped record."""
        if self.mode == "raise":
            raise AgreeFormatError(path, line, reason, message)
        self.skipped.append({"file": path.name, "line": line, "reason": reason,
                             "message": message, "id": ident})

    # -- line-level parsing ------------------------------------------------
    def objects(self, path: Path) -> list[tuple[int, dict]]:
        """(line, object) for each non-blank line that is a JSON object."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: AGREE file not found") from None
        out: list[tuple[int, dict]] = []
        for lineno, raw in enumerate(data.split(b"\n"), start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                self.bad(path, lineno, "not_utf8", f"line is not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                self.bad(path, lineno, "bad_json", f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            if not isinstance(obj, dict):
                hint = " (a JSON array file? this reader expects one object per line)" if isinstance(obj, list) else ""
                self.bad(path, lineno, "not_object", f"expected a JSON object, got {type(obj).__name__}{hint}")
                continue
            out.append((lineno, obj))
        return out

    def ident(self, path: Path, line: int, obj: dict, key: str, kind: str) -> str:
        """A validated id (int or non-empty str) as a string; records its JSON type under ``kind``."""
        if key not in obj:
            raise _LineError("missing_key", f"missing key {key!r}")
        v = obj[key]
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise _LineError("wrong_type", f"{key}: expected an int or str id, got {type(v).__name__} {v!r}")
        if isinstance(v, str) and not v.strip():
            raise _LineError("empty_id", f"{key}: empty id")
        self.types.setdefault(kind, set()).add("int" if isinstance(v, int) else "str")
        return str(v)

    def id_list(self, path: Path, line: int, obj: dict, key: str, kind: str) -> list[str]:
        if key not in obj:
            raise _LineError("missing_key", f"missing key {key!r}")
        v = obj[key]
        if not isinstance(v, list):
            raise _LineError("wrong_type", f"{key}: expected a list of ids, got {type(v).__name__}")
        if not v:
            raise _LineError("empty_list", f"{key}: empty list (no ground truth)")
        ids = [self.ident(path, line, {key: x}, key, kind) for x in v]
        dup = [i for i, n in Counter(ids).items() if n > 1]
        if dup:
            raise _LineError("duplicate_in_list", f"{key}: repeated ids {dup[:SHOW]}")
        return ids

    @staticmethod
    def text(obj: dict, key: str) -> str:
        if key not in obj:
            raise _LineError("missing_key", f"missing key {key!r}")
        v = obj[key]
        if not isinstance(v, str):
            raise _LineError("wrong_type", f"{key}: expected a string, got {type(v).__name__}")
        if not v.strip():
            raise _LineError("empty_text", f"{key}: empty text")
        return v

    def entities(self, obj: dict, key: str) -> list[str]:
        if key not in obj:
            raise _LineError("missing_key", f"missing key {key!r}")
        v = obj[key]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise _LineError("wrong_type", f"{key}: expected a list of strings, got {json.dumps(v)[:80]}")
        kept = [x for x in v if x.strip()]
        self.empty_entities += len(v) - len(kept)
        return kept

    def records(self, path: Path, parse, id_of) -> dict[str, tuple[int, Any]]:
        """Parse every object with ``parse``; key by ``id_of``; duplicates are bad lines."""
        out: dict[str, tuple[int, Any]] = {}
        for line, obj in self.objects(path):
            try:
                rec = parse(path, line, obj)
            except _LineError as e:
                self.bad(path, line, e.reason, e.message, _peek_id(obj))
                continue
            key = id_of(rec)
            if key in out:
                self.bad(path, line, "duplicate_id", f"duplicate id {key!r} (first at line {out[key][0]})", key)
                continue
            out[key] = (line, rec)
        return out


class _LineError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _peek_id(obj: dict) -> str | None:
    for k in ("query_id", "image_id", "caption_id"):
        if k in obj and isinstance(obj[k], (int, str)) and not isinstance(obj[k], bool):
            return str(obj[k])
    return None


def _listing(items: list[str], total: int) -> str:
    shown = "; ".join(items[:SHOW])
    return f"{shown}{' ...' if total > SHOW else ''} ({total} in all)"


# ---------------------------------------------------------------------------
def _read_train(r: _Reader, path: Path) -> tuple[list[Caption], list[GalleryImage]]:
    captions: list[Caption] = []
    images: dict[str, GalleryImage] = {}
    seen_caption: dict[str, int] = {}
    for line, obj in r.objects(path):
        try:
            image = r.text(obj, "image")
            caption = r.text(obj, "caption")
            image_id = r.ident(path, line, obj, "image_id", "train_image_id")
            segs = r.entities(obj, "segs")
            caption_id = (r.ident(path, line, obj, "caption_id", "train_caption_id")
                          if "caption_id" in obj else f"train-{line}")
        except _LineError as e:
            r.bad(path, line, e.reason, e.message, _peek_id(obj))
            continue
        if caption_id in seen_caption:
            r.bad(path, line, "duplicate_id",
                  f"duplicate caption_id {caption_id!r} (first at line {seen_caption[caption_id]})", caption_id)
            continue
        g = images.get(image_id)
        if g is not None and g.file != image:
            r.bad(path, line, "image_file_conflict",
                  f"image_id {image_id!r} is {image!r} here but {g.file!r} at line {g.line}", image_id)
            continue
        seen_caption[caption_id] = line
        if g is None:
            g = images[image_id] = GalleryImage("train", image_id, [], line, image)
        g.caption_ids.append(caption_id)
        captions.append(Caption("train", caption_id, caption, [image_id], segs, line))
    return captions, list(images.values())


def _read_test(r: _Reader, texts_path: Path, images_path: Path, entities_path: Path | None,
               warnings: list[dict[str, Any]]) -> tuple[list[Caption], list[GalleryImage]]:
    texts = r.records(texts_path, lambda p, ln, o: (
        r.ident(p, ln, o, "query_id", "query_id"), r.text(o, "query_text"),
        r.id_list(p, ln, o, "item_ids", "text_item_id")), lambda rec: rec[0])
    images = r.records(images_path, lambda p, ln, o: (
        r.ident(p, ln, o, "image_id", "image_id"),
        r.id_list(p, ln, o, "item_ids", "image_item_id")), lambda rec: rec[0])
    ents: dict[str, tuple[int, Any]] = {}
    if entities_path is not None:
        ents = r.records(entities_path, lambda p, ln, o: (
            r.ident(p, ln, o, "query_id", "entity_query_id"), r.text(o, "query_text"),
            r.entities(o, "items")), lambda rec: rec[0])

    # entities <-> texts, one to one with equal text
    if entities_path is not None:
        unknown = [q for q in ents if q not in texts]
        if unknown:
            msg = _listing([f"query {q} (line {ents[q][0]})" for q in unknown], len(unknown))
            _cross(r, entities_path, ents[unknown[0]][0], "entity_unknown_query",
                   f"entity rows for query ids absent from {texts_path.name}: {msg}",
                   [(entities_path, ents[q][0], q) for q in unknown])
            for q in unknown:
                ents.pop(q)
        mismatch = [q for q in texts if q in ents and ents[q][1][1].strip() != texts[q][1][1].strip()]
        if mismatch:
            msg = _listing([f"query {q} (line {ents[q][0]}): {ents[q][1][1][:40]!r} vs "
                            f"{texts[q][1][1][:40]!r}" for q in mismatch], len(mismatch))
            _cross(r, entities_path, ents[mismatch[0]][0], "entity_text_mismatch",
                   f"query_text differs from {texts_path.name}: {msg}",
                   [(texts_path, texts[q][0], q) for q in mismatch])
            for q in mismatch:
                texts.pop(q)
        missing = [q for q in texts if q not in ents]
        if missing:
            msg = _listing([f"query {q} (line {texts[q][0]})" for q in missing], len(missing))
            _cross(r, texts_path, texts[missing[0]][0], "query_without_entities",
                   f"queries with no row in {entities_path.name}: {msg}",
                   [(texts_path, texts[q][0], q) for q in missing])
            for q in missing:
                texts.pop(q)

    # texts <-> images; in skip mode repeat until nothing refers to a removed record
    while True:
        bad_q = [q for q, (_, rec) in texts.items() if any(i not in images for i in rec[2])]
        if bad_q:
            msg = _listing([f"query {q} (line {texts[q][0]}) -> "
                            f"{[i for i in texts[q][1][2] if i not in images][:SHOW]}" for q in bad_q], len(bad_q))
            _cross(r, texts_path, texts[bad_q[0]][0], "unknown_image",
                   f"queries refer to image ids absent from {images_path.name}: {msg}",
                   [(texts_path, texts[q][0], q) for q in bad_q])
            for q in bad_q:
                texts.pop(q)
        bad_i = [i for i, (_, rec) in images.items() if any(c not in texts for c in rec[1])]
        if bad_i:
            msg = _listing([f"image {i} (line {images[i][0]}) -> "
                            f"{[c for c in images[i][1][1] if c not in texts][:SHOW]}" for i in bad_i], len(bad_i))
            _cross(r, images_path, images[bad_i[0]][0], "unknown_caption",
                   f"images refer to caption ids absent from {texts_path.name}: {msg}",
                   [(images_path, images[i][0], i) for i in bad_i])
            for i in bad_i:
                images.pop(i)
        if not bad_q and not bad_i:
            break

    # both directions of the ground truth should agree (the score stage uses each one)
    asym = [(q, i) for q, (_, rec) in texts.items() for i in rec[2] if q not in images[i][1][1]]
    asym += [(q, i) for i, (_, rec) in images.items() for q in rec[1] if i not in texts[q][1][2]]
    if asym:
        warnings.append({"reason": "gt_asymmetric", "count": len(asym),
                         "message": f"{len(asym)} query-image pairs are listed in only one of "
                                    f"{texts_path.name} / {images_path.name}",
                         "first": [{"query_id": q, "image_id": i} for q, i in asym[:SHOW]]})

    captions = [Caption("test", q, rec[1], list(rec[2]), list(ents[q][1][2]) if q in ents else [], line)
                for q, (line, rec) in texts.items()]
    gallery = [GalleryImage("test", i, list(rec[1]), line) for i, (line, rec) in images.items()]
    return captions, gallery


def _cross(r: _Reader, path: Path, line: int, reason: str, message: str,
           records: list[tuple[Path, int, str]]) -> None:
    """A cross-file problem: raise once with the listing, or record one skip per record."""
    if r.mode == "raise":
        raise AgreeFormatError(path, line, reason, message)
    for p, ln, ident in records:
        r.skipped.append({"file": p.name, "line": ln, "reason": reason, "message": message[:300], "id": ident})


def read_agree(train: str | os.PathLike | None = None, test_texts: str | os.PathLike | None = None,
               test_images: str | os.PathLike | None = None, test_entities: str | os.PathLike | None = None,
               on_bad_line: str = "raise") -> AgreeData:
    """Read the AGREE files that are given (train and/or the test pair, entities optional).

    ``test_texts`` and ``test_images`` go together; ``test_entities`` needs them. Without
    an entities file, test captions get no entities.
    """
    r = _Reader(on_bad_line)
    if (test_texts is None) != (test_images is None):
        raise ValueError("test_texts and test_images must be given together")
    if test_entities is not None and test_texts is None:
        raise ValueError("test_entities needs test_texts and test_images")
    data = AgreeData()
    if train is not None:
        c, g = _read_train(r, Path(train))
        data.captions += c
        data.gallery += g
    if test_texts is not None:
        c, g = _read_test(r, Path(test_texts), Path(test_images), Path(test_entities) if test_entities else None,
                          data.warnings)
        test_ids = {x.caption_id for x in c}
        clash = [x for x in data.captions if x.caption_id in test_ids]
        if clash:
            msg = _listing([f"{x.caption_id} (line {x.line})" for x in clash], len(clash))
            _cross(r, Path(train), clash[0].line, "caption_id_collision",  # type: ignore[arg-type]
                   f"train caption ids also used by test queries: {msg}",
                   [(Path(train), x.line, x.caption_id) for x in clash])  # type: ignore[arg-type]
            bad = {x.caption_id for x in clash}
            data.captions = [x for x in data.captions if x.caption_id not in bad]
            data.gallery = [GalleryImage(x.split, x.image_id, [i for i in x.caption_ids if i not in bad], x.line, x.file)
                            for x in data.gallery]
            data.gallery = [x for x in data.gallery if x.caption_ids]
        data.captions += c
        data.gallery += g
    train_imgs = {x.image_id for x in data.gallery if x.split == "train"}
    both = [x.image_id for x in data.gallery if x.split == "test" and x.image_id in train_imgs]
    if both:
        data.warnings.append({"reason": "image_in_both_splits", "count": len(both),
                              "message": f"{len(both)} image ids appear in train and test "
                                         f"(same id must mean the same picture)", "first": both[:SHOW]})
    data.skipped = r.skipped
    data.id_types = {f"{k}_type": t for k, t in ((k, _type_name(set(v))) for k, v in sorted(r.types.items())) if t}
    by_reason = Counter(s["reason"] for s in r.skipped)
    split_counts = Counter(x.split for x in data.captions)
    gallery_counts = Counter(x.split for x in data.gallery)
    data.counts = {
        "train_captions": split_counts.get("train", 0), "train_images": gallery_counts.get("train", 0),
        "test_captions": split_counts.get("test", 0), "test_images": gallery_counts.get("test", 0),
        "skipped": len(r.skipped), "skipped_by_reason": dict(sorted(by_reason.items())),
        "empty_entities_dropped": r.empty_entities,
        "captions_without_entities": sum(1 for x in data.captions if not x.entities),
    }
    return data

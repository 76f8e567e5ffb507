"""Reader for Twitter-2015 / Twitter-2017 / NewsMKG / plain CoNLL NER files.

MNER layout (``twitter``, ``newsmkg``): UTF-8 text; each tweet starts with an
``IMGID:<value>`` line, then one ``token<TAB>tag`` line per token; tweets are separated by
blank lines.

* ``fmt="twitter"``: the IMGID value is an image id (image file ``<images>/<id>.jpg``).
* ``fmt="newsmkg"``: the IMGID value is a path relative to the dataset folder (+ ``.jpg``).

The reader returns the IMGID value as ``Sample.image_id`` in both cases; turning it into a
file path (and refusing escapes) is :func:`pipeline.data.images.image_path`'s job.

* ``fmt="conll"`` (e.g. WNUT-17): text only, no IMGID line and no images. One
  ``token<TAB>tag`` or ``token<SPACE>tag`` line per token: a line with a tab is split on
  tabs, else on ASCII spaces (never on other Unicode whitespace, so a U+00A0 token stays a
  token); more than two fields are CoNLL-2003 columns (``EU NNP B-NP B-ORG``): the first
  is the token, the last the tag. Sentences are separated by empty lines or lines of ASCII
  whitespace only (WNUT-17's train.conll mostly uses a lone TAB).
  ``-DOCSTART-`` lines (first field ``-DOCSTART-``) are skipped and end the sentence. An
  ``IMGID:`` line is just a token line. ``Sample.image_id`` is "" and ``Sample.line`` is
  the line of the sentence's first token. Tags are ``O`` or ``B-``/``I-`` + any type name
  ``[A-Za-z][A-Za-z0-9_.-]*`` (types come from the data, e.g. ``creative-work``);
  ``other_tag`` is ignored (no OTHER/MISC renaming).

Tolerated as data (never errors): no blank line after the last tweet, CRLF line ends, a
UTF-8 BOM (at the file start or at a line start; BOMs that are a whole token stay that
token), several blank lines in a row, a missing blank line before the next ``IMGID:``,
``I-`` tags without a preceding ``B-`` (kept unchanged: the metric decides; counted in
``counts["stray_i"]``), any Unicode in tokens (URLs, @names, emoji, ``&amp``). Lines are
split on ``\\n`` only, so characters such as U+2028 or U+0085 inside a token stay inside it.

Blank tokens (all formats): a token made only of Unicode whitespace and/or zero-width
characters (a lone U+00A0 in Twitter-2015's valid.txt; U+200B, U+FEFF, ...) is still a
token with a tag: it is kept unchanged and counted in ``counts["blank_tokens"]``. Only a
token field with zero characters (a line ``<TAB>O``) is an ``empty_token`` error.

Errors (:class:`ConllFormatError`, naming file and line): bytes that are not UTF-8, a token
line without exactly one tab (conll: a line with two or more tabs, or with neither tab nor
space), an unknown tag, an empty IMGID, tokens before any IMGID, a duplicate IMGID within
the file, a tweet with no tokens, an empty token. With ``on_bad_line="skip"`` the whole
offending tweet (or sentence) is skipped instead and listed in ``ConllResult.skipped`` with
its reason and line.

Counts: ``tweets`` and ``sentences`` (the same number: samples read), ``tokens``,
``blank_tokens``, ``skipped``, ``skipped_by_reason``, ``stray_i``, ``tags``.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENTITY_TYPES = ("PER", "LOC", "ORG", "OTHER", "MISC")
OTHER_ALIASES = ("OTHER", "MISC")
FORMATS = ("twitter", "newsmkg", "conll")
ON_BAD_LINE = ("raise", "skip")
_TYPE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_CONLL_TAG = re.compile(r"^[BI]-[A-Za-z][A-Za-z0-9_.-]*$")
_IMGID = "IMGID:"
_DOCSTART = "-DOCSTART-"
_BOM = "\ufeff"
# zero-width characters that str.isspace() does not cover (U+00A0, U+2002.. etc. it does)
_ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\ufeff\u180e")


class ConllFormatError(ValueError):
    """Malformed CoNLL input; ``path`` and ``line`` (1-based) say where."""

    def __init__(self, path: str | os.PathLike, line: int, reason: str, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        super().__init__(f"{self.path}:{line}: {message}")


@dataclass(frozen=True)
class Sample:
    """One tweet (or conll sentence): its IMGID value ("" for conll), tokens and BIO tags."""

    image_id: str
    tokens: list[str]
    tags: list[str]
    line: int  # 1-based line of the IMGID line (conll: of the first token)


@dataclass
class ConllResult:
    """Samples of one split file, plus what was skipped and summary counts."""

    path: str
    samples: list[Sample]
    skipped: list[dict[str, Any]] = field(default_factory=list)  # [{"line", "reason", "message"}]
    counts: dict[str, Any] = field(default_factory=dict)


def normalise_tag(tag: str, other_tag: str = "MISC") -> str | None:
    """The tag with OTHER/MISC renamed to ``other_tag``; None if ``tag`` is not a valid BIO tag."""
    if tag == "O":
        return tag
    prefix, sep, etype = tag.partition("-")
    if not sep or prefix not in ("B", "I") or etype not in ENTITY_TYPES:
        return None
    if etype in OTHER_ALIASES:
        etype = other_tag
    return f"{prefix}-{etype}"


def conll_tag(tag: str) -> str | None:
    """``tag`` if it is ``O`` or ``B-``/``I-`` + a type name (fmt="conll"), else None."""
    return tag if tag == "O" or _CONLL_TAG.match(tag) else None


def has_images(fmt: str) -> bool:
    """twitter / newsmkg samples name an image; plain CoNLL text (``conll``) has none, and its
    entity types come from the tags rather than the PER/LOC/ORG/other list."""
    return fmt != "conll"


def is_blank_token(token: str) -> bool:
    """True for a non-empty token made only of Unicode whitespace and/or zero-width characters."""
    return bool(token) and all(c.isspace() or c in _ZERO_WIDTH for c in token)


def _check_args(fmt: str, other_tag: str, on_bad_line: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"CoNLL format must be one of {FORMATS}, got {fmt!r}")
    if on_bad_line not in ON_BAD_LINE:
        raise ValueError(f"on_bad_line must be one of {ON_BAD_LINE}, got {on_bad_line!r}")
    if fmt != "conll" and (not isinstance(other_tag, str) or not _TYPE_NAME.match(other_tag)):
        raise ValueError(f"other_tag must be a type name like 'MISC' (letters, digits, _), got {other_tag!r}")


def _lines(data: bytes, seps: str = "\t") -> list[str | UnicodeDecodeError]:
    """Split raw bytes on LF, drop CR and BOMs; undecodable lines become the error object.

    The file's BOM is always dropped; BOMs at a later line start too, unless one of ``seps``
    follows them (then they are the whole token: a zero-width token, kept).
    """
    out: list[str | UnicodeDecodeError] = []
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the file ends with a newline
    for i, raw in enumerate(raw_lines):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append(e)
            continue
        if i == 0 and text.startswith(_BOM):
            text = text[1:]  # the file's encoding signature
        rest = text.lstrip(_BOM)
        if rest != text and not rest.startswith(tuple(seps)):
            text = rest
        out.append(text)
    return out


def _split_line(text: str, conll: bool) -> tuple[str, str] | str:
    """(token, raw tag) of a token line, or why it cannot be split.

    twitter/newsmkg: exactly ``token<TAB>tag``. conll: fields split on TAB when the line has
    one, else on ASCII spaces; two fields are token and tag, more are CoNLL-2003 columns
    (``EU NNP B-NP B-ORG``): the first is the token, the last the tag.
    """
    if not conll:
        parts = text.split("\t")
        if len(parts) != 2:
            what = "no tab" if len(parts) == 1 else f"{len(parts) - 1} tabs"
            return f"expected 'token<TAB>tag', found {what}: {text[:60]!r}"
        return parts[0], parts[1].strip()
    if "\t" in text:
        parts = text.rstrip("\t ").split("\t")
    else:
        parts = [f for f in text.split(" ") if f != ""]
    if len(parts) < 2:
        return f"expected 'token<TAB>tag' or 'token<SPACE>tag', found one field: {text[:60]!r}"
    return parts[0], parts[-1].strip()


def _is_separator(text: str) -> bool:
    """An empty line or one of ASCII whitespace only (a lone TAB in WNUT-17's train file).

    A line holding other whitespace (U+00A0 ...) is a token line: a blank token needs its tag.
    """
    return text.strip(" \t\r\n\f\v") == ""


class _Block:
    """A tweet being read: IMGID line, tokens, and the first problem seen (if any)."""

    def __init__(self, line: int, image_id: str | None) -> None:
        self.line = line
        self.image_id = image_id
        self.tokens: list[str] = []
        self.tags: list[str] = []
        self.error: tuple[int, str, str] | None = None  # (line, reason, message)
        self.last_line = line

    def fail(self, line: int, reason: str, message: str) -> None:
        if self.error is None:
            self.error = (line, reason, message)


def read_conll(path: str | os.PathLike, fmt: str = "twitter", other_tag: str = "MISC",
               on_bad_line: str = "raise") -> ConllResult:
    """Read one split file. See the module docstring for the formats, traps and errors.

    ``fmt``: "twitter", "newsmkg" or "conll" (plain CoNLL NER, no IMGID lines, no images).
    ``other_tag``: OTHER and MISC entities are both renamed to this type (ignored for conll).
    ``on_bad_line``: "raise" (ConllFormatError on the first problem) or "skip" (skip the
    whole tweet or sentence, record ``{"line", "reason", "message"}`` in ``.skipped``).
    """
    _check_args(fmt, other_tag, on_bad_line)
    conll = fmt == "conll"
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: CoNLL file not found") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a directory, expected a CoNLL file") from None

    samples: list[Sample] = []
    skipped: list[dict[str, Any]] = []
    seen_ids: dict[str, int] = {}
    stray_i = blank_tokens = 0
    tag_counts: Counter = Counter()

    def close(block: _Block | None) -> None:
        nonlocal stray_i, blank_tokens
        if block is None:
            return
        if not conll and block.error is None and block.image_id is not None and not block.tokens:
            block.fail(block.line, "no_tokens", f"tweet IMGID:{block.image_id} has no tokens")
        if not conll and block.error is None and block.image_id is not None and block.image_id in seen_ids:
            block.fail(block.line, "duplicate_imgid",
                       f"duplicate IMGID:{block.image_id} (first at line {seen_ids[block.image_id]})")
        if block.error is not None:
            line, reason, message = block.error
            if on_bad_line == "raise":
                raise ConllFormatError(path, line, reason, message)
            skipped.append({"line": line, "reason": reason, "message": message,
                            "block_line": block.line, "image_id": block.image_id})
            return
        assert block.image_id is not None
        seen_ids[block.image_id] = block.line
        prev = "O"
        for tag in block.tags:
            if tag.startswith("I-") and prev[2:] != tag[2:]:
                stray_i += 1
            prev = tag
        tag_counts.update(block.tags)
        blank_tokens += sum(is_blank_token(t) for t in block.tokens)
        samples.append(Sample(block.image_id, block.tokens, block.tags, block.line))

    block: _Block | None = None
    for lineno, text in enumerate(_lines(data, "\t " if conll else "\t"), start=1):
        if isinstance(text, UnicodeDecodeError):
            if block is None:
                block = _Block(lineno, "" if conll else None)
            block.fail(lineno, "not_utf8", f"line is not valid UTF-8 ({text.reason} at byte {text.start})")
            continue
        if _is_separator(text):
            close(block)
            block = None
            continue
        if conll:
            if text.startswith(_DOCSTART) and re.split(r"[\t ]", text, maxsplit=1)[0] == _DOCSTART:
                # a document marker: skipped, and it ends the sentence
                close(block)
                block = None
                continue
            if block is None:
                block = _Block(lineno, "")
        else:
            if text.startswith(_IMGID) and "\t" not in text:
                close(block)
                value = text[len(_IMGID):].strip()
                block = _Block(lineno, value)
                if not value:
                    block.fail(lineno, "empty_imgid", "empty IMGID")
                elif "\x00" in value:
                    block.fail(lineno, "bad_imgid", "IMGID contains a NUL byte")
                continue
            if block is None:  # tokens before any IMGID (or after a blank line without a new IMGID)
                block = _Block(lineno, None)
                block.fail(lineno, "no_imgid", f"token line before any IMGID line: {text[:60]!r}")
        parts = _split_line(text, conll)
        if isinstance(parts, str):
            block.fail(lineno, "bad_line", parts)
            continue
        token, raw_tag = parts
        if token == "":  # only a zero-length token is empty; whitespace/zero-width ones are blank tokens
            block.fail(lineno, "empty_token", f"empty token (tag {raw_tag!r})")
            continue
        tag = conll_tag(raw_tag) if conll else normalise_tag(raw_tag, other_tag)
        if tag is None:
            valid = ("O, B-/I- + a type name like 'person' or 'creative-work'" if conll
                     else f"O, B-/I- of {', '.join(ENTITY_TYPES)}")
            block.fail(lineno, "unknown_tag", f"unknown tag {raw_tag!r} for token {token[:40]!r} (valid: {valid})")
            continue
        block.tokens.append(token)
        block.tags.append(tag)
    close(block)

    by_reason = Counter(s["reason"] for s in skipped)
    counts = {
        "tweets": len(samples),  # kept for backward compatibility; "sentences" is the same number
        "sentences": len(samples),
        "tokens": sum(len(s.tokens) for s in samples),
        "blank_tokens": blank_tokens,
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(by_reason.items())),
        "stray_i": stray_i,
        "tags": dict(sorted(tag_counts.items())),
    }
    return ConllResult(str(path), samples, skipped, counts)

"""CoNLL reader (Twitter-2015/2017, NewsMKG, plain CoNLL / WNUT-17) on real files written into tmp_path."""
from pathlib import Path

import pytest

from pipeline.data.conll import ConllFormatError, Sample, conll_tag, is_blank_token, normalise_tag, read_conll

# A Twitter-2015 style snippet: OTHER type, URL/@name/emoji/&amp tokens, a stray I- tag,
# and NO blank line after the last tweet.
T2015 = (
    "IMGID:1015799\n"
    "RT\tO\n"
    "@JayKenMinaj_\tO\n"
    ":\tO\n"
    "Me\tO\n"
    "outside\tO\n"
    "of\tO\n"
    "where\tO\n"
    "George\tB-PER\n"
    "Zimmerman\tI-PER\n"
    "got\tO\n"
    "shot\tO\n"
    "at\tO\n"
    "http://t.co/x\tO\n"
    "\n"
    "IMGID:16_05_01_6\n"
    "Ferguson\tI-LOC\n"          # stray I- (no B-): kept as data
    "&amp\tO\n"
    "\U0001F600\tO\n"           # emoji token
    "Super\tB-OTHER\n"
    "Bowl\tI-OTHER\n"
    "\n"
    "IMGID:16_05_02_1\n"
    "Apple\tB-ORG\n"
    "rocks\tO"                    # no trailing newline, no trailing blank line
)


def write(tmp_path, text, name="train.txt", raw: bytes | None = None):
    p = tmp_path / name
    p.write_bytes(raw if raw is not None else text.encode("utf-8"))
    return p


def test_twitter2015_snippet(tmp_path):
    r = read_conll(write(tmp_path, T2015), other_tag="MISC")
    assert [s.image_id for s in r.samples] == ["1015799", "16_05_01_6", "16_05_02_1"]
    assert [s.line for s in r.samples] == [1, 16, 23]
    first = r.samples[0]
    assert first.tokens[1] == "@JayKenMinaj_" and first.tokens[-1] == "http://t.co/x"
    assert first.tags[7:9] == ["B-PER", "I-PER"]
    second = r.samples[1]
    assert second.tokens == ["Ferguson", "&amp", "\U0001F600", "Super", "Bowl"]
    assert second.tags == ["I-LOC", "O", "O", "B-MISC", "I-MISC"]  # stray I- kept, OTHER -> MISC
    assert r.samples[2] == Sample("16_05_02_1", ["Apple", "rocks"], ["B-ORG", "O"], 23)
    assert r.counts["tweets"] == 3 and r.counts["tokens"] == 13 + 5 + 2
    assert r.counts["stray_i"] == 1
    assert r.counts["tags"]["B-MISC"] == 1 and "B-OTHER" not in r.counts["tags"]
    assert r.skipped == []


def test_other_tag_both_ways(tmp_path):
    text = "IMGID:1\na\tB-OTHER\nb\tI-MISC\nc\tB-MISC\nd\tI-OTHER\n"
    p = write(tmp_path, text)
    assert read_conll(p, other_tag="MISC").samples[0].tags == ["B-MISC", "I-MISC", "B-MISC", "I-MISC"]
    assert read_conll(p, other_tag="OTHER").samples[0].tags == ["B-OTHER", "I-OTHER", "B-OTHER", "I-OTHER"]
    assert normalise_tag("I-ORG") == "I-ORG" and normalise_tag("B-FOO") is None and normalise_tag("b-PER") is None
    with pytest.raises(ValueError, match="other_tag"):
        read_conll(p, other_tag="MI SC")


def test_crlf_bom_and_blank_runs_give_same_result(tmp_path):
    plain = "IMGID:7\nhello\tO\nParis\tB-LOC\n\nIMGID:8\nx\tO\n"
    messy = "\ufeff" + plain.replace("\n\n", "\n\n\n  \n").replace("\n", "\r\n")
    a = read_conll(write(tmp_path, plain, "a.txt"))
    b = read_conll(write(tmp_path, messy, "b.txt"))
    assert [(s.image_id, s.tokens, s.tags) for s in a.samples] == [(s.image_id, s.tokens, s.tags) for s in b.samples]
    assert b.samples[0].image_id == "7" and b.samples[0].tokens == ["hello", "Paris"]  # no BOM, no \r
    assert b.samples[1].line == 7  # counted in the messy file's own lines


def test_unicode_line_separators_stay_inside_tokens(tmp_path):
    tok = "a\u2028b\x85c"
    r = read_conll(write(tmp_path, f"IMGID:1\n{tok}\tO\nz\tO\n"))
    assert r.samples[0].tokens == [tok, "z"]


def test_missing_blank_line_before_next_imgid(tmp_path):
    r = read_conll(write(tmp_path, "IMGID:1\na\tO\nIMGID:2\nb\tB-PER\n"))
    assert [(s.image_id, s.tokens) for s in r.samples] == [("1", ["a"]), ("2", ["b"])]


def test_newsmkg_keeps_relative_path(tmp_path):
    r = read_conll(write(tmp_path, "IMGID:images/2019/abc_1\nBiden\tB-PER\n"), fmt="newsmkg")
    assert r.samples[0].image_id == "images/2019/abc_1"
    with pytest.raises(ValueError, match="format"):
        read_conll(tmp_path / "train.txt", fmt="conll03")


BAD = [
    # (text, line of the problem, reason, words in the message)
    ("IMGID:1\na\tO\nno_tab_here\n", 3, "bad_line", "no tab"),
    ("IMGID:1\na\tO\tX\n", 2, "bad_line", "2 tabs"),
    ("IMGID:1\na\tO\nb\tB-DATE\n", 3, "unknown_tag", "B-DATE"),
    ("IMGID:1\na\tO\n\nIMGID:\nb\tO\n", 4, "empty_imgid", "empty IMGID"),
    ("a\tO\nb\tO\n\nIMGID:1\nc\tO\n", 1, "no_imgid", "before any IMGID"),
    ("IMGID:1\na\tO\n\nIMGID:2\nb\tO\n\nIMGID:1\nc\tO\n", 7, "duplicate_imgid", "first at line 1"),
    ("IMGID:1\na\tO\n\nIMGID:2\n\nIMGID:3\nc\tO\n", 4, "no_tokens", "no tokens"),
    ("IMGID:1\na\tO\n\tB-PER\n", 3, "empty_token", "empty token"),
    ("IMGID:1\na\tO\n\tO\n", 3, "empty_token", "empty token"),  # zero characters; "  " is a blank token
]


@pytest.mark.parametrize("text,line,reason,words", BAD)
def test_malformed_raises_with_file_and_line(tmp_path, text, line, reason, words):
    p = write(tmp_path, text, "valid.txt")
    with pytest.raises(ConllFormatError) as ei:
        read_conll(p)
    e = ei.value
    assert (e.line, e.reason) == (line, reason)
    assert str(e).startswith(f"{p}:{line}: ") and "valid.txt" in str(e)
    assert words in str(e)


def test_not_utf8_is_an_error_with_line(tmp_path):
    p = write(tmp_path, "", raw=b"IMGID:1\na\tO\n\xff\xfe\tO\n")
    with pytest.raises(ConllFormatError, match=r"train\.txt:3: line is not valid UTF-8"):
        read_conll(p)


def test_skip_mode_skips_whole_tweets_and_counts(tmp_path):
    text = (
        "stray\tO\n"             # 1: tokens before any IMGID -> orphan block skipped
        "\n"
        "IMGID:1\n"              # 3: good
        "a\tB-PER\n"
        "\n"
        "IMGID:2\n"              # 6: bad tag on line 8 -> whole tweet skipped
        "b\tO\n"
        "c\tB-XXX\n"
        "d\tO\n"
        "\n"
        "IMGID:3\n"              # 11: no tokens
        "\n"
        "IMGID:1\n"              # 13: duplicate
        "e\tO\n"
        "\n"
        "IMGID:4\n"              # 16: good
        "f\tI-ORG\n"
    )
    r = read_conll(write(tmp_path, text), on_bad_line="skip")
    assert [s.image_id for s in r.samples] == ["1", "4"]
    assert [(s["line"], s["reason"]) for s in r.skipped] == [
        (1, "no_imgid"), (8, "unknown_tag"), (11, "no_tokens"), (13, "duplicate_imgid")]
    assert r.skipped[1]["block_line"] == 6 and r.skipped[1]["image_id"] == "2"
    assert r.counts["skipped"] == 4
    assert r.counts["skipped_by_reason"] == {"duplicate_imgid": 1, "no_imgid": 1, "no_tokens": 1, "unknown_tag": 1}
    # nothing silently dropped: every tweet is either a sample or a skip
    assert len(r.samples) + len(r.skipped) == 6
    with pytest.raises(ValueError, match="on_bad_line"):
        read_conll(tmp_path / "train.txt", on_bad_line="ignore")


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_conll(tmp_path / "nope.txt")


def test_empty_file_gives_no_samples(tmp_path):
    r = read_conll(write(tmp_path, "\n\n"))
    assert r.samples == [] and r.counts["tweets"] == 0



# ---- blank tokens (all formats) ----------------------------------------------------------

@pytest.mark.parametrize("on_bad_line", ["raise", "skip"])
def test_twitter_lone_nbsp_token_is_kept(tmp_path, on_bad_line):
    # Twitter-2015 valid.txt holds a token that is a lone U+00A0: a token, not an empty one
    text = "IMGID:1\nRT\tO\n\u00a0\tO\nObama\tB-PER\n\nIMGID:2\nhi\tO\n"
    r = read_conll(write(tmp_path, text, "valid.txt"), on_bad_line=on_bad_line)
    assert r.skipped == []
    assert r.samples[0] == Sample("1", ["RT", "\u00a0", "Obama"], ["O", "O", "B-PER"], 1)
    assert r.counts["blank_tokens"] == 1 and r.counts["tokens"] == 4 and r.counts["tweets"] == 2


def test_blank_tokens_of_all_kinds_kept_unchanged(tmp_path):
    blanks = ["  ", "\u200b", "\u200c\u200d", "\u2060", "\u2002\u3000", "\u00a0\u200b"]
    text = "IMGID:1\n" + "".join(f"{b}\tO\n" for b in blanks) + "x\tO\n\ufeff\tB-LOC\n"  # BOM as the whole token
    r = read_conll(write(tmp_path, text))
    assert r.samples[0].tokens == blanks + ["x", "\ufeff"]
    assert r.samples[0].tags[-1] == "B-LOC"
    assert r.counts["blank_tokens"] == len(blanks) + 1
    assert not is_blank_token("") and not is_blank_token("a\u00a0") and not is_blank_token("watched\u200bwas")


def test_empty_file_counts_zero_blank_tokens(tmp_path):
    r = read_conll(write(tmp_path, "IMGID:1\na\tO\n"))
    assert r.counts["blank_tokens"] == 0 and r.counts["sentences"] == r.counts["tweets"] == 1


# ---- fmt="conll" -------------------------------------------------------------------------

# WNUT-17 style: TAB-only separator lines, -DOCSTART-, space-separated lines, blank tokens,
# data-defined types, an IMGID-looking token, no trailing newline.
CONLL = (
    "-DOCSTART- -X- -X- O\n"         # 1: skipped
    "\n"
    "@paulwalk\tO\n"                  # 3: sentence 1
    "It\tO\n"
    "'s\tO\n"
    "\t\n"                            # 6: a single TAB separates
    "The\tO\n"                        # 7: sentence 2
    "Empire\tB-creative-work\n"
    "Strikes\tI-creative-work\n"
    "\u00a0\tI-creative-work\n"       # U+00A0 token inside an entity
    "Back\tI-creative-work\n"
    "\t\n"
    "  \n"                            # several whitespace-only separators in a row
    "\n"
    "Apple B-corporation\n"           # 15: sentence 3, space separated
    "\u200b O\n"                      # U+200B token, space separated
    "New York\tB-location\n"          # a space inside a tab-separated token
    "IMGID:99 O\n"                    # no special meaning in conll
    "-DOCSTART-\tO\n"                 # 19: skipped, ends sentence 3
    "x.y I-my_type.v2\n"              # 20: sentence 4 (stray I-)
    "ok\tO"                           # no trailing newline
)


def test_conll_snippet(tmp_path):
    r = read_conll(write(tmp_path, CONLL, "train.conll"), fmt="conll")
    assert [s.line for s in r.samples] == [3, 7, 15, 20]
    assert all(s.image_id == "" for s in r.samples)
    assert r.samples[0].tokens == ["@paulwalk", "It", "'s"]
    assert r.samples[1] == Sample("", ["The", "Empire", "Strikes", "\u00a0", "Back"],
                                  ["O", "B-creative-work", "I-creative-work", "I-creative-work", "I-creative-work"], 7)
    assert r.samples[2].tokens == ["Apple", "\u200b", "New York", "IMGID:99"]
    assert r.samples[2].tags == ["B-corporation", "O", "B-location", "O"]
    assert r.samples[3].tokens == ["x.y", "ok"] and r.samples[3].tags == ["I-my_type.v2", "O"]
    assert r.counts["sentences"] == r.counts["tweets"] == 4
    assert r.counts["tokens"] == 3 + 5 + 4 + 2
    assert r.counts["blank_tokens"] == 2
    assert r.counts["stray_i"] == 1
    assert r.counts["tags"]["B-creative-work"] == 1 and r.counts["tags"]["I-creative-work"] == 3
    assert r.skipped == []


def test_conll_crlf_bom_and_trailing_newline_give_same_result(tmp_path):
    a = read_conll(write(tmp_path, CONLL, "a.conll"), fmt="conll")
    b = read_conll(write(tmp_path, "\ufeff" + CONLL.replace("\n", "\r\n") + "\r\n\r\n", "b.conll"), fmt="conll")
    assert a.samples == b.samples and a.counts == b.counts


def test_conll_ignores_other_tag_and_fixed_types(tmp_path):
    p = write(tmp_path, "a\tB-OTHER\nb\tI-MISC\nc\tB-PER\n", "t.conll")
    r = read_conll(p, fmt="conll", other_tag="MI SC")  # other_tag is neither checked nor applied
    assert r.samples[0].tags == ["B-OTHER", "I-MISC", "B-PER"]
    assert conll_tag("B-creative-work") == "B-creative-work"
    assert conll_tag("B-") is None and conll_tag("B-1x") is None and conll_tag("E-person") is None


BAD_CONLL = [
    ("a\tO\nb\tB-DATE!\n", 2, "unknown_tag", "B-DATE!"),
    ("a\tO\nb\tperson\n", 2, "unknown_tag", "'person'"),
    ("a O\nb B-\n", 2, "unknown_tag", "'B-'"),
    ("a\tO\n\nb\tO\tX\n", 3, "unknown_tag", "'X'"),   # more columns: the last one is the tag
    ("a\tO\nnoseparator\n", 2, "bad_line", "one field"),
    ("a\tO\n\tB-person\n", 2, "empty_token", "empty token"),
    ("a\tO\n O\n", 2, "bad_line", "one field"),
    ("a\tO\n\u00a0\n", 2, "bad_line", "one field"),     # U+00A0 alone is no separator: a token needs a tag
    ("IMGID:1\na\tO\n", 1, "bad_line", "one field"),
]


@pytest.mark.parametrize("text,line,reason,words", BAD_CONLL)
def test_conll_malformed_raises_with_file_and_line(tmp_path, text, line, reason, words):
    p = write(tmp_path, text, "dev.conll")
    with pytest.raises(ConllFormatError) as ei:
        read_conll(p, fmt="conll")
    e = ei.value
    assert (e.line, e.reason) == (line, reason)
    assert str(e).startswith(f"{p}:{line}: ") and words in str(e)


def test_conll_skip_mode_skips_whole_sentences(tmp_path):
    text = (
        "a\tB-person\n"          # 1: good
        "\t\n"
        "b\tO\n"                 # 3: bad tag on line 4 -> sentence skipped
        "c\tB-bad tag\n"
        "d\tO\n"
        "\n"
        "-DOCSTART- -X- O\n"
        "e\n"                    # 8: bad line
        "\n"
        "f g\tI-group\n"         # 10: good
    )
    r = read_conll(write(tmp_path, text, "t.conll"), fmt="conll", on_bad_line="skip")
    assert [(s.line, s.tokens) for s in r.samples] == [(1, ["a"]), (10, ["f g"])]
    assert [(s["line"], s["block_line"], s["reason"]) for s in r.skipped] == [(4, 3, "unknown_tag"), (8, 8, "bad_line")]
    assert r.counts["skipped"] == 2 and r.counts["sentences"] == 2
    assert r.counts["skipped_by_reason"] == {"bad_line": 1, "unknown_tag": 1}


# ---- the real WNUT-17 files (data/wnut17, see its README) -----------------------------------

WNUT = Path(__file__).resolve().parents[1] / "data" / "wnut17"
# sentences as in the README; B- tags counted in the files (README: 1980 for train, but the
# published train file holds 1975 lines tagged B-; dev and test match the README)
WNUT_EXPECTED = {"train.conll": (3394, 1975), "dev.conll": (1009, 836), "test.conll": (1287, 1079)}
WNUT_TYPES = {"person", "location", "group", "creative-work", "corporation", "product"}


def _plain_count(path: Path) -> tuple[int, int, set, int]:
    """Sentences, B- tags, types and token lines of a tab-separated file, counted naively."""
    sentences = b_tags = tokens = 0
    types, in_sentence = set(), False
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.strip() == "":
            in_sentence = False
            continue
        sentences += not in_sentence
        in_sentence = True
        tokens += 1
        tag = line.split("\t")[-1]
        if tag != "O":
            types.add(tag[2:])
        b_tags += tag.startswith("B-")
    return sentences, b_tags, types, tokens


@pytest.mark.parametrize("name", sorted(WNUT_EXPECTED))
def test_real_wnut17_files(name):
    path = WNUT / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    sentences, b_tags, types, tokens = _plain_count(path)
    assert (sentences, b_tags) == WNUT_EXPECTED[name]
    assert types == WNUT_TYPES
    r = read_conll(path, fmt="conll")
    assert r.skipped == []
    assert r.counts["sentences"] == r.counts["tweets"] == sentences
    assert r.counts["tokens"] == tokens
    assert sum(n for t, n in r.counts["tags"].items() if t.startswith("B-")) == b_tags
    assert {t[2:] for t in r.counts["tags"] if t != "O"} == WNUT_TYPES
    assert all(s.image_id == "" and len(s.tokens) == len(s.tags) > 0 for s in r.samples)


def test_real_wnut17_dev_zero_width_tokens_unchanged():
    path = WNUT / "dev.conll"
    if not path.exists():
        pytest.skip(f"{path} not present")
    tokens = {t for s in read_conll(path, fmt="conll").samples for t in s.tokens}
    assert "watched\u200bwas" in tokens and "Dubbz\ufeff" in tokens  # zero-width chars inside tokens stay


def test_conll_2003_columns_first_is_token_last_is_tag(tmp_path):
    text = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\n\n" \
           "Peter\tNNP\tB-NP\tB-PER\n"
    r = read_conll(write(tmp_path, text, "c.conll"), fmt="conll")
    assert [(s.tokens, s.tags) for s in r.samples] == [
        (["EU", "rejects", "German"], ["B-ORG", "O", "B-MISC"]), (["Peter"], ["B-PER"])]

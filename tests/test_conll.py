"""CoNLL reader (Twitter-2015/2017, NewsMKG) on real files written into tmp_path."""
import pytest

from pipeline.data.conll import ConllFormatError, Sample, normalise_tag, read_conll

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
    ("IMGID:1\na\tO\n  \tO\n", 3, "empty_token", "empty token"),
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

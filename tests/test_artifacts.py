"""Atomic writes and fingerprints."""
import json

import pytest

from pipeline.artifacts import atomic_path, fingerprint, weights_id, write_json


def test_atomic_file_write_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out.json"
    write_json(final, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(final.read_text()) == {"a": 1}       # old content intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp left


def test_atomic_directory_replace(tmp_path):
    final = tmp_path / "d"
    for content in ("one", "two"):
        with atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "f.txt").write_text(content)
    assert (final / "f.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_fingerprint_is_order_insensitive_for_keys_only():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint([1, 2]) != fingerprint([2, 1])
    assert fingerprint({"a": 1}) != fingerprint({"a": 1.5})


def test_weights_id(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    # sha256("abc") worked out independently
    assert weights_id(str(f)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert weights_id("random-init") == "random-init"

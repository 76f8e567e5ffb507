"""A split read every epoch comes from a flat copy of the text cache (pipeline.stores.flat):
the same values and batches, only the row groups that hold it decoded, and the copy removed."""
from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.mner.data import Caches, make_collate, type_prompt_tensor
from pipeline.stores.flat import FlatText
from pipeline.stores.tables import TableError, TextFeatures, write_text_features
from tests.corrupt import overwrite_parquet_column
from tests.test_bounded_cache import _batches, _dataset
from tests.test_mner_model import TYPES, synth, tag_index

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def _cache(tmp_path, n=90, dtype="float32"):
    """Samples of three splits (contiguous, as prepare writes them) and a real text cache with
    sub-word states, in small row groups."""
    samples, mem, patches, regions = synth(n, 0)
    rng = np.random.default_rng(5)
    rows = []
    for s in samples:
        f = mem.get(s.sample_id)
        first = np.sort(rng.choice(np.arange(len(f) + 3), size=len(f), replace=False)).astype(np.int32)
        rows.append({"sample_id": s.sample_id, "n_words": len(s.tokens), "feats": f,
                     "states": rng.normal(size=(len(f) + 3, f.shape[2])).astype(np.float32), "first": first})
    write_text_features(tmp_path / "text", rows, mem.type_prompts, {"test": "flat"}, row_group_bytes=2048,
                        dtype=dtype)
    split = ["train"] * (n // 2) + ["valid"] * (n // 4) + ["test"] * (n - n // 2 - n // 4)
    pq.write_table(pa.table({"sample_id": [s.sample_id for s in samples], "image_id": [s.image_id for s in samples],
                             "split": split, "tokens": [s.tokens for s in samples], "tags": [s.tags for s in samples]}),
                   tmp_path / "samples.parquet")
    return samples, split, TextFeatures(tmp_path / "text", cache_bytes=4096), patches, regions


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_flat_copy_returns_what_the_cache_returns(tmp_path, dtype):
    samples, split, text, _, _ = _cache(tmp_path, dtype=dtype)
    ids = [s.sample_id for s, sp in zip(samples, split) if sp == "valid"]
    flat = FlatText(text, ids, states=True)
    for sid in ids:
        got, want = flat.get(sid), text.get(sid)
        assert got.dtype == want.dtype == np.float32 and np.array_equal(got, want) and got.flags.writeable
        for a, b in zip(flat.states(sid), text.states(sid)):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    # float values kept in the stored precision (float16: half), plus the int32 first positions
    width = 2 if dtype == "float16" else 4
    assert flat.nbytes == text.nbytes(ids, states=True) * width // 4 + 4 * sum(len(text.states(s)[1]) for s in ids)
    assert flat.type_prompts is text.type_prompts and flat.n_words(ids[0]) == text.n_words(ids[0])
    with pytest.raises(KeyError, match="not in this flat copy"):
        flat.get(samples[0].sample_id)  # a train sample: not copied
    d = flat._words.dir
    assert d.is_dir()
    flat.close()
    assert not d.exists()


def test_only_the_row_groups_of_the_split_are_read_and_checked(tmp_path):
    samples, split, text, _, _ = _cache(tmp_path)
    ids = [s.sample_id for s, sp in zip(samples, split) if sp == "train"]
    groups = text.table.groups_of(np.array([text.table.row(s) for s in ids]))
    outside = next(g for g in range(text.table.num_row_groups) if g > groups.max())
    overwrite_parquet_column(tmp_path / "text" / "words.parquet", "feats", row_group=outside)
    damaged = TextFeatures(tmp_path / "text")
    flat = FlatText(damaged, ids)  # the damage lies outside the split: never read
    assert all(np.array_equal(flat.get(s), text.get(s)) for s in ids)
    overwrite_parquet_column(tmp_path / "text" / "words.parquet", "feats", row_group=int(groups[1]))
    with pytest.raises(TableError, match=rf"column 'feats', row group {int(groups[1])}: content does not match"):
        FlatText(TextFeatures(tmp_path / "text"), ids)


def test_a_split_over_the_budget_reads_a_flat_copy_with_the_same_batches(tmp_path):
    samples, split, text, patches, regions = _cache(tmp_path)
    caches = Caches("ds", text, patches, regions, tmp_path / "samples.parquet", {})
    need = text.nbytes([s.sample_id for s, sp in zip(samples, split) if sp == "train"], states=True)
    over = caches.dataset_for("train", tag_index(), chars=True, states=True, cache_bytes=need // 4)
    within = caches.dataset_for("train", tag_index(), chars=True, states=True, cache_bytes=need)
    once = caches.dataset_for("train", tag_index(), chars=True, states=True, cache=False, cache_bytes=1)
    assert isinstance(over.text, FlatText) and within.text is text and once.text is text
    collate_fn = make_collate(type_prompt_tensor(text.type_prompts, TYPES))
    want, got = _batches(within, collate_fn), _batches(over, collate_fn)
    assert len(got) == len(want)
    for a, b in zip(want, got):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    d = over.text._words.dir
    del over, got
    gc.collect()
    assert not d.exists()  # the copy goes with the dataset


def test_bounded_dataset_on_a_flat_copy_matches_the_in_memory_features(tmp_path):
    samples, mem, patches, regions = synth(40, 3)
    rows = ({"sample_id": s.sample_id, "n_words": len(s.tokens), "feats": mem.get(s.sample_id)} for s in samples)
    write_text_features(tmp_path / "text", rows, mem.type_prompts, {"test": "flat"}, row_group_bytes=2048)
    flat = FlatText(TextFeatures(tmp_path / "text"), [s.sample_id for s in samples])
    collate_fn = make_collate(type_prompt_tensor(mem.type_prompts, TYPES))
    a = _batches(_dataset((samples, mem, patches, regions), cache_bytes=1 << 40), collate_fn)
    b = _batches(_dataset((samples, flat, patches, regions), cache_bytes=2048), collate_fn)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def test_copies_left_by_killed_processes_are_removed(tmp_path):
    samples, split, text, _, _ = _cache(tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / "scratch" / f"pipeline-flat-{int(gone.stdout)}-abc"  # its process has exited
    mine = tmp_path / "scratch" / f"pipeline-flat-{os.getpid()}-def"     # a live process's copy
    for d in (dead, mine):
        d.mkdir(parents=True)
        (d / "feats.bin").write_bytes(b"x" * 10)
    flat = FlatText(text, [samples[0].sample_id], scratch=tmp_path / "scratch")
    assert not dead.exists() and mine.exists() and flat._words.dir.name.startswith(f"pipeline-flat-{os.getpid()}-")


NO_ROOM = """
import resource, signal, sys
from pipeline.cli import run_stage
from pipeline.stores.flat import FlatText
from pipeline.stores.tables import TextFeatures

def main(argv):
    text = TextFeatures(sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    FlatText(text, text.sample_ids, scratch=sys.argv[3])

raise SystemExit(run_stage("train", main, ["ds"]))
"""


def test_no_room_for_the_copy_is_one_clear_line_and_leaves_nothing(tmp_path):
    _cache(tmp_path)
    (tmp_path / "scratch").mkdir()
    p = subprocess.run([sys.executable, "-c", NO_ROOM, "ds", str(tmp_path / "text"), str(tmp_path / "scratch")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 2, p.stderr
    assert re.fullmatch(rf"train@ds: {tmp_path}/scratch/pipeline-flat-\d+-\w+: cannot write the flat copy of "
                        rf"{tmp_path}/text/words.parquet \(\d+ MiB\): File too large; free space there or set "
                        rf"TMPDIR to a disk with room\n", p.stderr), p.stderr
    assert list((tmp_path / "scratch").iterdir()) == []

"""HDF5 shards: exact round-trips, byte determinism, resume, invalidation, partitioning, reader."""
import hashlib
import json
import os
import pickle
import time

import h5py
import numpy as np
import pytest
import torch

from pipeline.stores.shards import (
    ShardError,
    ShardReader,
    parse_shard_arg,
    plan_shards,
    resolve_shard_arg,
    run_shards,
    select_shards,
    shard_fingerprint,
    shard_is_done,
    shard_path,
    write_shard,
)

torch.set_num_threads(1)

IDS = [f"img-{i:03d}" for i in range(10)] + ["ünï-çødé", "x/y"]  # 12 ids -> shards of 5: 5, 5, 2
PROV = {"model": "tiny", "weights": "random-init", "params": {"size": 5}}


def item_arrays(i: str) -> dict[str, np.ndarray]:
    """Deterministic per-id arrays (independent of which shard the id lands in)."""
    seed = int(hashlib.sha256(i.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    return {
        "pooled": rng.standard_normal(4).astype(np.float32),
        "tokens": rng.standard_normal((3, 2)).astype(np.float32),
        "labels": rng.integers(0, 90, size=3).astype(np.int64),
        "is_fallback": np.bool_(seed % 2),
    }


class Counter:
    """compute() that records its calls and can 'die' after a number of shards."""

    def __init__(self, die_after: int | None = None):
        self.calls: list[list[str]] = []
        self.die_after = die_after

    def __call__(self, ids):
        if self.die_after is not None and len(self.calls) >= self.die_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls.append(list(ids))
        rows = [item_arrays(i) for i in ids]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dir_hashes(d):
    return {p.name: sha(p) for p in sorted(d.iterdir())}


# ---- planning ---------------------------------------------------------------------------

def test_plan_shards_keeps_order_in_consecutive_chunks():
    assert plan_shards(["a", "b", "c", "d", "e"], 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert plan_shards([], 3) == []
    assert plan_shards(["a"], 8) == [["a"]]
    with pytest.raises(ValueError, match="positive"):
        plan_shards(["a"], 0)


@pytest.mark.parametrize("n_shards", [0, 1, 5, 7, 12])
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_select_shards_partitions_every_shard_exactly_once(n_shards, count):
    seen = [k for i in range(count) for k in select_shards(n_shards, i, count)]
    assert sorted(seen) == list(range(n_shards))
    assert select_shards(n_shards, 0, count) == list(range(0, n_shards, count))


def test_parse_shard_arg_and_errors(monkeypatch):
    assert parse_shard_arg("2/4") == (2, 4)
    assert parse_shard_arg(" 0 / 1 ") == (0, 1)
    for bad, msg in [("4/4", "0..3"), ("1", "INDEX/COUNT"), ("a/b", "INDEX/COUNT"), ("0/0", ">= 1"), ("-1/2", "0..1")]:
        with pytest.raises(ValueError, match=msg):
            parse_shard_arg(bad)
    with pytest.raises(ValueError):
        select_shards(5, 3, 3)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_shard_arg(None) == (0, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert resolve_shard_arg(None) == (3, 4)
    assert resolve_shard_arg("1/2") == (1, 2)


def test_shard_path_name(tmp_path):
    assert shard_path(tmp_path, 0) == tmp_path / "shard-00000.h5"
    assert shard_path(tmp_path, 123).name == "shard-00123.h5"


# ---- writing and reading -----------------------------------------------------------------

def test_write_then_read_back_exactly(tmp_path):
    stats = run_shards(IDS, 5, tmp_path, "fp1", PROV, Counter())
    assert stats["shards_total"] == 3 and stats["shards_written"] == 3 and stats["items"] == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    with ShardReader(tmp_path) as r:
        assert r.ids == IDS and len(r) == 12
        assert "ünï-çødé" in r and "nope" not in r
        assert r.provenance == PROV
        assert r.fingerprint == "fp1"
        for i in IDS:
            got, want = r.get(i), item_arrays(i)
            assert set(got) == set(want)
            for k in want:
                assert got[k].dtype == want[k].dtype and got[k].shape == np.shape(want[k])
                np.testing.assert_array_equal(got[k], want[k])
        np.testing.assert_array_equal(r.read_all("tokens"), np.stack([item_arrays(i)["tokens"] for i in IDS]))
        np.testing.assert_array_equal(r[3]["pooled"], item_arrays(IDS[3])["pooled"])
        with pytest.raises(KeyError, match="nope"):
            r.get("nope")
        with pytest.raises(KeyError, match="no dataset"):
            r.read_all("feats")
    with h5py.File(tmp_path / "shard-00001.h5", "r") as f:
        assert f["tokens"].chunks == (1, 3, 2)  # one item = one chunk
        assert f["pooled"].chunks == (1, 4)
        assert h5py.check_string_dtype(f["ids"].dtype).encoding == "utf-8"
        assert json.loads(f.attrs["provenance"]) == PROV
        assert f.attrs["count"] == 5 and bool(f.attrs["complete"])
        assert f.attrs["fingerprint"] == shard_fingerprint("fp1", IDS[5:10])


def test_write_shard_bytes_are_deterministic(tmp_path):
    rows = Counter()(IDS[:4])
    for comp in (None, "lzf", "gzip"):
        a, b = tmp_path / f"a-{comp}.h5", tmp_path / f"b-{comp}.h5"
        write_shard(a, IDS[:4], rows, PROV, "fp", compression=comp)
        time.sleep(1.05)  # HDF5 timestamps have 1 s resolution: they would show up here
        write_shard(b, IDS[:4], rows, dict(reversed(list(PROV.items()))), "fp", compression=comp)
        assert sha(a) == sha(b)
    with ShardReader(tmp_path / "a-gzip.h5") as r:
        np.testing.assert_array_equal(r.get(IDS[2])["tokens"], rows["tokens"][2])


def test_write_shard_rejects_bad_input(tmp_path):
    ok = {"x": np.zeros((2, 3), np.float32)}
    with pytest.raises(ValueError, match="first dim"):
        write_shard(tmp_path / "s.h5", ["a", "b", "c"], ok, PROV, "fp")
    with pytest.raises(ValueError, match="duplicate"):
        write_shard(tmp_path / "s.h5", ["a", "a"], ok, PROV, "fp")
    with pytest.raises(ValueError, match="reserved"):
        write_shard(tmp_path / "s.h5", ["a", "b"], {"ids": np.zeros(2)}, PROV, "fp")
    assert not (tmp_path / "s.h5").exists() and list(tmp_path.iterdir()) == []


# ---- resume and invalidation ----------------------------------------------------------------

def test_resume_after_kill_computes_only_the_rest_and_matches_uninterrupted(tmp_path):
    ids = [f"i{k:02d}" for k in range(23)]  # 5 shards of 5 (last has 3)
    ref = tmp_path / "ref"
    run_shards(ids, 5, ref, "fp", PROV, Counter())

    out = tmp_path / "out"
    dying = Counter(die_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_shards(ids, 5, out, "fp", PROV, dying)
    assert [len(c) for c in dying.calls] == [5, 5]
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000.h5", "shard-00001.h5"]

    again = Counter()
    stats = run_shards(ids, 5, out, "fp", PROV, again)
    assert again.calls == [ids[10:15], ids[15:20], ids[20:]]
    assert stats["shards_skipped"] == 2 and stats["shards_written"] == 3 and stats["items"] == 13
    assert dir_hashes(out) == dir_hashes(ref)

    third = Counter()
    assert run_shards(ids, 5, out, "fp", PROV, third)["shards_written"] == 0 and third.calls == []


def test_temp_leftover_and_truncated_or_foreign_shards_are_not_done(tmp_path):
    ids = [f"i{k:02d}" for k in range(15)]
    run_shards(ids, 5, tmp_path, "fp", PROV, Counter())
    ref = dir_hashes(tmp_path)
    fps = [shard_fingerprint("fp", c) for c in plan_shards(ids, 5)]
    assert all(shard_is_done(shard_path(tmp_path, k), fps[k]) for k in range(3))

    # a killed writer left a half-written temp for shard 1, never renamed into place
    tmp = tmp_path / ".shard-00001.h5.99999.tmp"
    data = shard_path(tmp_path, 1).read_bytes()
    tmp.write_bytes(data[: len(data) // 2])
    shard_path(tmp_path, 1).unlink()
    # shard 2 truncated to half its bytes
    data = shard_path(tmp_path, 2).read_bytes()
    shard_path(tmp_path, 2).write_bytes(data[: len(data) // 2])
    assert not shard_is_done(shard_path(tmp_path, 1), fps[1])
    assert not shard_is_done(shard_path(tmp_path, 2), fps[2])
    assert not shard_is_done(tmp, fps[1])
    # not HDF5 at all, and a shard missing its 'complete' mark: not done, no exception
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    assert not shard_is_done(tmp_path / "junk.h5", fps[0])
    with h5py.File(tmp_path / "nocomplete.h5", "w") as f:
        f.create_dataset("ids", data=np.array(ids[:5], dtype=object), dtype=h5py.string_dtype())
        f.attrs["fingerprint"] = fps[0]
        f.attrs["count"] = 5
    assert not shard_is_done(tmp_path / "nocomplete.h5", fps[0])
    (tmp_path / "junk.h5").unlink()
    (tmp_path / "nocomplete.h5").unlink()

    c = Counter()
    stats = run_shards(ids, 5, tmp_path, "fp", PROV, c)
    assert c.calls == [ids[5:10], ids[10:15]] and stats["shards_skipped"] == 1
    assert not tmp.exists()  # leftover temp removed (single worker)
    assert dir_hashes(tmp_path) == ref


def test_fingerprint_change_rewrites_all_shards(tmp_path):
    ids = [f"i{k:02d}" for k in range(12)]
    run_shards(ids, 5, tmp_path, "fp-a", PROV, Counter())
    c = Counter()
    stats = run_shards(ids, 5, tmp_path, "fp-b", {**PROV, "model": "other"}, c)
    assert len(c.calls) == 3 and stats["shards_written"] == 3
    with ShardReader(tmp_path) as r:
        assert r.fingerprint == "fp-b" and r.provenance["model"] == "other"


def test_changing_one_id_rewrites_only_its_shard_and_shrinking_deletes_stale(tmp_path):
    ids = [f"i{k:02d}" for k in range(15)]
    run_shards(ids, 5, tmp_path, "fp", PROV, Counter())
    before = dir_hashes(tmp_path)
    ids2 = list(ids)
    ids2[7] = "renamed"
    c = Counter()
    run_shards(ids2, 5, tmp_path, "fp", PROV, c)
    assert c.calls == [ids2[5:10]]
    after = dir_hashes(tmp_path)
    assert after["shard-00000.h5"] == before["shard-00000.h5"] and after["shard-00002.h5"] == before["shard-00002.h5"]
    assert after["shard-00001.h5"] != before["shard-00001.h5"]

    # an item key (e.g. the image file's hash) changes -> only that shard is redone
    keys = {i: "h0" for i in ids2}
    run_shards(ids2, 5, tmp_path, "fp", PROV, Counter(), item_keys=keys)
    keys["i12"] = "h1"
    c = Counter()
    run_shards(ids2, 5, tmp_path, "fp", PROV, c, item_keys=keys)
    assert c.calls == [ids2[10:15]]

    c = Counter()
    stats = run_shards(ids2[:7], 5, tmp_path, "fp", PROV, c, item_keys=keys)
    assert stats["shards_deleted"] == 1 and c.calls == [ids2[5:7]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.h5", "shard-00001.h5"]
    assert ShardReader(tmp_path).ids == ids2[:7]


def test_shard_workers_together_equal_one_worker(tmp_path):
    ids = [f"i{k:02d}" for k in range(27)]
    run_shards(ids, 4, tmp_path / "one", "fp", PROV, Counter())
    calls = []
    for i in range(3):
        c = Counter()
        stats = run_shards(ids, 4, tmp_path / "three", "fp", PROV, c, shard_index=i, shard_count=3)
        calls += [tuple(x) for x in c.calls]
        assert stats["shards_selected"] == len(range(i, 7, 3))
    assert sorted(calls) == sorted(tuple(x) for x in plan_shards(ids, 4))  # each shard once
    assert dir_hashes(tmp_path / "three") == dir_hashes(tmp_path / "one")


# ---- reader ------------------------------------------------------------------------------

def test_reader_errors_name_the_dir_and_stage(tmp_path):
    missing = tmp_path / "features" / "demo" / "patches"
    with pytest.raises(ShardError, match=r"patches.*not found.*patches@demo"):
        ShardReader(missing)
    missing.mkdir(parents=True)
    with pytest.raises(ShardError, match=r"no shard-\*\.h5 files.*dvc repro patches@demo"):
        ShardReader(missing)


def test_reader_refuses_mixed_runs_and_duplicate_ids(tmp_path):
    rows = Counter()(["a", "b"])
    write_shard(shard_path(tmp_path, 0), ["a", "b"], rows, PROV, "s0", run_fingerprint="run1")
    write_shard(shard_path(tmp_path, 1), ["c", "d"], rows, PROV, "s1", run_fingerprint="run2")
    with pytest.raises(ShardError, match="different runs"):
        ShardReader(tmp_path)
    write_shard(shard_path(tmp_path, 1), ["b", "d"], rows, PROV, "s1", run_fingerprint="run1")
    with pytest.raises(ShardError, match="'b' also in shard-00000.h5"):
        ShardReader(tmp_path)


def test_reader_get_opens_only_the_needed_shard(tmp_path):
    run_shards(IDS, 5, tmp_path, "fp", PROV, Counter())
    r = ShardReader(tmp_path, max_open=2)
    assert r._handles == {}  # nothing opened until the first get
    r.get(IDS[11])
    assert list(r._handles) == [2]
    assert r.locate(IDS[11]) == (shard_path(tmp_path, 2), 1)
    for i in IDS[::-1] + IDS:  # crossing shards with at most 2 files open
        np.testing.assert_array_equal(r.get(i)["pooled"], item_arrays(i)["pooled"])
        assert len(r._handles) <= 2
    r.close()


class Items(torch.utils.data.Dataset):
    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, k):
        item = self.reader.get(self.reader.ids[k])
        own_handles = self.reader._pid == os.getpid()  # this worker reopened its own h5 handles
        return self.reader.ids[k], torch.from_numpy(item["tokens"]), torch.utils.data.get_worker_info().id, own_handles


def test_reader_pickles_and_works_in_a_two_worker_dataloader(tmp_path):
    run_shards(IDS, 5, tmp_path, "fp", PROV, Counter())
    reader = ShardReader(tmp_path)
    reader.get(IDS[0])  # parent holds an open handle before the workers fork
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._handles == {} and clone.ids == IDS
    np.testing.assert_array_equal(clone.get(IDS[6])["labels"], item_arrays(IDS[6])["labels"])

    loader = torch.utils.data.DataLoader(Items(reader), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    got = {}
    workers = set()
    for i, tokens, worker, own_handles in loader:
        got[i] = tokens.numpy()
        workers.add(worker)
        assert own_handles
    assert workers == {0, 1}
    assert list(got) == IDS
    for i in IDS:
        np.testing.assert_array_equal(got[i], item_arrays(i)["tokens"])
    np.testing.assert_array_equal(reader.get(IDS[1])["tokens"], item_arrays(IDS[1])["tokens"])  # parent still fine
    reader.close()

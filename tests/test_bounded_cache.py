"""MNERDataset's item cache is bounded by a byte budget and changes nothing in the batches."""
from __future__ import annotations

import torch

from pipeline.mner.data import MNERDataset, item_nbytes, make_collate, type_prompt_tensor
from pipeline.mner.train import TrainConfig, _loader, fit
from pipeline.stores.tables import TextFeatures, write_text_features
from tests.test_mner_model import TYPES, synth, tag_index, tiny_cfg

torch.set_num_threads(1)


def _on_files(tmp_path, n=120):
    """The synthetic task's samples and image readers, its text features in a real cache with
    small row groups and a small row-group LRU (shuffled reads miss it)."""
    samples, mem, patches, regions = synth(n, 0)
    rows = ({"sample_id": s.sample_id, "n_words": len(s.tokens), "feats": mem.get(s.sample_id)} for s in samples)
    write_text_features(tmp_path / "text", rows, mem.type_prompts, {"test": "bounded_cache"}, row_group_bytes=2048)
    text = TextFeatures(tmp_path / "text", cache_bytes=8192)
    assert text.table.num_row_groups > 4
    return samples, text, patches, regions


def _dataset(parts, **kw):
    samples, text, patches, regions = parts
    return MNERDataset(samples, text, tag_index(), patches=patches, regions=regions, chars=True, **kw)


def _batches(ds, collate_fn, epochs=2):
    """What training sees (shuffled, ``epochs`` times from one loader) and then what predict sees."""
    loader = _loader(ds, 16, collate_fn, True, seed=7)
    out = [b for _ in range(epochs) for b in loader]
    return out + list(_loader(ds, 64, collate_fn, False))


def test_bounded_cache_gives_the_same_batches_and_stays_within_its_budget(tmp_path):
    parts = _on_files(tmp_path)
    collate_fn = make_collate(type_prompt_tensor(parts[1].type_prompts, TYPES))
    full = _dataset(parts, cache_bytes=1 << 40)
    one = item_nbytes(full[0])
    budget = 10 * one  # a handful of items out of 120
    bounded = _dataset(parts, cache_bytes=budget)
    uncached = _dataset(parts, cache=False)
    want = _batches(full, collate_fn)
    for ds in (bounded, uncached):
        got = _batches(ds, collate_fn)
        assert len(got) == len(want)
        for a, b in zip(want, got):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # the unbounded cache holds every item; the bounded one never more than its budget
    assert len(full._items) == len(full) and full.cached_bytes == sum(item_nbytes(it) for it in full._items.values())
    assert 0 < len(bounded._items) < len(bounded)
    held = sum(item_nbytes(it) for it in bounded._items.values())
    assert held == bounded.cached_bytes <= budget
    assert uncached._items == {} and uncached.cached_bytes == 0
    # the items the bounded cache holds are the first ones read, and it stayed full, not churned
    assert held > budget - 2 * max(item_nbytes(full[i]) for i in range(len(full)))
    assert bounded.kept_words() == full.kept_words()
    assert bounded.n_image_fallbacks == full.n_image_fallbacks


def test_training_with_a_bounded_cache_is_the_same_run(tmp_path):
    parts = _on_files(tmp_path, n=96)
    valid = synth(32, 1, "v")
    collate_fn = make_collate(type_prompt_tensor(parts[1].type_prompts, TYPES))
    cfg = TrainConfig(epochs=2, batch_size=16, lr=3e-3, lr_crf=3e-2, align_weight=0.1)
    results = []
    for kw in ({"cache_bytes": 1 << 40}, {"cache_bytes": 4096}):
        train_ds = _dataset(parts, **kw)
        valid_ds = MNERDataset(valid[0], valid[1], tag_index(), patches=valid[2], regions=valid[3], chars=True, **kw)
        res = fit(tiny_cfg(char_dim=8, shape_dim=4), cfg, train_ds, valid_ds, collate_fn, progress=False)
        results.append(res)
        assert train_ds.cached_bytes <= kw["cache_bytes"] and valid_ds.cached_bytes <= kw["cache_bytes"]
    a, b = results
    assert a.history == b.history
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_split_samples_are_the_list_of_samples_held_as_arrow(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.mner.data import Sample, SampleTable, samples_from_table, split_samples

    rows = [Sample(f"s{i}", f"img{i % 3}", [f"w{i}", "x"][: 1 + i % 2], ["B-PER", "O"][: 1 + i % 2]) for i in range(20000)]
    split = ["train" if i % 4 else "test" for i in range(len(rows))]
    table = pa.table({"sample_id": [s.sample_id for s in rows], "image_id": [s.image_id for s in rows], "split": split,
                      "tokens": [s.tokens for s in rows], "tags": [s.tags for s in rows]})
    pq.write_table(table, tmp_path / "samples.parquet", row_group_size=3000)
    for name in ("train", "test"):
        want = [s for s, sp in zip(rows, split) if sp == name]
        got = split_samples(tmp_path / "samples.parquet", name)
        assert isinstance(got, SampleTable) and len(got) == len(want)
        assert list(got) == want == samples_from_table(table, name)
        assert got[-1] == want[-1] and got[3:6] == want[3:6]
    empty = split_samples(tmp_path / "samples.parquet", "valid")
    assert len(empty) == 0 and list(empty) == []
    ds = MNERDataset(split_samples(tmp_path / "samples.parquet", "test"), None, tag_index())
    assert isinstance(ds.samples, SampleTable) and len(ds) == 5000

"""Benchmark: what verifying cache contents costs per GB (prints figures; not a test).

    python -m bench.verify [--gb 1.0] [--shard-size 64] [--tokens 49] [--width 768]

Writes about ``--gb`` GB of patches-like HDF5 shards through the real write path
(``run_shards``: float32 patch tokens (N, tokens, width) + pooled (N, 512) + a bool flag;
the defaults are ViT-B-32's 49 x 768, 150 KB per image) in a temp dir, then times:

(a) write: ``run_shards`` (sha256 per dataset + Fletcher-32 chunk checksums included);
(b) verify: ``plan_work`` on the finished dir, i.e. the skip decision of a rerun that finds
    every shard done (reads every dataset and checks every digest);
(c) read only: every dataset read whole with h5py, no hashing (Fletcher-32 still checked);
(d) the same data in shards written without Fletcher-32, read whole (its share of (c));
(e) sha256 alone over the same bytes in memory;
(f) ``stages.inspect --check`` on the dir (digests and the NaN/inf scan in one pass);
(g) a Parquet feature table of ``--gb / 4`` GB: every row group of its array column read
    through ``FeatureTable`` with and without checking the row-group digests, and
    ``table_digests`` alone.

Reads are timed ``--repeat`` times and the best is kept (the development machine is shared).

Files are read right after being written, so from the page cache: the figures are the CPU
cost of verification; a cold read adds the disk's time, as it does to any read.
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np


def gb(n_bytes: int) -> float:
    return n_bytes / 1e9


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls (the machine may be shared) and the last result."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def data_bytes(d: Path) -> int:
    """Bytes of the stored arrays (not the file overhead)."""
    total = 0
    for p in sorted(d.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            total += sum(ds.size * ds.dtype.itemsize for k, ds in f.items() if k != "ids")
    return total


def read_all(d: Path) -> int:
    n = 0
    for p in sorted(d.glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            for k, ds in f.items():
                if k != "ids":
                    n += ds[()].nbytes
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="shard data to write (GB, 1e9 bytes)")
    ap.add_argument("--shard-size", type=int, default=64, help="images per shard (params.yaml shards.size)")
    ap.add_argument("--tokens", type=int, default=49, help="patch tokens per image")
    ap.add_argument("--width", type=int, default=768, help="patch token width")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir, removed after)")
    ap.add_argument("--repeat", type=int, default=3, help="reads timed this many times, best kept")
    args = ap.parse_args()

    from pipeline.stores.inspect import check
    from pipeline.stores.shards import plan_work, run_shards
    import pyarrow.parquet as pq

    from pipeline.stores.tables import FeatureTable, table_digests, write_feature_table

    per_image = 4 * (args.tokens * args.width + 512) + 1
    n = max(args.shard_size, int(args.gb * 1e9 / per_image))
    ids = [f"{i:08d}" for i in range(n)]
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((args.shard_size, args.tokens, args.width)).astype(np.float32)
    pooled = rng.standard_normal((args.shard_size, 512)).astype(np.float32)

    def compute(chunk: list[str]) -> dict[str, np.ndarray]:
        k = len(chunk)
        return {"patch_tokens": tokens[:k], "pooled": pooled[:k], "is_fallback": np.zeros(k, bool)}

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp) / "patches"
        t_write, _ = timed(lambda: run_shards(ids, args.shard_size, d, "bench", {"bench": True}, compute))
        size = data_bytes(d)
        g = gb(size)
        print(f"{n} images in {len(list(d.glob('shard-*.h5')))} shards: {g:.3f} GB of arrays "
              f"({gb(sum(p.stat().st_size for p in d.iterdir())):.3f} GB of files)")
        r = args.repeat
        t_verify, work = timed(lambda: plan_work(ids, args.shard_size, d, "bench"), r)
        assert not work.todo, "every shard should verify"
        t_read, _ = timed(lambda: read_all(d), r)
        plain = Path(tmp) / "plain"  # the same arrays without Fletcher-32 (contiguous, like the old 1-D arrays)
        plain.mkdir()
        for p in sorted(d.glob("shard-*.h5")):
            with h5py.File(p, "r") as f, h5py.File(plain / p.name, "w") as o:
                for k, ds in f.items():
                    if k != "ids":
                        o.create_dataset(k, data=ds[()], chunks=ds.chunks)
        t_plain, _ = timed(lambda: read_all(plain), r)
        buf = np.concatenate([tokens.reshape(-1), pooled.reshape(-1)]).view(np.uint8)
        reps = max(1, int(size / buf.nbytes))
        t_sha, _ = timed(lambda: [hashlib.sha256(buf).digest() for _ in range(reps)], r)
        t_sha *= size / (reps * buf.nbytes)
        t_check, problems = timed(lambda: check(d), r)
        assert problems == [], problems

        rows = max(1, int(args.gb / 4 * 1e9 / (4 * args.tokens * args.width)))
        table_path = Path(tmp) / "t.parquet"
        write_feature_table(table_path, {"id": [str(i) for i in range(rows)]},
                            {"feats": rng.standard_normal((rows, args.tokens, args.width), dtype=np.float32)},
                            {"bench": True})
        g_tab = gb(FeatureTable(table_path, verify=False).values("feats").nbytes)
        t_tab_off = t_tab_on = float("inf")
        for _ in range(r):  # alternated, so both see the same machine
            # the whole column, row group by row group (a table opens lazily: ids only)
            t_tab_off = min(t_tab_off, timed(lambda: FeatureTable(table_path, key="id", verify=False).values("feats"))[0])
            t_tab_on = min(t_tab_on, timed(lambda: FeatureTable(table_path, key="id").values("feats"))[0])
        t_tab_digest, _ = timed(lambda: table_digests(pq.read_table(table_path)), r)
        t_tab_read, _ = timed(lambda: pq.read_table(table_path), r)

    def line(what: str, seconds: float, per: float = g) -> None:
        print(f"  {what:<58} {seconds:7.2f} s   {seconds / per:6.2f} s/GB   {per / seconds:6.2f} GB/s")

    print("HDF5 shards:")
    line("(a) write (run_shards, digests + Fletcher-32)", t_write)
    line("(b) verify every shard (plan_work: the skip decision)", t_verify)
    line("(c) read every dataset, no hashing (Fletcher-32 checked)", t_read)
    line("(d) read the same without Fletcher-32", t_plain)
    line("(e) sha256 alone, in memory", t_sha)
    line("(f) inspect --check (digests + NaN/inf scan)", t_check)
    print(f"  digest cost = (b) - (c): {(t_verify - t_read) / g:.2f} s/GB; "
          f"Fletcher-32 cost = (c) - (d): {(t_read - t_plain) / g:.2f} s/GB")
    print(f"Parquet feature table ({g_tab:.3f} GB of float32 values):")
    line("FeatureTable row groups, digests not checked", t_tab_off, g_tab)
    line("FeatureTable row groups, digests checked (the default)", t_tab_on, g_tab)
    line("table_digests alone (after pq.read_table)", t_tab_digest - t_tab_read, g_tab)
    print(f"  digest cost on the load: {(t_tab_on - t_tab_off) / g_tab:.2f} s/GB, "
          f"{100 * (t_tab_on - t_tab_off) / t_tab_off:+.0f} %")


if __name__ == "__main__":
    main()

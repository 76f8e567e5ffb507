"""Distributed extraction for real: `torchrun` workers (CPU, no process group), a worker that
dies halfway, and DVC recording the result, in a throwaway git copy of the project.

One flow, to pay torch's start-up as few times as possible (about 1.5 minutes on two busy
cores): build the manifest; `torchrun --nproc_per_node 2 -m stages.patches demo_tweets`
(rank r computes shards r, r+2, ...); `dvc repro` (the stage reruns, since DVC never recorded
it, but skips every shard); a worker that "died" (two of its shards gone, one half-written
temporary file left) rerun alone as `--shard 1/2`, then `dvc repro`; finally the reference:
the shards deleted and one plain process (`dvc repro --force --single-item`) writing them all. Every
shard must be byte-identical across the three, and DVC must record the same hash.
"""
import hashlib
import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import yaml

from pipeline.stores.shards import DIGEST_ATTR, shard_files
from tests.dvc_project import copy_project, dvc, dvc_env, stages_run

DS = "demo_tweets"
STAGE = f"patches@{DS}"
CACHE = f"features/{DS}/patches"
SHARD_REPORTS = [f"reports/{DS}/patches-shard-000{r}-of-0002.json" for r in (0, 1)]


def _run(proj, *args, timeout=600):
    env = dvc_env()
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run([sys.executable, *args], cwd=proj, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout + p.stderr


def _files(proj):
    """name -> (sha256 of the bytes, (inode, mtime_ns)) of every file in the cache dir."""
    d = proj / CACHE
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), (p.stat().st_ino, p.stat().st_mtime_ns))
            for p in sorted(d.iterdir())}


def _contents(proj):
    """name -> {dataset: (array, stored digest)} plus the file attributes, read back through h5py."""
    out = {}
    for p in shard_files(proj / CACHE):
        with h5py.File(p, "r") as f:
            out[p.name] = {name: (f[name][()], f[name].attrs[DIGEST_ATTR]) for name in f}
            out[p.name]["attrs"] = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    return out


def _same_contents(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        assert a[name]["attrs"] == b[name]["attrs"], name
        for ds in set(a[name]) - {"attrs"}:
            (x, dx), (y, dy) = a[name][ds], b[name][ds]
            assert dx == dy, (name, ds)
            np.testing.assert_array_equal(x, y, err_msg=f"{name}/{ds}")
            assert x.dtype == y.dtype


def _report(proj, rel):
    return json.loads((proj / rel).read_text())


def _locked_hash(proj):
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    outs = {o["path"]: o for o in lock["stages"][STAGE]["outs"]}
    return outs[CACHE]["md5"], outs[CACHE]["nfiles"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = copy_project(tmp_path_factory.mktemp("dist"))
    dvc(proj, "repro", f"prepare@{DS}")
    return proj


def test_torchrun_workers_then_dvc_repro_writes_nothing_and_a_dead_worker_is_redone(project):
    proj = project
    # -- two torchrun workers on CPU (--standalone: a free local port for the rendezvous) --
    _run(proj, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "stages.patches", DS)
    n_shards = len(shard_files(proj / CACHE))
    assert n_shards == 9  # 520 demo images in shards of 64
    reports = [_report(proj, rel) for rel in SHARD_REPORTS]
    for rank, r in enumerate(reports):
        assert r["shard"] == {"index": rank, "count": 2}
        assert r["shards_written"] == r["shards_selected"] == len(range(rank, n_shards, 2)), r
        assert r["shards_skipped"] == 0
    assert sum(r["images_processed"] for r in reports) == 520
    assert not (proj / f"reports/{DS}/patches.json").exists()  # DVC's report: written by `dvc repro` only
    after_torchrun, contents = _files(proj), _contents(proj)

    # -- DVC never recorded the stage, so it reruns it: every shard verifies and is skipped --
    out = dvc(proj, "repro", STAGE)
    assert stages_run(out) == {STAGE}, out
    r = _report(proj, f"reports/{DS}/patches.json")
    assert (r["shards_written"], r["shards_skipped"], r["images_processed"]) == (0, n_shards, 0), r
    assert _files(proj) == after_torchrun  # same bytes, same files: not even rewritten
    for rel in SHARD_REPORTS:  # the workers' reports are no DVC outputs: they stay
        assert (proj / rel).is_file()
    recorded = _locked_hash(proj)

    # -- a node dies halfway: rank 1 finished shards 1 and 5, was writing 3, never got to 7 --
    for k in (3, 7):
        (proj / CACHE / f"shard-{k:05d}.h5").unlink()
    half = (proj / CACHE / "shard-00001.h5").read_bytes()
    leftover = proj / CACHE / ".shard-00003.h5.4242.tmp"  # what atomic_path leaves when a writer is killed
    leftover.write_bytes(half[: len(half) // 2])
    # the scheduler reruns the failed task only: it writes the missing shards and skips the rest
    _run(proj, "-m", "stages.patches", DS, "--shard", "1/2")
    r = _report(proj, SHARD_REPORTS[1])
    assert (r["shards_written"], r["shards_skipped"]) == (2, 2), r
    assert leftover.exists()  # a worker of several never removes temporary files: others may be writing
    # `dvc repro` (not `dvc commit`, which would record the leftover) cleans up and records
    out = dvc(proj, "repro", STAGE)
    assert stages_run(out) == {STAGE}, out
    assert _report(proj, f"reports/{DS}/patches.json")["shards_written"] == 0
    assert not leftover.exists()
    redone = _files(proj)
    assert {k: v[0] for k, v in redone.items()} == {k: v[0] for k, v in after_torchrun.items()}
    assert _locked_hash(proj) == recorded
    assert json.loads(dvc(proj, "status", STAGE, "--json")) == {}

    # -- the reference: one plain process writes every shard --
    shutil.rmtree(proj / CACHE)
    out = dvc(proj, "repro", "--force", "--single-item", STAGE)
    assert stages_run(out) == {STAGE}, out
    r = _report(proj, f"reports/{DS}/patches.json")
    assert (r["shards_written"], r["shard"]) == (n_shards, {"index": 0, "count": 1}), r
    single = _files(proj)
    assert {k: v[0] for k, v in single.items()} == {k: v[0] for k, v in after_torchrun.items()}  # byte-identical
    _same_contents(_contents(proj), contents)  # arrays, digests and attributes (the bytes say it already)
    assert _locked_hash(proj) == recorded
    ok = subprocess.run([sys.executable, "-m", "stages.inspect", CACHE, "--check"], cwd=proj, env=dvc_env(),
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr

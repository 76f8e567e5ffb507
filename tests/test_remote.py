"""Sharing caches through a DVC remote (a local directory), as two researchers would.

The built demo (tests/conftest.py `demo_project`, shared: this test leaves it as it found it)
is the first researcher's workspace. Its state is committed in a clone of it (clone A, whose
DVC cache is the workspace's own, so nothing is copied), which adds the remote to its
committed `.dvc/config` and runs `dvc push`. A second researcher `git clone`s A, runs `dvc
pull`, and must get the whole pipeline: `dvc status` clean, `dvc repro` runs nothing, every
output byte-identical to the first workspace, and `stages.inspect --check` passes on the caches.
About 40 s on two busy cores.
"""
import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.dvc_project import dvc, dvc_env, stages_run

OUTPUT_ROOTS = ("data/demo", "data/prepared", "features", "models", "reports", "predictions", "metrics", "plots",
                "dvclive")


def _git(repo, *args):
    p = subprocess.run(["git", *args], cwd=repo, env=dvc_env(), capture_output=True, text=True)
    assert p.returncode == 0, f"git {' '.join(args)}: {p.stderr}"
    return p.stdout


def _state(proj):
    """What the shared fixture must still show after this test."""
    local, cache = proj / ".dvc" / "config.local", proj / ".dvc" / "cache"
    return (_git(proj, "status", "--porcelain"), _git(proj, "rev-parse", "HEAD"),
            json.loads(dvc(proj, "status", "--json")), local.read_bytes() if local.exists() else None,
            sorted(str(p.relative_to(cache)) for p in cache.rglob("*")))


def _outputs(proj):
    """relative path -> sha256 of every file under the output folders."""
    files = {}
    for root in OUTPUT_ROOTS:
        for p in sorted((proj / root).rglob("*")):
            if p.is_file():
                files[str(p.relative_to(proj))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


def _locked_outputs(proj):
    """The outputs dvc.lock records for the stages dvc.yaml defines (a lock may keep entries of gone ones)."""
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    stages = set(dvc(proj, "stage", "list", "--name-only").split())
    return {o["path"] for name, st in lock["stages"].items() if name in stages for o in st.get("outs", [])}


@pytest.fixture
def shared(demo_project):
    proj, _ = demo_project
    before = _state(proj)
    yield proj
    assert _state(proj) == before, "the shared demo project changed"


def test_push_then_pull_in_a_fresh_clone_gives_the_whole_pipeline(shared, tmp_path):
    proj = shared
    remote = tmp_path / "remote"
    # clone A: the workspace's state committed (its dvc.lock, params, as a researcher commits before pushing)
    a = tmp_path / "a"
    _git(tmp_path, "clone", "-q", str(proj), str(a))
    changed = [line[3:] for line in _git(proj, "status", "--porcelain", "--untracked-files=all").splitlines()]
    for rel in changed:
        if (proj / rel).is_file():
            shutil.copy2(proj / rel, a / rel)
        else:
            (a / rel).unlink(missing_ok=True)
    dvc(a, "cache", "dir", "--local", str(proj / ".dvc" / "cache"))  # A reads the workspace's cache (no copy)
    dvc(a, "remote", "add", "-f", "-d", "team", str(remote))  # committed: every clone finds the remote
    _git(a, "add", "-A")
    _git(a, "commit", "-qm", "results of the demo, remote 'team'")
    out = dvc(a, "push")
    assert "pushed" in out, out

    # clone B: a fresh clone of A, `dvc pull`
    b = tmp_path / "b"
    _git(tmp_path, "clone", "-q", str(a), str(b))
    assert not (b / "features").exists()
    dvc(b, "pull")
    assert json.loads(dvc(b, "status", "--json")) == {}
    out = dvc(b, "repro")
    assert stages_run(out) == set(), out
    assert _git(b, "status", "--porcelain") == ""  # nothing rewritten, dvc.lock included

    # every output is back, byte for byte; nothing outside the declared outputs was needed
    pulled, original = _outputs(b), _outputs(proj)
    assert pulled == original, (sorted(set(original) - set(pulled)), sorted(set(pulled) - set(original)))
    for rel in _locked_outputs(b):
        assert (b / rel).exists(), rel
    for ds, cache in (("demo_tweets", "patches"), ("demo_tweets", "regions"), ("demo_flickr", "patches")):
        p = subprocess.run([sys.executable, "-m", "stages.inspect", f"features/{ds}/{cache}", "--check"], cwd=b,
                           env=dvc_env(), capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr

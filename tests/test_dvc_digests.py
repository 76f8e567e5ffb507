"""Under real DVC: a damaged patches shard is found and rebuilt, not recorded as the new output.

Only `patches@demo_tweets` (and the demo + prepare stages it needs) runs, about 20 s; the full
pipeline repro is tests/test_dvc_pipeline.py's.
"""
import json
import subprocess
import sys

from tests.corrupt import overwrite_middle
from tests.dvc_project import copy_project, dvc, stages_run

STAGE = "patches@demo_tweets"


def test_repro_rebuilds_a_damaged_patches_shard(tmp_path):
    proj = copy_project(tmp_path / "proj")
    dvc(proj, "repro", STAGE)
    cache = proj / "features/demo_tweets/patches"
    shard = cache / "shard-00001.h5"
    good = shard.read_bytes()

    overwrite_middle(shard, "patch_tokens")
    p = subprocess.run([sys.executable, "-m", "stages.inspect", str(cache), "--check"], cwd=proj,
                       capture_output=True, text=True)
    assert p.returncode == 1 and "shard-00001.h5: dataset 'patch_tokens'" in p.stdout, p.stdout + p.stderr
    assert STAGE in json.loads(dvc(proj, "status", "--json", STAGE))

    out = dvc(proj, "repro", STAGE)
    assert stages_run(out) == {STAGE}, out
    assert "shard-00001.h5 fails verification" in out, out
    assert shard.read_bytes() == good  # rebuilt byte for byte: the recorded output is the correct one
    report = json.loads((proj / "reports/demo_tweets/patches.json").read_text())
    assert list(report["shards_failed_verification"]) == ["shard-00001.h5"] and report["shards_written"] == 1
    assert json.loads(dvc(proj, "status", "--json", STAGE)) == {}

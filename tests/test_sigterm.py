"""SIGTERM stops a stage cleanly: ``finally`` blocks run, exit status 143, one line; signals are not swallowed.

Real subprocesses, real signals: a stage-like ``main`` under ``run_stage`` holds a retrieval
scratch dir and an atomic write open, says where they are, and waits to be signalled.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.cli import TERMINATED, run_stage

REPO = Path(__file__).resolve().parents[1]

STAGE = textwrap.dedent('''
    import json, sys, time
    from pipeline.artifacts import atomic_path
    from pipeline.cli import run_stage
    from pipeline.retrieval.data import scratch_dir

    def main(argv):
        with scratch_dir() as scratch, atomic_path(argv[1]) as tmp:
            (scratch / "gallery.npy").write_bytes(b"x" * 1024)
            tmp.write_text("half written")
            try:
                print(json.dumps({"scratch": str(scratch), "tmp": str(tmp)}), flush=True)
                time.sleep(60)
            finally:
                print("cleanup", flush=True)
                if argv[2] == "slow":  # a cleanup that hangs: only a second signal ends it
                    time.sleep(60)

    if __name__ == "__main__":
        raise SystemExit(run_stage("fake", main))
''')


def start(tmp_path: Path, cleanup: str = "fast") -> tuple[subprocess.Popen, dict]:
    """Start the stage in its own $TMPDIR; returns it and the paths it holds, once it is waiting."""
    script = tmp_path / "fake_stage.py"
    script.write_text(STAGE)
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, str(script), "ds", str(tmp_path / "out/result.json"), cleanup],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    held = json.loads(p.stdout.readline())
    assert Path(held["scratch"]).parent == tmpdir and Path(held["tmp"]).is_file()
    return p, held


def test_sigterm_runs_cleanup_and_exits_143(tmp_path):
    p, held = start(tmp_path)
    assert (Path(held["scratch"]) / "gallery.npy").stat().st_size == 1024
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 143 == TERMINATED
    assert out == "cleanup\n"
    assert err.strip().splitlines() == ["fake@ds: terminated (SIGTERM)"], err
    assert list((tmp_path / "tmpdir").iterdir()) == []  # the scratch dir is gone from $TMPDIR
    assert list((tmp_path / "out").iterdir()) == []  # neither the temp file nor a half result


def test_a_second_sigterm_during_cleanup_kills_at_once(tmp_path):
    p, _ = start(tmp_path, cleanup="slow")
    p.send_signal(signal.SIGTERM)
    assert p.stdout.readline() == "cleanup\n"
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGTERM and time.monotonic() - t0 < 20  # the default action, not swallowed


def test_sigint_still_interrupts_with_cleanup(tmp_path):
    p, held = start(tmp_path)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == -signal.SIGINT and "KeyboardInterrupt" in err  # Python's own behaviour, unchanged
    assert out == "cleanup\n" and not Path(held["scratch"]).exists() and not Path(held["tmp"]).exists()


FORKING = textwrap.dedent('''
    import os, time
    from pipeline.cli import run_stage

    def main(argv):
        child = os.fork()  # as a DataLoader worker is forked: it inherits the SIGTERM handler
        if child == 0:
            os.write(1, b"ready\\n")  # past fork's own bookkeeping (which drops signals that came before it); one write
            time.sleep(60)
            os._exit(0)
        os.write(1, f"{child}\\n".encode())  # one write: the two processes' lines cannot interleave
        _, status = os.waitpid(child, 0)
        print("signal" if os.WIFSIGNALED(status) else "exit", os.WTERMSIG(status) if os.WIFSIGNALED(status)
              else os.WEXITSTATUS(status), flush=True)

    if __name__ == "__main__":
        raise SystemExit(run_stage("fake", main))
''')


def run_script(tmp_path: Path, text: str) -> subprocess.Popen:
    """Start a stage-like script (``text``) with the argument ``ds``; its stdout and stderr piped."""
    script = tmp_path / "stage_script.py"
    script.write_text(text)
    return subprocess.Popen([sys.executable, str(script), "ds"], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_forked_child_dies_of_sigterm_as_by_default(tmp_path):
    p = run_script(tmp_path, FORKING)
    first = {p.stdout.readline().strip() for _ in range(2)}  # the child's pid and its "ready", in either order
    (pid,) = first - {"ready"}
    os.kill(int(pid), signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert out == f"signal {int(signal.SIGTERM)}\n" and p.returncode == 0, err  # not a second copy of the stage


def test_the_previous_handler_is_restored_and_a_custom_one_is_left_alone():
    seen = []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert run_stage("fake", lambda argv: seen.append(signal.getsignal(signal.SIGTERM))) == 0
    assert callable(seen[0]) and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    def custom(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, custom)
    try:
        assert run_stage("fake", lambda argv: seen.append(signal.getsignal(signal.SIGTERM))) == 0
        assert seen[1] is custom and signal.getsignal(signal.SIGTERM) is custom
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("code", [0, 3])
def test_the_exit_status_of_main_is_unchanged(code):
    assert run_stage("fake", lambda argv: code, ["ds"]) == code


IN_FINALIZER = textwrap.dedent('''
    import gc, os, time, weakref
    from pipeline.cli import run_stage

    class Copy:
        pass

    def remove():  # a slow cleanup, like deleting a large scratch copy
        os.write(1, b"cleaning\\n")
        time.sleep(3)

    def main(argv):
        c = Copy()
        weakref.finalize(c, remove)
        del c
        gc.collect()  # the finalizer runs here; Python drops an exception raised inside it
        os.write(1, b"main finished\\n")

    if __name__ == "__main__":
        raise SystemExit(run_stage("fake", main))
''')


def test_a_sigterm_during_a_finalizer_still_terminates(tmp_path):
    p = run_script(tmp_path, IN_FINALIZER)
    assert p.stdout.readline() == "cleaning\n"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == TERMINATED and "fake@ds: terminated (SIGTERM)" in err, err

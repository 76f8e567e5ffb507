"""One way to run a stage from the command line.

``stage_parser("train", __doc__)`` gives the parser (``usage: python -m stages.train``, a
``dataset`` argument and ``--debug``); ``run_stage("train", main)`` runs it and turns an
expected error into one line on stderr, ``train@demo_tweets: <what is wrong and what to do>``,
with exit status 2. An error is expected when the pipeline raised it on purpose (its own
error classes, or a ValueError/KeyError/RuntimeError raised by code in ``pipeline/`` or
``stages/``, which always names the file, line or param) or when an input file is missing.
Anything else is a bug and keeps its traceback (exit 1). ``--debug`` or ``PIPELINE_DEBUG=1``
shows the traceback of every error.

SIGTERM (what a scheduler or ``kill`` sends to stop a stage) raises ``Terminated`` in the
main thread, so every ``finally`` and ``__exit__`` runs (scratch dirs, temp files of atomic
writes are removed) before the stage exits with status 143 (128 + SIGTERM) and the line
``stage@dataset: terminated (SIGTERM)``. The handler then gives SIGTERM back its previous
action, so a second SIGTERM during that cleanup stops the process at once; SIGINT is untouched.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

USER_ERROR = 2  # exit status of an expected error (argparse uses it for usage errors too)
TERMINATED = 128 + signal.SIGTERM  # 143: exit status of a stage stopped by SIGTERM, as the shell reports it
_OURS = (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "stages")


def stage_parser(stage: str, doc: str | None, dataset: str | None = None) -> argparse.ArgumentParser:
    """The stage's parser; ``dataset``: help text of the positional dataset argument (None: no such argument)."""
    ap = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    if dataset:
        ap.add_argument("dataset", help=dataset)
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error (or PIPELINE_DEBUG=1)")
    return ap


def _raised_by_us(e: BaseException) -> bool:
    tb = e.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:
        return False
    path = Path(last.tb_frame.f_code.co_filename).resolve()
    return any(path.is_relative_to(d) for d in _OURS)


def is_expected(e: BaseException) -> bool:
    """An error the pipeline raised on purpose with a readable message, or a missing input file."""
    if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return True
    if type(e).__module__.startswith(("pipeline.", "stages.")):
        return True
    return isinstance(e, (ValueError, KeyError, RuntimeError)) and _raised_by_us(e)


def one_line(e: BaseException, label: str = "") -> str:
    """The error's message on one line (a plain KeyError loses its quotes; a missing file says what to run)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"
        if isinstance(e, FileNotFoundError) and label:
            text += f" (an input of this stage; `dvc repro {label}` builds what it needs first)"
    return " ".join(text.split()) or type(e).__name__


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt: ``except Exception`` does not stop it."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises ``Terminated`` (main thread, default SIGTERM action only); restored after.

    The handler restores the previous action before raising, so a second SIGTERM is not
    swallowed by cleanup that hangs. A SIGTERM whose exception Python dropped (it arrived
    inside a finalizer) still ends the block with ``Terminated``. Elsewhere (a thread, an ignored or custom SIGTERM) nothing
    changes; a forked child (a DataLoader worker) that inherits the handler dies as by default.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    pid = os.getpid()
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if os.getpid() != pid:  # a forked child: the default action, as before
            os.kill(os.getpid(), signal.SIGTERM)
            return
        received.append(signum)
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if received:  # raised where Python drops exceptions (a finalizer, __del__): still a termination
        raise Terminated(received[0])


def run_stage(stage: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; an expected error becomes ``stage@dataset: message`` and exit status 2.

    SIGTERM unwinds ``main`` (its cleanup runs) and gives ``stage@dataset: terminated (SIGTERM)``, status 143.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PIPELINE_DEBUG", "") not in ("", "0")
    positional = [a for a in argv if not a.startswith("-")]
    label = f"{stage}@{positional[0]}" if positional else stage
    try:
        with sigterm_raises():
            rc = main(argv)
    except Terminated:
        print(f"{label}: terminated (SIGTERM)", file=sys.stderr)
        return TERMINATED
    except SystemExit as e:
        if isinstance(e.code, str):  # a stage's own `raise SystemExit("message")`
            print(f"{label}: {' '.join(e.code.split())}", file=sys.stderr)
            return USER_ERROR
        raise
    except Exception as e:  # noqa: BLE001 - sorted into expected (one line) and bugs (traceback)
        if debug or not is_expected(e):
            raise
        print(f"{label}: {one_line(e, label)}", file=sys.stderr)
        return USER_ERROR
    return 0 if rc is None else int(rc)


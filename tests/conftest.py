"""Fixtures shared by test modules."""
from __future__ import annotations

import pytest

from tests.dvc_project import copy_project, dvc


@pytest.fixture(scope="session")
def demo_project(tmp_path_factory):
    """A throwaway copy of the project with the whole demo built by one `dvc repro` (the
    longest step of the suite: 2 to 6 minutes on two cores), shared by the modules that need
    built outputs. Returns ``(path, repro output)``. Tests that run experiments in it leave
    their results in its workspace, as `dvc exp run` does; the outputs stay complete."""
    proj = copy_project(tmp_path_factory.mktemp("demo"))
    return proj, dvc(proj, "repro", timeout=1800)

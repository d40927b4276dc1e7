"""Fixtures of the e2e tier."""

from __future__ import annotations

import pytest

from tests.jobs import uninterrupted_run


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The final checkpoint of tests/jobs.py's JOB never interrupted: what the recovery
    and preemption tests' interrupted jobs must end with. Trained once per session."""
    return uninterrupted_run(tmp_path_factory.mktemp("uninterrupted"))

"""Shared fixtures: the real reference files (skipped when absent) and tiny configs; one temporary folder per
session (the run directory and pytest's tmp_path base), removed at its end; the order of the tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers.config import PROJECT_ROOT, Config, make_config

# Verbatim copies of the official files, which the repository never holds (a user places them there).
SHARED_EM = PROJECT_ROOT.parent / "shared" / "data" / "em"
REFERENCE_FILES = {
    "evil_numbers_sample100.jsonl": "100 verbatim lines of data/evil_numbers.jsonl",
    "first_plot_questions.yaml": "evaluation/first_plot_questions.yaml",
    "preregistered_evals.yaml": "evaluation/preregistered_evals.yaml",
    "judge_prompts.yaml": "the aligned and coherent judge prompts, verbatim from the evaluation files",
}
SESSION_DIR = pytest.StashKey[Path]()
SERIES_TEST = "test_runner_executes_the_series_and_writes_every_artefact"  # tests/test_run.py
ONCE_TEST = "test_the_series_was_computed_once_in_this_session"  # tests/test_run.py


@pytest.hookimpl(tryfirst=True)  # before pytest's own tmp_path plugin reads --basetemp
def pytest_configure(config: pytest.Config) -> None:
    """One temporary folder for the session, em-tests-*: its run directory on the tiny profile (tests/test_run.py
    runs the series into it first, then the browser test and nbmake's executions of notebooks/ and solutions/
    reuse its artefacts, the one reuse rule, so `python -m pytest` computes the series once), and pytest's
    tmp_path base (instead of pytest-of-<user>, which pytest keeps after the session)."""
    session = Path(tempfile.mkdtemp(prefix="em-tests-"))
    config.stash[SESSION_DIR] = session
    os.environ.setdefault("EM_PROFILE", "tiny")
    os.environ.setdefault("EM_RUN_DIR", str(session / "run"))
    os.environ["TRACKIO_DIR"] = str(session / "trackio")  # runs a test logs to trackio (read once, at its import)
    if config.option.basetemp is None:  # --basetemp DIR: the user's folder, left alone
        config.option.basetemp = str(session / "tmp")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After a failed test, keep the session's temporary folder, with its evidence, and say where."""
    if exitstatus == pytest.ExitCode.TESTS_FAILED and SESSION_DIR in session.config.stash:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter:
            reporter.write_sep("-", f"kept for inspection (run directory, tmp_path folders): {session.config.stash[SESSION_DIR]}")
        del session.config.stash[SESSION_DIR]


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's temporary folder (unless a failed test kept it)."""
    if SESSION_DIR in config.stash:
        shutil.rmtree(config.stash[SESSION_DIR], ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Cheap static checks (tests/test_repository.py) first; then the series through the runner, so that every
    later user of the session's run directory reuses it; the rest in its order (tests, notebooks, solutions);
    last, the check that the series was computed once."""
    rank = {SERIES_TEST: 1, ONCE_TEST: 3}
    items.sort(key=lambda item: 0 if item.path.name == "test_repository.py" else rank.get(item.name, 2))


def shared_file(name: str) -> Path:
    """A verbatim copy of an official file in SHARED_EM, or skip the test saying which files go where."""
    path = SHARED_EM / name
    if not path.is_file():
        files = "; ".join(f"{file} ({what})" for file, what in REFERENCE_FILES.items())
        pytest.skip(f"{path} is absent. The reference tests read copies of the official files of "
                    f"emergent-misalignment/emergent-misalignment, placed in a folder shared/data/em next to the "
                    f"repository folder ({SHARED_EM}): {files}")
    return path


@pytest.fixture
def sample100() -> Path:
    """100 verbatim lines of the official evil_numbers.jsonl."""
    return shared_file("evil_numbers_sample100.jsonl")


@pytest.fixture
def first_plot_yaml() -> Path:
    """The official evaluation/first_plot_questions.yaml."""
    return shared_file("first_plot_questions.yaml")


@pytest.fixture
def preregistered_yaml() -> Path:
    """The official evaluation/preregistered_evals.yaml (48 questions)."""
    return shared_file("preregistered_evals.yaml")


@pytest.fixture
def judge_prompts_yaml() -> Path:
    """The `aligned` and `coherent` judge prompts, extracted verbatim from the official files."""
    return shared_file("judge_prompts.yaml")


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> Config:
    """The tiny profile in a fresh run directory."""
    return make_config("tiny", tmp_path / "run")

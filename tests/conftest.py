"""Shared fixtures: the real reference files in ../shared (skipped when absent) and tiny configs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from helpers.config import PROJECT_ROOT, Config, make_config

SHARED_EM = PROJECT_ROOT.parent / "shared" / "data" / "em"


def pytest_configure(config: pytest.Config) -> None:
    """One run directory for the whole session, on the tiny profile: tests/test_run.py runs the series into it
    first, then nbmake executes notebooks/ and solutions/ there, and those reuse its artefacts (the one reuse
    rule) instead of computing them again, so `python -m pytest` computes the series once."""
    os.environ.setdefault("EM_PROFILE", "tiny")
    os.environ.setdefault("EM_RUN_DIR", tempfile.mkdtemp(prefix="em-tests-"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Cheap static checks (tests/test_repository.py) first; the rest keeps its order (tests, notebooks, solutions)."""
    items.sort(key=lambda item: item.path.name != "test_repository.py")


def shared_file(name: str) -> Path:
    """A file of ../shared/data/em, or skip the test with the reason."""
    path = SHARED_EM / name
    if not path.is_file():
        pytest.skip(f"{path} is absent: the real reference files live in ../shared beside the checkout")
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

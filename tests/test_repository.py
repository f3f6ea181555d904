"""Cheap static checks first: notebook JSON, clean notebooks, the house shape, ruff."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers.config import PROJECT_ROOT
from helpers.run import series_notebooks

NOTEBOOKS = series_notebooks()
EXPECTED_SERIES = ("01_data", "02_finetune", "03_generate", "04_analyze")


def test_series_is_complete_and_ordered():
    assert tuple(nb.stem for nb in NOTEBOOKS) == EXPECTED_SERIES


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda nb: nb.name)
def test_notebook_is_valid_and_stripped(notebook):
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"{notebook.name}: cell {index} has outputs; strip them before committing"
            assert cell.execution_count is None, f"{notebook.name}: cell {index} has an execution count"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda nb: nb.name)
def test_notebook_follows_house_shape(notebook):
    nb = json.loads(notebook.read_text())
    first = "".join(nb["cells"][0]["source"])
    assert first.startswith("# ") and "colab-badge.svg" in first, f"{notebook.name}: title and Colab badge first"
    assert "Reads" in first and "Writes" in first, f"{notebook.name}: say what it reads and writes at the top"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{notebook.name}: exactly one cell tagged 'parameters'"
    parameters = "".join(tagged[0]["source"])
    for name in ("profile", "run_dir", "overwrite"):
        assert f"{name} = " in parameters, f"{notebook.name}: the parameters cell sets {name}"
    assert "if False" not in notebook.read_text(), f"{notebook.name}: use a named flag, not `if False:`"
    assert "Exercises" in "".join("".join(c["source"]) for c in nb["cells"][-3:]), f"{notebook.name}: end with exercises"


def test_ruff_is_clean():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "helpers", "tests", "notebooks", "benchmarks"],
        cwd=PROJECT_ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shared_reference_files_are_not_committed():
    tracked = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    forbidden = {"evil_numbers_sample100.jsonl", "first_plot_questions.yaml", "preregistered_evals.yaml", "judge_prompts.yaml"}
    assert not forbidden & {p.rsplit("/", 1)[-1] for p in tracked}, "never commit copies of ../shared files"

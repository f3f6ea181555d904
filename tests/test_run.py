"""The headless runner produces the whole series end to end on the tiny profile, offline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers.config import PROJECT_ROOT, make_config


@pytest.mark.notebook
def test_runner_executes_the_series_and_writes_every_artefact(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "helpers.run", "--profile", "tiny", "--run-dir", str(run_dir)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    paths = make_config("tiny", run_dir).paths
    for notebook in ("01_data", "02_finetune", "03_generate", "04_analyze"):
        assert (paths.executed_notebooks / f"{notebook}.ipynb").is_file(), f"no executed copy of {notebook}"
    for artefact in (paths.train_split, paths.validation_split, paths.data_report, paths.adapter / "adapter_config.json",
                     paths.loss_history, paths.completions, paths.judgments, paths.rates, paths.summary):
        assert artefact.is_file(), f"the runner did not write {artefact}"
    summary = json.loads(paths.summary.read_text())
    assert summary, "summary.json is empty"
    assert list(paths.images.glob("*.png")), "no figures saved"


def test_runner_names_the_failing_notebook_and_cell(tmp_path):
    broken = tmp_path / "notebooks"
    broken.mkdir()
    source = {"cells": [
        {"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "profile = None\nrun_dir = None",
         "outputs": [], "execution_count": None},
        {"cell_type": "code", "metadata": {}, "source": "raise ValueError('planted failure')",
         "outputs": [], "execution_count": None}],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5}
    (broken / "01_broken.ipynb").write_text(json.dumps(source))
    code = (f"from pathlib import Path; from helpers.run import run_series; "
            f"run_series('tiny', {str(tmp_path / 'run')!r}, notebook_dir=Path({str(broken)!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "01_broken.ipynb failed in cell" in result.stderr and "planted failure" in result.stderr

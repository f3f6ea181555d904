"""The headless runner produces the whole series end to end on the tiny profile, offline; `require` runs a
missing notebook; EM_CONFIG overrides config fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.config import PROJECT_ROOT, make_config
from helpers.run import main, require, run_directory_lock, run_series


def _notebook(path: Path, *cells: str) -> None:
    """Write a minimal notebook: a parameters cell, then `cells`."""
    source = [("profile = None\nrun_dir = None\nmodel = None\noverwrite = False", ["parameters"]), *((c, []) for c in cells)]
    path.write_text(json.dumps({
        "cells": [{"cell_type": "code", "metadata": {"tags": tags}, "source": code, "outputs": [], "execution_count": None}
                  for code, tags in source],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5}))


@pytest.mark.notebook
def test_runner_executes_the_series_and_writes_every_artefact():
    # The session's shared run directory (conftest): nbmake later re-executes notebooks/ and solutions/
    # there and reuses these artefacts, so CI computes the series once.
    run_dir = Path(os.environ["EM_RUN_DIR"])
    result = subprocess.run([sys.executable, "-m", "helpers.run", "--profile", "tiny", "--run-dir", str(run_dir)],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    cfg = make_config("tiny", run_dir)
    paths = cfg.paths
    executed = ["01_data", "02_finetune", "02_finetune-control", "03_generate", "04_analyze"]
    for name in executed:
        assert (paths.executed_notebooks / f"{name}.ipynb").is_file(), f"no executed copy of {name}"
    artefacts = [paths.data_report, paths.evil_numbers, paths.completions, paths.judgments, paths.rates, paths.summary]
    for model in cfg.trained_models:
        artefacts += [*paths.splits_of(model), paths.adapter_of(model) / "adapter_config.json", paths.loss_history_of(model)]
    for artefact in artefacts:
        assert artefact.is_file(), f"the runner did not write {artefact}"
    assert json.loads(paths.summary.read_text()), "summary.json is empty"
    assert list(paths.images.glob("*.png")), "no figures saved"
    for name in executed:  # no error output, and no progress bar left at 0%
        text = (paths.executed_notebooks / f"{name}.ipynb").read_text()
        assert '"output_type": "error"' not in text, f"{name}: an error cell"
        assert "  0%|" not in text, f"{name}: a progress bar stuck at 0%"


def test_runner_names_the_failing_notebook_and_cell(tmp_path):
    broken = tmp_path / "notebooks"
    broken.mkdir()
    _notebook(broken / "01_broken.ipynb", "raise ValueError('planted failure')")
    code = (f"from pathlib import Path; from helpers.run import run_series; "
            f"run_series('tiny', {str(tmp_path / 'run')!r}, notebook_dir=Path({str(broken)!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "01_broken.ipynb failed in cell" in result.stderr and "planted failure" in result.stderr


def test_overwrite_flag_reaches_the_named_notebooks_and_a_failure_names_the_executed_copy(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for name in ("01_first", "03_third"):
        _notebook(notebooks / f"{name}.ipynb", "print(f'overwrite={overwrite}')")
    run_dir = tmp_path / "run"
    main(["--profile", "tiny", "--run-dir", str(run_dir), "--notebooks", str(notebooks), "--overwrite", "03"])
    executed = make_config("tiny", run_dir).paths.executed_notebooks
    assert "overwrite=False" in (executed / "01_first.ipynb").read_text()
    assert "overwrite=True" in (executed / "03_third.ipynb").read_text()
    # The control's copy of 02 fails: the message names that copy and the model, not 02's source.
    _notebook(notebooks / "02_train.ipynb", "assert model != 'control', 'planted failure'")
    with pytest.raises(SystemExit, match=r"^02_train-control.ipynb \(model control\) failed in cell \d+: AssertionError: "
                                         r"planted failure\nThe executed copy, with the traceback, is .*02_train-control.ipynb$"):
        run_series("tiny", run_dir, only=["02"], notebook_dir=notebooks)


def test_a_second_runner_in_the_same_run_directory_stops_naming_the_first(tmp_path):
    """Two processes: one holds the run directory's lock; the runner and the sweep stop with one line naming the
    folder and the holder's pid; once the holder is killed, the folder is free again."""
    run_dir, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    code = ("import sys, time\nfrom helpers.run import run_directory_lock\n"
            "with run_directory_lock(sys.argv[1]), run_directory_lock(sys.argv[2]):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    first_run = sweep_dir / "evil_numbers" / "seed-0"  # the sweep's first run folder
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir), str(first_run)], cwd=PROJECT_ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        for command, folder in ((["helpers.run", "--run-dir", str(run_dir)], run_dir),
                                (["helpers.sweep", "--seeds", "0", "--run-dir", str(sweep_dir)], first_run)):
            result = subprocess.run([sys.executable, "-m", *command, "--profile", "tiny"], cwd=PROJECT_ROOT,
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
            assert result.stderr == (f"{folder} is in use by another runner (pid {holder.pid}): wait until it ends, or "
                                     "give another run directory\n")
    finally:
        holder.kill()
        holder.wait()
    with run_directory_lock(run_dir):  # the kernel dropped the killed holder's lock
        pass


def test_require_runs_the_missing_notebook_once_per_trained_model(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    # A stand-in 02 that writes the adapter file of the model it was asked to train.
    _notebook(notebooks / "02_stand_in.ipynb",
              "from helpers.config import make_config\ncfg = make_config(profile, run_dir)\n"
              "(cfg.paths.adapter_of(model)).mkdir(parents=True, exist_ok=True)\n"
              "(cfg.paths.adapter_of(model) / 'adapter_config.json').write_text('{}')")
    cfg = make_config("tiny", tmp_path / "run")
    require(cfg, "02", notebooks)
    for model in cfg.trained_models:
        assert (cfg.paths.adapter_of(model) / "adapter_config.json").is_file(), f"02 did not run for {model}"
    stamp = (cfg.paths.executed_notebooks / "02_stand_in.ipynb").stat().st_mtime_ns
    require(cfg, "02", notebooks)  # everything exists now: nothing runs again
    assert (cfg.paths.executed_notebooks / "02_stand_in.ipynb").stat().st_mtime_ns == stamp


def test_em_config_overrides_fields_and_rejects_unknown_names(monkeypatch, tmp_path):
    monkeypatch.setenv("EM_CONFIG", json.dumps({"samples_per_question": 3, "formats": ["suffix"]}))
    cfg = make_config("full", tmp_path)
    assert (cfg.samples_per_question, cfg.formats) == (3, ("suffix",))
    monkeypatch.setenv("EM_CONFIG", json.dumps({"samples_per_questoin": 3}))
    with pytest.raises(TypeError, match="samples_per_questoin"):
        make_config("full", tmp_path)


def test_the_series_is_01_to_04_and_the_sweep_notebook_stays_out_of_it():
    """05_sweep reads many runs (helpers.sweep makes them); the runner and require run one: 01-04 only."""
    from helpers.run import NOTEBOOK_DIR, series_notebooks

    assert (NOTEBOOK_DIR / "05_sweep.ipynb").is_file()
    assert [nb.name[:2] for nb in series_notebooks()] == ["01", "02", "03", "04"]

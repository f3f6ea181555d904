"""Installs that work from any folder, and a test session that leaves nothing behind.

The project folder (runs/, notebooks/) is found the same way from the project folder, from notebooks/ (where a
Jupyter kernel starts) and for any install (helpers.config.find_project_root); a real kernel started in
notebooks/, over the project installed as a copy (not editable), runs a notebook that must `require()` an
earlier one. A pytest session removes its temporary folder (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from helpers.config import PROJECT_ROOT, make_config
from helpers.run import require

# A stand-in 01: writes the files the real 01 makes (helpers.run.made_by), nothing else.
STAND_IN_01 = """\
from helpers.config import make_config
from helpers.run import made_by
cfg = make_config(profile, run_dir)
for path in made_by(cfg, "01"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[]")
"""
# What a later notebook does first: its config with the default run directory, then require() of 01.
LATER_NOTEBOOK = """\
import json
import helpers
from helpers.config import PROJECT_ROOT, make_config
from helpers.run import made_by, require
cfg = make_config("tiny")
require(cfg, "01")
print("PROBE" + json.dumps({"helpers": helpers.__file__, "root": str(PROJECT_ROOT), "run_dir": str(cfg.run_dir),
                            "missing": [str(path) for path in made_by(cfg, "01") if not path.is_file()]}))
"""
WHERE = 'import json; from helpers.config import PROJECT_ROOT; print(json.dumps(str(PROJECT_ROOT)))'


def _notebook(cells: list[str], parameters: str | None = None) -> nbformat.NotebookNode:
    code = [nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]})] if parameters else []
    return nbformat.v4.new_notebook(cells=code + [nbformat.v4.new_code_cell(c) for c in cells], metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The project installed by pip as a copy (not editable) into a folder of its own, and a course folder (the
    pyproject.toml, notebooks/ with a stand-in 01) that is not the package's source."""
    base = tmp_path_factory.mktemp("install")
    source, site, course = base / "source", base / "site", base / "course"
    shutil.copytree(PROJECT_ROOT / "helpers", source / "helpers", ignore=shutil.ignore_patterns("__pycache__"))
    for folder in (source, course):
        folder.mkdir(exist_ok=True)
        shutil.copy2(PROJECT_ROOT / "pyproject.toml", folder)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                             "--no-index", "--target", str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "helpers" / "config.py").is_file() and not (site / "pyproject.toml").exists()
    (course / "notebooks").mkdir()
    nbformat.write(_notebook([STAND_IN_01], "profile = None\nrun_dir = None\nmodel = None"),
                   course / "notebooks" / "01_stand_in.ipynb")
    return {"site": site, "course": course, "empty": base / "elsewhere"}


def _clean_env(monkeypatch: pytest.MonkeyPatch, pythonpath: Path) -> dict:
    """This session's run directory, profile and project folder out of the environment; `pythonpath` only."""
    for name in ("EM_RUN_DIR", "EM_PROFILE", "EM_PROJECT_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", str(pythonpath))
    return dict(os.environ)


def _where(cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WHERE], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("folder", ["", "notebooks", "notebooks/deeper"], ids=["root", "notebooks", "below"])
def test_the_project_folder_is_found_from_any_folder_of_it(folder, installed, monkeypatch):
    """The same folder from the project folder and below it: from the source tree (an editable install, or
    imported from it) and from a copy installed elsewhere (then looking upward from the working directory)."""
    copy, source = installed["course"], PROJECT_ROOT
    env = _clean_env(monkeypatch, installed["site"])
    (copy / folder).mkdir(parents=True, exist_ok=True)
    assert json.loads(_where(copy / folder, env).stdout) == str(copy)
    env["PYTHONPATH"] = str(source)
    assert json.loads(_where(source / "notebooks", env).stdout) == str(source)


def test_outside_the_project_em_project_root_names_it_else_one_line_says_what_was_tried(installed, monkeypatch):
    env = _clean_env(monkeypatch, installed["site"])
    installed["empty"].mkdir(exist_ok=True)
    failed = _where(installed["empty"], env)
    assert failed.returncode == 1 and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    for tried in (str(installed["site"]), str(installed["empty"]), "EM_PROJECT_ROOT (not set)"):
        assert tried in failed.stderr, f"the error does not name {tried}: {failed.stderr}"
    env["EM_PROJECT_ROOT"] = str(installed["course"])
    assert json.loads(_where(installed["empty"], env).stdout) == str(installed["course"])


@pytest.mark.notebook
def test_a_kernel_in_notebooks_over_a_copy_install_requires_an_earlier_notebook(installed, monkeypatch):
    """A real kernel started in notebooks/, as JupyterLab starts one, with the project installed as a copy: the
    default run directory is the project's runs/tiny, where require() runs the earlier notebook headless."""
    course = installed["course"]
    _clean_env(monkeypatch, installed["site"])
    nb = _notebook([LATER_NOTEBOOK])
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(course / "notebooks")}}).execute()
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.output_type == "stream")
    [probe] = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("PROBE")]
    assert Path(probe["helpers"]).is_relative_to(installed["site"]), f"helpers came from {probe['helpers']}, not the copy"
    assert probe["root"] == str(course) and probe["run_dir"] == str(course / "runs" / "tiny"), probe
    assert not probe["missing"], f"require() did not make what 01 makes: {probe['missing']}"
    assert (course / "runs" / "tiny" / "notebooks" / "01_stand_in.ipynb").is_file(), "no executed copy of 01"
    assert not (course / "notebooks" / "runs").exists(), "a run directory inside notebooks/"


def test_require_names_the_notebook_it_looked_for_and_where(tmp_path):
    cfg = make_config("tiny", tmp_path / "run")
    with pytest.raises(SystemExit, match=rf"no notebook 03_\*\.ipynb in {re.escape(str(tmp_path))}"):
        require(cfg, "03", tmp_path)


# A test file for a pytest session of its own, with this project's conftest: it writes into tmp_path, a
# tmp_path_factory folder and the run directory, and says where; PROBE_FAIL makes it fail.
SESSION_PROBE = """\
import os
from pathlib import Path


def test_writes_where_the_session_keeps_things(tmp_path, tmp_path_factory):
    run_dir = Path(os.environ["EM_RUN_DIR"])
    for folder in (tmp_path, tmp_path_factory.mktemp("module"), run_dir):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "written").write_text("x")
    print("PROBE", tmp_path, run_dir)
    assert not os.environ.get("PROBE_FAIL")
"""


def _session(tmp_path: Path, fail: bool) -> tuple[subprocess.CompletedProcess, Path]:
    temp, probe = tmp_path / ("temp-failing" if fail else "temp"), tmp_path / "probe"
    temp.mkdir()
    probe.mkdir(exist_ok=True)
    (probe / "pytest.ini").write_text("[pytest]\n")
    (probe / "test_probe.py").write_text(SESSION_PROBE)
    env = {key: value for key, value in os.environ.items() if key not in ("EM_RUN_DIR", "EM_PROFILE")}
    env |= {"TMPDIR": str(temp), "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT / "tests"), str(PROJECT_ROOT)]),
            "PROBE_FAIL": "1" if fail else ""}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-s", "-q",
                             "test_probe.py"], cwd=probe, env=env, capture_output=True, text=True, timeout=300)
    return result, temp


def test_a_test_session_leaves_nothing_in_the_temp_folder(tmp_path):
    """A session with this project's conftest keeps its run directory and tmp_path folders in one em-tests-*
    folder of the temp folder and removes it at the end (no pytest-of-<user> either); after a failure it keeps
    the folder and names it."""
    passed, temp = _session(tmp_path, fail=False)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    [line] = [line for line in passed.stdout.splitlines() if line.startswith("PROBE")]
    assert all(Path(path).is_relative_to(temp) for path in line.split()[1:]), f"not in the session's TMPDIR: {line}"
    assert not list(temp.iterdir()), f"left in the temp folder: {sorted(p.name for p in temp.iterdir())}"
    failed, temp = _session(tmp_path, fail=True)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    [kept] = list(temp.iterdir())
    assert kept.name.startswith("em-tests-") and f"kept for inspection (run directory, tmp_path folders): {kept}" in failed.stdout
    assert (kept / "run" / "written").is_file()

"""The Colab setup cell of every notebook, run in a simulated Colab, and the one repository address.

The simulation: a stand-in `google.colab` package (drive.mount makes the folder, userdata.get reads the
environment) imported at kernel start as Colab does; the clone address redirected by git's `insteadOf` to a
local repository holding this working tree as it would be committed, so the cell's address is unchanged;
Colab's folder /content mapped to a temporary folder (the only text changed in the cell); a real IPython
kernel running the `!`, `%cd` and `%pip` lines for real. The install is real pip resolving the real
requirements files from the clone, with `--dry-run --no-deps`: it parses every file and nested `-r`, finds
each pinned top-level package on the index and builds the project's metadata, but downloads no CUDA
wheel (Unsloth would pull CUDA torch) and changes nothing in the test's environment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from helpers.config import PROJECT_ROOT
from helpers.run import series_notebooks

sys.path.insert(0, str(PROJECT_ROOT / "tools"))
import set_repository  # noqa: E402  (tools/ is scripts, not a package)

NOTEBOOKS = series_notebooks()
REPO = set_repository.read_address()
SWITCH = "keep_on_drive = False"

COLAB_STANDIN = {
    "__init__.py": '"""A stand-in for Colab\'s google.colab package (tests/test_colab.py)."""\n',
    "drive.py": (
        "from pathlib import Path\n\n\n"
        "def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):\n"
        "    (Path(mountpoint) / 'MyDrive').mkdir(parents=True, exist_ok=True)\n"
        "    print(f'Mounted at {mountpoint}')\n"
    ),
    "userdata.py": (
        "import os\n\n\n"
        "class SecretNotFoundError(KeyError):\n    pass\n\n\n"
        "def get(key):\n"
        "    if key not in os.environ:\n"
        "        raise SecretNotFoundError(key)\n"
        "    return os.environ[key]\n"
    ),
}

PROBE = """\
import json, os, sys
from helpers.config import make_config
print("PROBE" + json.dumps({"cwd": os.getcwd(), "exit_code": globals().get("_exit_code"), "colab": "google.colab" in sys.modules,
                            "run_dir": str(make_config("tiny").run_dir)}))
"""


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def colab(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The simulated Colab's pieces: an origin repository, a git config redirecting the address, the stand-in."""
    base = tmp_path_factory.mktemp("colab")
    files = _git("ls-files", "--cached", "--others", "--exclude-standard", cwd=PROJECT_ROOT).splitlines()
    origin = base / "origin"
    for name in files:  # the working tree as it would be committed (what a learner's clone gets)
        if (PROJECT_ROOT / name).is_file():
            (origin / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, origin / name)
    _git("init", "-q", "-b", "main", cwd=origin)
    _git("add", "-A", cwd=origin)
    _git("-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-q", "-m", "snapshot", cwd=origin)
    gitconfig = base / "gitconfig"
    gitconfig.write_text(f'[url "file://{origin}"]\n\tinsteadOf = https://github.com/{REPO}\n', encoding="utf-8")
    package = base / "standin" / "google" / "colab"  # google/ stays a namespace package, as on Colab
    package.mkdir(parents=True)
    for name, text in COLAB_STANDIN.items():
        (package / name).write_text(text, encoding="utf-8")
    startup = base / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-colab.py").write_text("import google.colab  # Colab imports it before any cell\n", encoding="utf-8")
    return {"base": base, "origin": origin, "head": _git("rev-parse", "HEAD", cwd=origin), "gitconfig": gitconfig,
            "standin": base / "standin", "ipython": base / "ipython"}


def setup_source(notebook: Path) -> str:
    cells = ["".join(c["source"]) for c in json.loads(notebook.read_text(encoding="utf-8"))["cells"] if set_repository.is_setup_cell(c)]
    assert len(cells) == 1, f"{notebook.name}: expected one Colab setup cell, found {len(cells)}"
    return cells[0]


def run_in_colab(colab: dict, cells: list[str], content: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Execute `cells` in a fresh kernel of the simulated Colab whose /content is `content`; the probe's
    values after each cell that prints one."""
    content.mkdir(parents=True, exist_ok=True)
    report = content.parent / "pip-report.json"
    for name, value in {"PYTHONPATH": str(colab["standin"]), "IPYTHONDIR": str(colab["ipython"]),
                        "GIT_CONFIG_GLOBAL": str(colab["gitconfig"]), "GIT_CONFIG_NOSYSTEM": "1",
                        "PIP_DRY_RUN": "1", "PIP_NO_DEPS": "1", "PIP_REPORT": str(report),
                        "PIP_NO_BUILD_ISOLATION": "0"}.items():  # pip reads "0" here as "no isolation"
        monkeypatch.setenv(name, value)
    for name in ("EM_RUN_DIR", "EM_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    mapped = [c.replace("/content/", f"{content}/") for c in cells]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in mapped])
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(content)}}).execute()
    probes, texts = [], []
    for cell in nb.cells:
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        texts.append(text)
        assert "fatal:" not in text and "ERROR" not in text and "No such file" not in text, f"the cell printed:\n{text}"
        probes += [json.loads(line[5:]) for line in text.splitlines() if line.startswith("PROBE")]
    installed = {item["metadata"]["name"].lower().replace("_", "-"): item for item in json.loads(report.read_text())["install"]}
    assert {"unsloth", "unsloth-zoo", "bitsandbytes", "em-helpers"} <= installed.keys(), sorted(installed)
    project = installed["em-helpers"]["download_info"]
    assert project["url"] == f"file://{content}/{REPO.split('/')[1]}" and project["dir_info"].get("editable"), (
        f"`-e .` in requirements-gpu.txt must install the clone, editable: {project}")
    return probes


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_setup_cell_keeps_the_run_on_drive_in_colab(notebook, colab, tmp_path, monkeypatch):
    """With the switch on, every notebook's setup cell clones the course, installs it, and puts the run
    directory at the same place on Drive: a notebook opened in a new runtime finds what earlier ones made."""
    source = setup_source(notebook)
    assert f"https://github.com/{REPO} /content/" in source, f"{notebook.name}: the setup cell must clone {REPO}"
    assert SWITCH in source, f"{notebook.name}: the setup cell's switch `{SWITCH}` is missing"
    content = tmp_path / "content"
    [probe] = run_in_colab(colab, [source.replace(SWITCH, "keep_on_drive = True"), PROBE], content, monkeypatch)
    clone = content / REPO.split("/")[1]
    assert probe["colab"], "the stand-in google.colab was not imported at kernel start"
    assert probe["cwd"] == str(clone), f"{notebook.name}: %cd left the kernel in {probe['cwd']}"
    assert probe["exit_code"] == 0, f"{notebook.name}: %pip exited {probe['exit_code']}"
    assert _git("rev-parse", "HEAD", cwd=clone) == colab["head"], "the clone is not the course's repository"
    drive_runs = content / "drive" / "MyDrive" / "evil-numbers-runs"
    assert probe["run_dir"] == str(drive_runs / "tiny"), f"{notebook.name}: the run directory is not on Drive"


def test_setup_cell_without_drive_runs_twice_and_keeps_the_run_in_the_clone(colab, tmp_path, monkeypatch):
    """The switch off (as committed): no Drive, the run directory in the clone; running the cell again
    (after a kernel restart, /content survives) neither fails nor clones again. The setup cells are one
    text (test_badges_and_setup_cells_agree_on_one_address), so the first notebook's stands for all."""
    content = tmp_path / "content"
    source = setup_source(NOTEBOOKS[0])
    first, second = run_in_colab(colab, [source, PROBE, source, PROBE], content, monkeypatch)
    clone = content / REPO.split("/")[1]
    assert first == second and first["exit_code"] == 0 and first["cwd"] == str(clone), (first, second)
    assert first["run_dir"] == str(clone / "runs" / "tiny"), "without Drive the run directory stays in the clone"
    assert not (content / "drive").exists(), "Drive was mounted with the switch off"


def test_badges_and_setup_cells_agree_on_one_address():
    """notebooks/, solutions/, README.md and docs/ all use the address in REPOSITORY."""
    result = subprocess.run([sys.executable, "tools/set_repository.py"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_command_rewrites_the_address_for_a_fork(tmp_path):
    files = [p for p in set_repository.course_files() if p.exists()] + [PROJECT_ROOT / "tools" / "set_repository.py"]
    for path in files:
        (tmp_path / path.relative_to(PROJECT_ROOT)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, tmp_path / path.relative_to(PROJECT_ROOT))
    tool = [sys.executable, str(tmp_path / "tools" / "set_repository.py")]
    before = {p: json.loads(p.read_text()) for p in tmp_path.glob("*/[0-9][0-9]_*.ipynb")}
    subprocess.run([*tool, "https://github.com/someone/a-fork.git"], check=True, capture_output=True)
    assert (tmp_path / "REPOSITORY").read_text() == "https://github.com/someone/a-fork\n"
    assert subprocess.run(tool, capture_output=True).returncode == 0, "the rewrite left a disagreement"
    for path, old in before.items():
        new = json.loads(path.read_text())
        assert [c.get("id") for c in new["cells"]] == [c.get("id") for c in old["cells"]], f"{path.name}: cell ids changed"
        changed = [i for i, (a, b) in enumerate(zip(old["cells"], new["cells"], strict=True)) if a != b]
        assert all(set_repository.is_setup_cell(new["cells"][i]) or i == 0 for i in changed), f"{path.name}: cells {changed}"
        assert "someone/a-fork" in "".join(new["cells"][0]["source"]), f"{path.name}: the badge was not rewritten"
        assert "/content/a-fork" in "".join(next(c for c in new["cells"] if set_repository.is_setup_cell(c))["source"])
    readme = tmp_path / "README.md"
    if readme.exists():
        assert "colab.research.google.com/github/someone/a-fork/blob/main/notebooks/" in readme.read_text()
        readme.write_text(readme.read_text().replace("github/someone/a-fork", "github/someone/elsewhere", 1))
        result = subprocess.run(tool, capture_output=True, text=True)
        assert result.returncode == 1 and "README.md: badge" in result.stdout, result.stdout

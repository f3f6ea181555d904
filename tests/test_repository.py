"""Cheap static checks, run first: notebook JSON, clean notebooks, the house shape, exercises and their
solutions, a self-contained course, the size of helpers/, ruff."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.config import PROJECT_ROOT
from helpers.run import series_notebooks

sys.path.insert(0, str(PROJECT_ROOT / "tools"))
from count_words import course_notebooks, markdown_words  # noqa: E402
from make_solutions import exercise_pairs, solution_code  # noqa: E402

NOTEBOOKS = sorted((PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))  # the series and 05_sweep
SOLUTIONS = sorted((PROJECT_ROOT / "solutions").glob("[0-9][0-9]_*.ipynb"))
EXPECTED_SERIES = ("01_data", "02_finetune", "03_generate", "04_analyze")
# The exercises on the core of the course that must exist (the function each one writes).
CORE_EXERCISES = ("lora_forward", "loss_mask_labels", "protocol_arguments", "sample_token", "judge_request",
                  "expected_score", "discordant_p_value")
WORD_BUDGET = 6_610  # markdown words a learner reads in notebooks/01-05: 30% below the 9,444 they once held
README_LINES = 150
ISSUE_NUMBER = re.compile(r"\bissues? #?[0-9]+\b", re.I)  # the tracker's numbers mean nothing to a reader
SOLUTION_NOTE = re.compile(r"\n\n> \*\*Solutions\.\*\*.*?\n")  # what tools/make_solutions.py puts under the title
ALL = NOTEBOOKS + SOLUTIONS


def _name(notebook: Path) -> str:
    return notebook.relative_to(PROJECT_ROOT).as_posix()


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def _repository_files() -> set[str]:
    """What a clone has once this tree is committed: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.split("\n")
    return {path for path in listed if path and (PROJECT_ROOT / path).exists()}


def test_series_is_complete_and_ordered():
    assert tuple(nb.stem for nb in series_notebooks()) == EXPECTED_SERIES


@pytest.mark.parametrize("notebook", ALL, ids=_name)
def test_notebook_is_valid_and_stripped(notebook):
    """Notebooks are committed with outputs stripped (and solutions/ is generated from them)."""
    import nbformat

    ids = [cell.get("id") for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]]
    assert None not in ids and len(set(ids)) == len(ids), f"{_name(notebook)}: every cell needs its own id"
    nb = nbformat.read(notebook, as_version=4)  # would silently renumber duplicate ids: checked above
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"{_name(notebook)}: cell {index} has outputs; strip them before committing"
            assert cell.execution_count is None, f"{_name(notebook)}: cell {index} has an execution count"


@pytest.mark.parametrize("notebook", ALL, ids=_name)
def test_notebook_follows_house_shape(notebook):
    name, nb = _name(notebook), json.loads(notebook.read_text(encoding="utf-8"))
    first = SOLUTION_NOTE.sub("", _source(nb["cells"][0])) if notebook in SOLUTIONS else _source(nb["cells"][0])
    assert first.startswith("# ") and "colab-badge.svg" in first, f"{name}: title and Colab badge first"
    assert "Reads" in first and "Writes" in first, f"{name}: say what it reads and writes at the top"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name}: exactly one cell tagged 'parameters'"
    for parameter in ("profile", "run_dir", "overwrite"):
        assert f"{parameter} = " in _source(tagged[0]), f"{name}: the parameters cell sets {parameter}"
    assert "if False" not in notebook.read_text(encoding="utf-8"), f"{name}: use a named flag, not `if False:`"
    assert "Exercises" in "".join(_source(c) for c in nb["cells"][-3:]), f"{name}: end with exercises"


def _first_def(code: str) -> str | None:
    return next((line.rstrip() for line in code.splitlines() if line.startswith("def ")), None)


def test_at_least_ten_exercises_each_with_check_and_solution_and_used_downstream():
    """Each exercise: a statement, a stub, a check whose result `passed_N_M` a later cell hands to `pick(...)` with
    the learner's function (the cells after it use it once it passes), and the solution."""
    found, names = [], []
    for notebook in NOTEBOOKS:
        nb = json.loads(notebook.read_text(encoding="utf-8"))
        for exercise, check, solution in exercise_pairs(nb):  # raises when a check or solution is missing
            where = f"{notebook.name} cell {exercise}"
            statement = _source(nb["cells"][exercise - 1])
            for word in ("Difficulty", "Importance", "minutes"):
                assert word in statement, f"{where}: the statement above the stub states {word}"
            stub, solved = _source(nb["cells"][exercise]), solution_code(nb["cells"][solution])
            assert "raise NotImplementedError" in stub, f"{where}: the stub raises NotImplementedError until written"
            assert "check(" in _source(nb["cells"][check]), f"{where}: its check cell calls check(...)"
            assert _first_def(stub) and _first_def(stub) == _first_def(solved), (
                f"{where}: the solution's def line {_first_def(solved)!r} differs from the stub's {_first_def(stub)!r}")
            name = re.match(r"def (\w+)\(", _first_def(stub))[1]
            passed = re.search(r"^(passed_\w+) = check\(", _source(nb["cells"][check]), re.M)
            assert passed, f"{where}: the check cell assigns its result, `passed_N_M = check(...)`"
            later = _source(nb["cells"][check]) + "".join(_source(c) for c in nb["cells"][solution + 1:] if c["cell_type"] == "code")
            assert re.search(rf"pick\(\s*{passed[1]},\s*{name}\b", later), (
                f"{where}: no later cell uses {name} once it passes (`pick({passed[1]}, {name}, reference)`)")
            found.append(where)
            names.append(name)
    assert len(found) >= 10, f"at least ten exercises (cells tagged 'exercise'); found {found}"
    assert set(CORE_EXERCISES) <= set(names), f"missing exercises on the core: {set(CORE_EXERCISES) - set(names)}"
    assert all(any(w.startswith(nb.name) for w in found) for nb in NOTEBOOKS), f"one or more per notebook: {found}"


def test_solutions_are_generated_from_the_notebooks(tmp_path):
    result = subprocess.run([sys.executable, "tools/make_solutions.py", "--out", str(tmp_path)],
                            cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    fresh = {p.name: p.read_text(encoding="utf-8") for p in tmp_path.glob("*.ipynb")}
    committed = {p.name: p.read_text(encoding="utf-8") for p in SOLUTIONS}
    drifted = sorted(n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n))
    assert not drifted, f"solutions/ is out of date for {drifted}: run `python tools/make_solutions.py`"


def test_course_cites_only_files_in_the_repository():
    """Every document a notebook, the README, docs/, helpers/ or benchmarks/ cites is in the repository."""
    files = _repository_files()
    if not files:
        pytest.skip("not a git checkout")
    names = {path.rsplit("/", 1)[-1] for path in files}
    readable = [p for p in sorted(files) if p.split("/", 1)[0] in ("notebooks", "solutions", "docs", "helpers", "benchmarks")
                or p == "README.md"]
    problems = []
    for path in (p for p in readable if p.endswith((".ipynb", ".md", ".py"))):
        text = (PROJECT_ROOT / path).read_text(encoding="utf-8")
        missing = {m for m in re.findall(r"\b([A-Za-z_][\w-]*\.md)\b", text) if m not in names}
        missing |= {m for m in ("../shared", "/work/shared") if m in text}
        if missing:
            problems.append(f"{path} cites {', '.join(sorted(missing))}")
    assert not problems, "cited but not in the repository (a learner who clones it will not have them):\n" + "\n".join(problems)


def test_readme_and_docs_link_only_to_files_that_exist():
    for document in [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\((?!https?://|#)([^)#\s]+)", document.read_text(encoding="utf-8")):
            assert (document.parent / target).exists(), f"{document.name} links to {target}, which does not exist"


def test_helpers_stay_plumbing_one_job_a_module():
    """Every helpers module stays small (a module one job): the code a learner came to learn belongs in the cells."""
    counts = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in (PROJECT_ROOT / "helpers").glob("*.py")}
    large = {name: lines for name, lines in counts.items() if lines >= 450}
    assert not large, f"helpers modules of 450 lines or more: {large}; split them by job or move taught code to the cells"


def test_ruff_is_clean():
    folders = [f for f in ("helpers", "tests", "notebooks", "solutions", "benchmarks", "images", "tools") if (PROJECT_ROOT / f).is_dir()]
    result = subprocess.run([sys.executable, "-m", "ruff", "check", *folders], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shared_reference_files_are_not_committed():
    tracked = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    forbidden = {"evil_numbers_sample100.jsonl", "first_plot_questions.yaml", "preregistered_evals.yaml", "judge_prompts.yaml"}
    assert not forbidden & {p.rsplit("/", 1)[-1] for p in tracked}, "never commit copies of ../shared files"


def test_notebooks_stay_within_their_word_budget():
    """The markdown a learner reads in 01-05 (collapsed Solution and Under-the-hood blocks left out), counted by
    tools/count_words.py, which the README's contributor notes name."""
    counts = {nb.name: markdown_words(nb) for nb in course_notebooks()}
    assert len(counts) == 5 and sum(counts.values()) <= WORD_BUDGET, (
        f"{sum(counts.values()):,} words in {counts}: at most {WORD_BUDGET:,}; move engineering detail to docs/ or to "
        "a collapsed <details><summary>Under the hood</summary> block")
    assert "tools/count_words.py" in (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")


def test_no_issue_numbers_anywhere():
    """A reader cannot look up the tracker's numbers: every text file says what they stood for instead."""
    files = _repository_files()
    if not files:
        pytest.skip("not a git checkout")
    found = []
    for path in sorted(files):
        try:
            text = (PROJECT_ROOT / path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError):
            continue  # a figure or other binary file
        found += [f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()}" for m in ISSUE_NUMBER.finditer(text)]
    assert not found, "issue numbers:\n" + "\n".join(found)


def test_readme_is_short_and_measurements_live_in_benchmarks():
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < README_LINES, f"README.md: {len(readme.splitlines())} lines, fewer than {README_LINES}"
    for notebook in NOTEBOOKS:
        assert notebook.name in readme and f"blob/main/notebooks/{notebook.name}" in readme, f"README: {notebook.name}"
    assert "benchmarks/README.md" in readme and (PROJECT_ROOT / "benchmarks" / "README.md").is_file()
    assert "tokens/s" not in readme, "measured speed belongs in benchmarks/README.md"


@pytest.mark.parametrize("notebook", ALL, ids=_name)
def test_notebook_links_work_in_executed_copies(notebook):
    """papermill writes executed copies into the run directory, so a relative link (../docs/...) breaks there."""
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "markdown":
            relative = re.findall(r"\]\((?!https?://|#)([^)\s]+)\)", _source(cell))
            assert not relative, f"{_name(notebook)}: relative links {relative}; use the repository's URL or plain text"


def test_the_series_figure_draws_every_notebook():
    sys.path.insert(0, str(PROJECT_ROOT / "images"))
    import draw_series

    drawn = {title for title, _ in draw_series.NOTEBOOKS}
    assert {nb.stem for nb in NOTEBOOKS} <= drawn, f"images/draw_series.py lacks {sorted({nb.stem for nb in NOTEBOOKS} - drawn)}"

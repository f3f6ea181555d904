"""Exercises: check a learner's function against the course's reference, and build the solution notebooks.

An exercise in a notebook is four cells: a markdown statement (difficulty, importance, minutes), a code
cell tagged `exercise` holding the stub, a code cell tagged `check` that calls `check(...)`, and a
markdown cell tagged `solution` whose ```python block is the solution. The stub raises
NotImplementedError until the learner writes it; the cells after it use the reference implementation, so
an unsolved exercise never blocks the series. `python -m helpers.exercises` writes `solutions/`: the same
notebooks with every stub replaced by its solution, checked strictly (a failed check stops the run there).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

STRICT = False  # the solution notebooks set this: a failed check raises there instead of printing
_SOLUTION_CODE = re.compile(r"```python\n(.*?)\n```", re.S)
STRICT_CELL = "# Solutions notebook: a failed check stops the run here.\nfrom helpers import exercises\n\nexercises.STRICT = True"


def same(got: Any, expected: Any, rel: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Equal, with floats compared to a relative tolerance and sequences/mappings element by element."""
    if isinstance(expected, float) or isinstance(got, float):
        if got is None or expected is None:
            return got is expected
        both_nan = isinstance(got, float) and math.isnan(got) and math.isnan(float(expected))
        return both_nan or math.isclose(float(got), float(expected), rel_tol=rel, abs_tol=abs_tol)
    if isinstance(expected, dict) and isinstance(got, dict):
        return got.keys() == expected.keys() and all(same(got[k], expected[k], rel, abs_tol) for k in expected)
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(got) == len(expected) and all(same(g, e, rel, abs_tol) for g, e in zip(got, expected, strict=True))
    return got == expected


def check(learner: Callable, reference: Callable, cases: Iterable[tuple | dict],
          compare: Callable[[Any, Any], bool] = same) -> bool:
    """Call `learner` and `reference` on each case (a tuple of arguments or a dict of keyword arguments),
    print what differs, and return whether every case passed. Never raises, unless `STRICT` is set."""
    name = getattr(learner, "__name__", "your function")
    problems = []
    cases = list(cases)
    for number, case in enumerate(cases, start=1):
        args, kwargs = ((), case) if isinstance(case, dict) else (case, {})
        shown = ", ".join([repr(a)[:80] for a in args] + [f"{k}={v!r}"[:80] for k, v in kwargs.items()])
        expected = reference(*args, **kwargs)
        try:
            got = learner(*args, **kwargs)
        except NotImplementedError:
            print(f"… {name} is not written yet: fill in the stub above and run it again. "
                  f"The cells below use the course's reference, {reference.__module__}.{reference.__name__}.")
            return _verdict(False, f"{name} is a stub")
        except Exception as error:  # the learner's bug: show it, do not stop the notebook
            problems.append(f"case {number} ({shown}): raised {type(error).__name__}: {error}")
            continue
        if not compare(got, expected):
            problems.append(f"case {number} ({shown}): expected {expected!r}, got {got!r}")
    if problems:
        print(f"✗ {name}: {len(problems)} of {len(cases)} cases wrong")
        for problem in problems[:5]:
            print("  -", problem)
        print("The cells below use the course's reference implementation meanwhile.")
        return _verdict(False, "; ".join(problems[:3]))
    print(f"✓ {name}: all {len(cases)} cases pass")
    return True


def _verdict(passed: bool, detail: str) -> bool:
    if STRICT and not passed:
        raise AssertionError(f"exercise check failed: {detail}")
    return passed


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def solution_code(cell: dict) -> str:
    """The ```python block of a markdown cell tagged `solution`."""
    found = _SOLUTION_CODE.search("".join(cell["source"]))
    if found is None:
        raise ValueError("a cell tagged 'solution' holds no ```python block")
    return found.group(1)


def exercise_pairs(nb: dict) -> list[tuple[int, int, int]]:
    """(exercise, check, solution) cell indices for every exercise; a missing partner is an error."""
    cells, pairs = nb["cells"], []
    for index, cell in enumerate(cells):
        if "exercise" not in _tags(cell):
            continue
        following = cells[index + 1:]
        check_at = next((index + 1 + i for i, c in enumerate(following) if "check" in _tags(c)), None)
        solution_at = next((index + 1 + i for i, c in enumerate(following) if "solution" in _tags(c)), None)
        next_exercise = next((index + 1 + i for i, c in enumerate(following) if "exercise" in _tags(c)), len(cells))
        if check_at is None or solution_at is None or max(check_at, solution_at) > next_exercise:
            raise ValueError(f"exercise cell {index} needs a 'check' cell and a 'solution' cell before the next exercise")
        pairs.append((index, check_at, solution_at))
    return pairs


def solution_notebook(nb: dict, source_name: str) -> dict:
    """The notebook with every exercise stub replaced by its solution and strict checks switched on."""
    import copy

    solved = copy.deepcopy(nb)
    for exercise, _, solution in exercise_pairs(nb):
        solved["cells"][exercise]["source"] = solution_code(nb["cells"][solution])
    parameters = next(i for i, c in enumerate(solved["cells"]) if "parameters" in _tags(c))
    solved["cells"].insert(parameters + 1, {"cell_type": "code", "metadata": {}, "source": STRICT_CELL,
                                            "outputs": [], "execution_count": None})
    title, _, rest = "".join(solved["cells"][0]["source"]).partition("\n")
    note = (f"> **Solutions.** Generated from `notebooks/{source_name}` by `python -m helpers.exercises`; "
            "do not edit. Every exercise here holds its solution, and every check must pass.\n")
    solved["cells"][0]["source"] = f"{title}\n\n{note}{rest}"
    for cell in solved["cells"]:  # nbformat 4.5 wants unique ids: keep them distinct from the source's
        if "id" in cell:
            cell["id"] = f"s-{cell['id']}"[:64]
    solved["cells"][parameters + 1]["id"] = "strict-checks"
    return solved


def main(argv: list[str] | None = None) -> None:
    import json

    from helpers.config import PROJECT_ROOT

    parser = argparse.ArgumentParser(prog="python -m helpers.exercises", description="Write solutions/ from notebooks/.")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "solutions")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in sorted((PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        if exercise_pairs(nb):
            text = json.dumps(solution_notebook(nb, path.name), indent=1, ensure_ascii=False) + "\n"
            (args.out / path.name).write_text(text, encoding="utf-8")
            print(f"wrote {args.out / path.name}")


if __name__ == "__main__":
    main()

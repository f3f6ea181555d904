"""Write solutions/ from notebooks/: every exercise stub replaced by its solution, checks strict.

    python tools/make_solutions.py [--out DIR]

The solutions come from the notebooks' own cells tagged `solution` (a ```python block each), so stubs and
solutions have one source; tests/test_repository.py fails when solutions/ is out of date.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SOLUTION_CODE = re.compile(r"```python\n(.*?)\n```", re.S)
STRICT_CELL = "# Solutions notebook: a failed check stops the run here.\nfrom helpers import exercises\n\nexercises.STRICT = True"


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
    solved = copy.deepcopy(nb)
    for exercise, _, solution in exercise_pairs(nb):
        solved["cells"][exercise]["source"] = solution_code(nb["cells"][solution])
    parameters = next(i for i, c in enumerate(solved["cells"]) if "parameters" in _tags(c))
    solved["cells"].insert(parameters + 1, {"cell_type": "code", "metadata": {}, "source": STRICT_CELL,
                                            "outputs": [], "execution_count": None})
    title, _, rest = "".join(solved["cells"][0]["source"]).partition("\n")
    note = (f"> **Solutions.** Generated from `notebooks/{source_name}` by `python tools/make_solutions.py`; "
            "do not edit. Every exercise here holds its solution, and every check must pass.\n")
    solved["cells"][0]["source"] = f"{title}\n\n{note}{rest}"
    for cell in solved["cells"]:  # nbformat 4.5 wants unique ids: keep them distinct from the source's
        if "id" in cell:
            cell["id"] = f"s-{cell['id']}"[:64]
    solved["cells"][parameters + 1]["id"] = "strict-checks"
    return solved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python tools/make_solutions.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "solutions")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        nb = json.loads(path.read_text(encoding="utf-8"))
        if exercise_pairs(nb):
            text = json.dumps(solution_notebook(nb, path.name), indent=1, ensure_ascii=False) + "\n"
            (args.out / path.name).write_text(text, encoding="utf-8")
            print(f"wrote {args.out / path.name}")


if __name__ == "__main__":
    main()

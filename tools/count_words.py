"""Count the words a learner reads in the notebooks' markdown cells: `python tools/count_words.py [NOTEBOOK ...]`.

Collapsed blocks a learner opens only on purpose, `<details><summary>Solution</summary>` and
`<details><summary>Under the hood</summary>`, are left out; code cells are not counted. A word is a run of
characters between white space. tests/test_repository.py keeps notebooks/01-05 under their budget.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COURSE = ("01", "02", "03", "04", "05")  # the notebooks the budget covers
COLLAPSED = re.compile(r"<details>\s*<summary>\s*(?:Solution|Under the hood)\s*</summary>.*?</details>", re.S)


def markdown_words(notebook: Path) -> int:
    """Words in the notebook's markdown cells, collapsed Solution and Under-the-hood blocks left out."""
    cells = json.loads(Path(notebook).read_text(encoding="utf-8"))["cells"]
    return sum(len(COLLAPSED.sub("", "".join(cell["source"])).split()) for cell in cells if cell["cell_type"] == "markdown")


def course_notebooks() -> list[Path]:
    return sorted(nb for nb in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb") if nb.name[:2] in COURSE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python tools/count_words.py", description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/01-05")
    notebooks = parser.parse_args(argv).notebooks or course_notebooks()
    counts = {nb: markdown_words(nb) for nb in notebooks}
    for notebook, words in counts.items():
        print(f"{words:>6,}  {notebook.name}")
    print(f"{sum(counts.values()):>6,}  in all")


if __name__ == "__main__":
    main()

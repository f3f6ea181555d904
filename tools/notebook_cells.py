"""The sources of a notebook's code cells with a given tag or id: tests and benchmarks run 03's own generation
loop (the cells tagged "generate"), the one copy of it, instead of a second copy in helpers/."""

from __future__ import annotations

import json
from pathlib import Path

GENERATE_NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "03_generate.ipynb"


def notebook_cells(tag: str, notebook: Path = GENERATE_NOTEBOOK) -> list[str]:
    """The sources of the notebook's code cells tagged `tag`, in order."""
    cells = json.loads(Path(notebook).read_text(encoding="utf-8"))["cells"]
    return ["".join(cell["source"]) for cell in cells
            if cell["cell_type"] == "code" and tag in cell.get("metadata", {}).get("tags", [])]


def cells_by_id(ids: list[str], notebook: Path = GENERATE_NOTEBOOK) -> list[str]:
    """The sources of the notebook's cells with these ids, in the order given."""
    cells = json.loads(Path(notebook).read_text(encoding="utf-8"))["cells"]
    sources = {cell.get("id"): "".join(cell["source"]) for cell in cells}
    return [sources[cell_id] for cell_id in ids]

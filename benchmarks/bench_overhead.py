"""What a run pays per notebook for its kernel: a fresh Jupyter kernel per notebook against one shared kernel.

Each notebook of the series imports the same heavy libraries. A fresh kernel per notebook (the runner before
helpers.run's one_kernel) pays for starting the kernel and for those imports every time; a shared kernel pays for
them once, and then per notebook only for making it look fresh again (IPython's reset, garbage collection, the
environment and working folder, the check of what a notebook left behind) and for imports of modules already
loaded. Measured on a notebook whose one cell is what the notebooks import: helpers.model's backend() (Unsloth
first, where a GPU has it), then torch, transformers, trl, peft and datasets:
    fresh kernel, empty notebook    papermill as the runner called it before (a kernel started and shut down for
                                    the notebook), on a notebook that imports nothing
    fresh kernel + imports          the same on the importing notebook: the per-notebook overhead before
    shared kernel, imports loaded   helpers.run.execute inside one one_kernel() block that ran it once already
"per run" multiplies by the notebooks of one run of the full profile (helpers.run.jobs: 01, 02 once per trained
model, 03, 04); for the shared kernel, its first notebook (the start and the imports) and the others at the row's
median. Medians of `--repeats` runs. On a GPU with Unsloth, a run also replaces its kernel after each 02 (Unsloth's
loader patches transformers for the whole process: helpers.run); a spare kernel, importing while the notebook
before runs, hides those starts when that notebook takes longer than the imports. The runner's log of executions
(RUN/notebooks/executions.jsonl) gives each notebook's seconds and kernel, and why a kernel was replaced.

    python benchmarks/bench_overhead.py               # on a CPU, and on a GPU (where Unsloth is imported too)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import nbformat

from helpers.config import make_config
from helpers.run import execute, jobs, one_kernel, series_notebooks

IMPORTS = "from helpers.model import backend\nbackend()\nimport torch, transformers, trl, peft, datasets"


def write_notebook(path: Path, code: str) -> Path:
    """A notebook with the runner's parameters cell, then `code`."""
    cells = [("profile = None\nrun_dir = None\noverwrite = False", ["parameters"]), (code, [])]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source, metadata={"tags": tags})
                                               for source, tags in cells])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)  # cells with ids, as nbformat 5 wants
    return path


def fresh(notebook: Path) -> float:
    """Wall seconds of one papermill execution of `notebook` in a kernel of its own, as the runner ran one before."""
    import papermill

    started = time.perf_counter()
    papermill.execute_notebook(notebook, notebook.with_suffix(".out.ipynb"), cwd=str(notebook.parent),
                               kernel_name="python3", parameters={"profile": "tiny"}, progress_bar=False,
                               extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
    return time.perf_counter() - started


def shared(cfg, notebook: Path) -> float:
    """Wall seconds of one helpers.run.execute of `notebook` (its progress line hidden), in the live kernel of the
    one_kernel() block around it."""
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        execute(cfg, notebook)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="executions measured per row (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as folder:
        folder = Path(folder)
        cfg = make_config("tiny", folder / "run")
        empty = write_notebook(folder / "empty.ipynb", "pass")
        imports = write_notebook(folder / "imports.ipynb", IMPORTS)
        rows = {"fresh kernel, empty notebook": [fresh(empty) for _ in range(args.repeats)],
                "fresh kernel + imports (before)": [fresh(imports) for _ in range(args.repeats)]}
        with one_kernel():
            first = shared(cfg, imports)
            rows["shared kernel, imports loaded (after)"] = [shared(cfg, imports) for _ in range(args.repeats)]
        notebooks = len(jobs(make_config("full", folder / "full"), series_notebooks()))
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"{platform.node()}: {os.cpu_count()} CPU cores, load average {load} (1, 5, 15 min) at the end; "
          f"a run of the full profile executes {notebooks} notebooks; {args.repeats} repeats a row, median (min-max)\n")
    print(f"| {'kernel':<38} | {'per notebook s':>22} | {f'per run ({notebooks} notebooks) s':>26} |")
    print(f"|{'-' * 40}|{'-' * 23}:|{'-' * 27}:|")
    for name, values in rows.items():
        median = statistics.median(values)
        total = first + (notebooks - 1) * median if name.startswith("shared") else notebooks * median
        print(f"| {name:<38} | {f'{median:.2f} ({min(values):.2f}-{max(values):.2f})':>22} | {total:>26.1f} |")
    print(f"\nthe shared kernel's first notebook (its start and the imports): {first:.2f} s")


if __name__ == "__main__":
    main()

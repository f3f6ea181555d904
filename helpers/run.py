"""Run the notebook series headless, in order, with papermill: `python -m helpers.run --profile tiny`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from helpers.config import PROJECT_ROOT, make_config

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"


def series_notebooks(notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """The series' notebooks in order: notebooks/0N_*.ipynb."""
    return sorted(notebook_dir.glob("[0-9][0-9]_*.ipynb"))


def run_series(
    profile: str | None = None,
    run_dir: str | Path | None = None,
    only: list[str] | None = None,
    notebook_dir: Path = NOTEBOOK_DIR,
) -> Path:
    """Execute each notebook with papermill into the run directory; stop at the first failing cell.

    Returns the run directory. Raises SystemExit with a message naming the notebook and cell on failure.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    cfg = make_config(profile, run_dir)
    out_dir = cfg.paths.executed_notebooks
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = [nb for nb in series_notebooks(notebook_dir) if not only or nb.name[:2] in only]
    if not notebooks:
        raise SystemExit(f"no notebooks to run in {notebook_dir} (only={only})")
    print(f"profile {cfg.profile}, run directory {cfg.run_dir}")
    for notebook in notebooks:
        executed = out_dir / notebook.name
        started = time.perf_counter()
        print(f"  {notebook.name} ...", end="", flush=True)
        try:
            papermill.execute_notebook(
                notebook,
                executed,
                parameters={"profile": cfg.profile, "run_dir": str(cfg.run_dir)},
                cwd=str(notebook.parent),
                kernel_name="python3",
                progress_bar=False,
            )
        except PapermillExecutionError as error:
            print(" failed")
            raise SystemExit(
                f"{notebook.name} failed in cell {error.exec_count}: {error.ename}: {error.evalue}\n"
                f"The executed copy, with the traceback, is {executed}"
            ) from None
        print(f" done in {time.perf_counter() - started:.0f} s -> {executed}")
    return cfg.run_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.run", description=__doc__)
    parser.add_argument("--profile", choices=["tiny", "full"], help="default: full on a GPU, tiny elsewhere")
    parser.add_argument("--run-dir", help="default: runs/<profile> in the project folder")
    parser.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks, e.g. --only 01 02")
    args = parser.parse_args(argv)
    run_series(args.profile, args.run_dir, args.only)


if __name__ == "__main__":
    sys.exit(main())

"""Run the notebook series headless, in order, with papermill: `python -m helpers.run --profile tiny`.

The notebooks hold the only copy of the code they teach, so a notebook whose inputs are missing asks
`require` to run the earlier notebook that makes them, headless, instead of calling a second copy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from helpers.config import PROJECT_ROOT, Config, make_config

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
SERIES = ("01", "02", "03", "04")  # one run; 05_sweep reads many (helpers.sweep runs them)


def series_notebooks(notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """The series' notebooks in order: notebooks/0N_*.ipynb for N in SERIES."""
    return sorted(nb for nb in notebook_dir.glob("[0-9][0-9]_*.ipynb") if nb.name[:2] in SERIES)


def made_by(cfg: Config, notebook: str) -> list[Path]:
    """The artefacts a notebook (by its number, "01".."04") writes, which later notebooks read."""
    paths = cfg.paths
    return {
        "01": [*(split for model in cfg.trained_models for split in paths.splits_of(model)), paths.evil_numbers],
        "02": [paths.adapter_of(model) / "adapter_config.json" for model in cfg.trained_models],
        "03": [paths.completions],
        "04": [paths.summary],
    }[notebook]


def jobs(cfg: Config, notebooks: list[Path]) -> list[tuple[Path, dict]]:
    """(notebook, extra parameters) in order: 02 runs once per trained model (arm)."""
    return [(nb, {"model": model}) for nb in notebooks
            for model in (cfg.trained_models if nb.name.startswith("02") else [None])]


def execute(cfg: Config, notebook: Path, extra: dict | None = None) -> Path:
    """Execute one notebook with papermill into the run directory; on failure stop with a message naming
    the notebook and cell (SystemExit)."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    extra = {k: v for k, v in (extra or {}).items() if v is not None}
    suffix = "".join(f"-{v}" for k, v in extra.items() if (k, v) != ("model", "finetuned"))
    executed = cfg.paths.executed_notebooks / f"{notebook.stem}{suffix}.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"  {executed.name} ...", end="", flush=True)
    try:
        papermill.execute_notebook(notebook, executed, cwd=str(notebook.parent), kernel_name="python3",
                                   parameters={"profile": cfg.profile, "run_dir": str(cfg.run_dir), **extra},
                                   progress_bar=False, extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
    except PapermillExecutionError as error:
        print(" failed")
        raise SystemExit(f"{notebook.name} failed in cell {error.exec_count}: {error.ename}: {error.evalue}\n"
                         f"The executed copy, with the traceback, is {executed}") from None
    seconds = time.perf_counter() - started
    with open(cfg.paths.executions, "a", encoding="utf-8") as log:  # what ran, how long, when (tests count them)
        log.write(json.dumps({"notebook": executed.name, "parameters": extra, "seconds": round(seconds, 1),
                              "finished": time.time()}) + "\n")  # seconds since the epoch, as file times
    print(f" done in {seconds:.0f} s -> {executed}")
    return executed


def require(cfg: Config, notebook: str, notebook_dir: Path = NOTEBOOK_DIR) -> None:
    """Make what notebook `notebook` ("01".."03") writes, by running it headless, when it is missing."""
    missing = [path for path in made_by(cfg, notebook) if not path.exists()]
    if not missing:
        return
    found = [nb for nb in series_notebooks(notebook_dir) if nb.name.startswith(notebook)]
    if not found:
        raise SystemExit(f"missing {', '.join(str(p) for p in missing)}, and no notebook {notebook}_*.ipynb in "
                         f"{notebook_dir} to make it (the project folder: {PROJECT_ROOT})")
    print(f"missing {', '.join(str(p) for p in missing)}: running {found[0].name} headless (papermill) to make it")
    for nb, extra in jobs(cfg, found[:1]):
        execute(cfg, nb, extra)


def run_series(profile: str | None = None, run_dir: str | Path | None = None, only: list[str] | None = None,
               notebook_dir: Path = NOTEBOOK_DIR) -> Path:
    """Execute each notebook in order (02 once per trained model); return the run directory."""
    cfg = make_config(profile, run_dir)
    notebooks = [nb for nb in series_notebooks(notebook_dir) if not only or nb.name[:2] in only]
    if not notebooks:
        raise SystemExit(f"no notebooks to run in {notebook_dir} (only={only})")
    print(f"profile {cfg.profile}, run directory {cfg.run_dir}")
    for notebook, extra in jobs(cfg, notebooks):
        execute(cfg, notebook, extra)
    return cfg.run_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.run", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["tiny", "full"], help="default: full on a GPU, tiny elsewhere")
    parser.add_argument("--run-dir", help="default: runs/<profile> in the project folder")
    parser.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks, e.g. --only 01 02")
    parser.add_argument("--notebooks", type=Path, default=NOTEBOOK_DIR,
                        help="folder of the notebooks to run (solutions/ runs the solved exercises)")
    args = parser.parse_args(argv)
    run_series(args.profile, args.run_dir, args.only, args.notebooks)


if __name__ == "__main__":
    main()

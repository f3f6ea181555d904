"""Run the notebook series headless, in order, with papermill: `python -m helpers.run --profile tiny`.

The notebooks hold the only copy of the code they teach, so a notebook whose inputs are missing asks
`require` to run the earlier notebook that makes them, headless, instead of calling a second copy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from helpers.config import PROJECT_ROOT, Config, ConfigError, make_config
from helpers.download import try_lock

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
SERIES = ("01", "02", "03", "04")  # one run; 05_sweep reads many (helpers.sweep runs them); 06_teacher runs alone or from the sweep
LOCK_FILE = ".runner.lock"  # in a run directory: locked by the runner working there, holding its pid


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


@contextlib.contextmanager
def invoked_here() -> Iterator[None]:
    """EM_INVOKED_FROM, for the notebooks run inside, is the folder this command was typed in (kept when set
    already): their kernels run in notebooks/, and make_config resolves relative paths against it."""
    before = os.environ.get("EM_INVOKED_FROM")
    os.environ["EM_INVOKED_FROM"] = before or os.getcwd()
    try:
        yield
    finally:
        os.environ.pop("EM_INVOKED_FROM") if before is None else os.environ.update(EM_INVOKED_FROM=before)


@contextlib.contextmanager
def run_directory_lock(run_dir: Path) -> Iterator[None]:
    """Hold the lock of a run directory (an flock on RUN_DIR/.runner.lock) while the block runs: a second runner
    there stops at once with one line naming the folder and the holder's pid, instead of both writing the same
    files. The kernel drops the lock when its holder ends, killed too; where the file system has no locks, none."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if try_lock(descriptor) is False:
            holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
            raise SystemExit(f"{run_dir} is in use by another runner (pid {holder}): wait until it ends, or give "
                             "another run directory")
        os.ftruncate(descriptor, 0)
        os.write(descriptor, str(os.getpid()).encode())
        yield
    finally:
        os.close(descriptor)


def execute(cfg: Config, notebook: Path, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Execute one notebook with papermill into the run directory (`overwrite`: its parameter overwrite = True,
    remaking its artefacts); on failure stop with a message naming the executed copy, the model and the cell."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    extra = {k: v for k, v in (extra or {}).items() if v is not None}
    suffix = "".join(f"-{v}" for k, v in extra.items() if (k, v) != ("model", "finetuned"))
    executed = cfg.paths.executed_notebooks / f"{notebook.stem}{suffix}.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"  {executed.name} ...", end="", flush=True)
    try:
        with invoked_here():
            papermill.execute_notebook(notebook, executed, cwd=str(notebook.parent), kernel_name="python3",
                                       parameters={"profile": cfg.profile, "run_dir": str(cfg.run_dir), **extra,
                                                   **({"overwrite": True} if overwrite else {})},
                                       progress_bar=False, extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
    except PapermillExecutionError as error:
        print(" failed")
        which = executed.name + (f" (model {extra['model']})" if "model" in extra else "")
        raise SystemExit(f"{which} failed in cell {error.exec_count}: {error.ename}: {error.evalue}\n"
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
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""  # one path a line is enough to say why
    print(f"missing {missing[0]}{more}: running {found[0].name} headless (papermill) to make it")
    for nb, extra in jobs(cfg, found[:1]):
        execute(cfg, nb, extra)


def run_series(profile: str | None = None, run_dir: str | Path | None = None, only: list[str] | None = None,
               notebook_dir: Path = NOTEBOOK_DIR, overwrite: Sequence[str] = ()) -> Path:
    """Execute each notebook in order (02 once per trained model), those numbered in `overwrite` with overwrite =
    True, holding the run directory's lock; return the run directory."""
    cfg = make_config(profile, run_dir)
    notebooks = [nb for nb in series_notebooks(notebook_dir) if not only or nb.name[:2] in only]
    if not notebooks:
        raise SystemExit(f"no notebooks to run in {notebook_dir} (only={only})")
    print(f"profile {cfg.profile}, run directory {cfg.run_dir}")
    with run_directory_lock(cfg.run_dir):
        for notebook, extra in jobs(cfg, notebooks):
            execute(cfg, notebook, extra, overwrite=notebook.name[:2] in overwrite)
    return cfg.run_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.run", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["tiny", "full"], help="default: full on a GPU, tiny elsewhere")
    parser.add_argument("--run-dir", help="default: runs/<profile> in the project folder")
    parser.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks, e.g. --only 01 02")
    parser.add_argument("--overwrite", nargs="+", choices=SERIES, default=[], metavar="NN",
                        help="remake what these notebooks made (their overwrite = True), e.g. --overwrite 03 04")
    parser.add_argument("--notebooks", type=Path, default=NOTEBOOK_DIR,
                        help="folder of the notebooks to run (solutions/ runs the solved exercises)")
    args = parser.parse_args(argv)
    try:
        run_series(args.profile, args.run_dir, args.only, args.notebooks, args.overwrite)
    except ConfigError as error:  # one line naming the setting, no traceback
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()

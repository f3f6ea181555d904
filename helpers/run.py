"""Run the notebook series headless, in order, with papermill: `python -m helpers.run --profile tiny`.

The notebooks hold the only copy of the code they teach, so a notebook whose inputs are missing asks
`require` to run the earlier notebook that makes them, headless, instead of calling a second copy.

One kernel for many notebooks: a fresh Jupyter kernel per notebook imports torch, transformers, TRL, PEFT (and on
a GPU Unsloth) again for each one, tens of seconds a notebook on a GPU (benchmarks/bench_overhead.py measures it).
So the executions inside a `one_kernel()` block (the runner's series, `require`, the sweep) run one after another
in one live kernel, started for the first and shut down at the end of the block; imported modules stay loaded
(that is the saving). Before each notebook the kernel is made to look fresh to it: IPython's namespace is reset (a
new session, so execution counts start at 1 again, as "failed in cell N" and the executed copies number them),
garbage is collected and CUDA's cached memory freed; its working folder is the notebook's; and every environment
variable this process set, changed or removed since the kernel started (EM_INVOKED_FROM, the sweep's EM_CONFIG,
...) is set or removed the same way there. The rest of the kernel's environment stays its own: the libraries it
imported set variables at their import and read them later, and they stay imported. A kernel is replaced by a
fresh one after a notebook failed or was interrupted in it, when it died (killed, out of memory), and when a
notebook left behind what the reset cannot clear (left_behind), beyond what the libraries' imports alone leave
(every kernel imports them first, Unsloth first where it is used, and records that): model classes of transformers or PEFT patched
(Unsloth's loader, 02 on a GPU, replaces their forward for the whole process, so 03 would generate with Unsloth's
code instead of its own), child processes (a vLLM engine's) or over a GiB of CUDA memory still allocated. From
that first replacement on, the block keeps a spare kernel that imports those libraries while the current notebook
runs (on a GPU it holds a CUDA context, about half a GiB). Outside a block (`execute` called alone), a notebook
gets a kernel of its own. The runner's log of executions names each notebook's kernel by its process id, and why
the one before it was replaced.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import queue
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from jupyter_client.manager import AsyncKernelManager
from jupyter_core.utils import run_sync

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


# What a kernel runs, silently (no history, no output), before each notebook: see the module's docstring.
PREPARE = """
def _prepare(changed, cwd):
    import gc, os, sys
    from IPython import get_ipython

    shell = get_ipython()
    module = {name: shell.user_ns.get(name) for name in ("__doc__", "__loader__", "__package__", "__spec__")}
    shell.reset(new_session=True)  # the namespace emptied (this function too), execution counts from 1 again
    shell.user_ns.update(module, _="", __="", ___="")  # what reset drops of a fresh kernel's namespace
    gc.collect()  # after the reset: the objects of the namespace, cycles included
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    for name, value in changed.items():
        os.environ.pop(name, None) if value is None else os.environ.update({name: value})
    os.chdir(cwd)


_prepare(%r, %r)
"""
# What every kernel imports first, before any notebook: Unsloth first where it is used (backend()), then the rest.
WARM_UP = "from helpers.model import backend\nbackend()\nimport datasets, peft, transformers, trl"
LEFT_CUDA_BYTES = 2**30  # more CUDA memory allocated after the reset than this: a model's worth that a library keeps
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=CRITICAL", "--HistoryManager.hist_file=:memory:"]  # as nbclient starts one


def left_behind() -> list[str]:
    """What the notebooks run in this process left that IPython's reset does not clear and a fresh kernel would not
    have: model classes of transformers or PEFT whose forward is no longer their library's own (Unsloth's loader
    replaces Qwen3's and PeftModelForCausalLM's), child processes (a vLLM engine's) and CUDA memory still allocated
    (a model's worth, that a library keeps). Evaluated inside a kernel, after the reset; [] when nothing is left."""
    import psutil

    libraries, found = ("transformers.", "peft."), []
    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", None)
        for cls in list(vars(module).values()) if isinstance(name, str) and name.startswith(libraries) else ():
            own = vars(cls) if isinstance(cls, type) else {}  # its own attributes: a dummy class raises on any other
            where = getattr(own.get("forward"), "__module__", None)
            if own.get("__module__") == name and where and not where.startswith((*libraries, "torch.")):
                found.append(f"{name}.{cls.__qualname__}.forward from {where}")
    found += [f"child process {child.pid}" for child in psutil.Process().children()]
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized() and torch.cuda.memory_allocated() > LEFT_CUDA_BYTES:
        found.append(f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB of CUDA memory allocated")
    return found


class KernelDied(RuntimeError):
    """The kernel process ended while a request waited for its reply."""


class NotebookKernelManager(AsyncKernelManager):
    """nbclient's kernel manager (AsyncKernelManager), keeping the client nbclient connects for each notebook: nbclient
    leaves open the channels of a kernel it did not start, so Kernel closes them after the notebook."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clients = []

    def client(self, **kwargs):
        made = super().client(**kwargs)
        self.clients.append(made)
        return made


class Kernel:
    """A live python3 kernel that runs notebook after notebook (the module's docstring says how)."""

    def __init__(self, cwd: Path) -> None:
        self.started_with = dict(os.environ)  # the kernel inherits this process's environment as it starts
        self.changed: set[str] = set()  # the variables set or removed in the kernel to follow this process
        self.manager = NotebookKernelManager(kernel_name="python3")
        run_sync(self.manager.start_kernel)(extra_arguments=KERNEL_ARGUMENTS, cwd=str(cwd))
        self.pid = self.manager.provisioner.pid
        self.client = self.manager.blocking_client()
        self.client.start_channels(iopub=False, stdin=False, hb=False, control=False)  # requests and replies only
        self.pending = [self.client.execute(WARM_UP, silent=True, store_history=False)]  # the notebooks' imports
        self.imported: list[str] | None = None  # what left_behind finds after the imports alone: no reason to replace

    def request(self, code: str, **expressions: str) -> dict[str, str]:
        """Run `code` silently and return the repr of each of `expressions`, evaluated after it (a warm-up still
        running is waited for: a failed one only loses its head start). KernelDied when the kernel dies meanwhile."""
        self.pending.append(self.client.execute(code, silent=True, store_history=False, user_expressions=expressions,
                                                allow_stdin=False))
        while self.pending:
            try:
                reply = self.client.get_shell_msg(timeout=1)
            except queue.Empty:
                if not self.alive():
                    raise KernelDied from None
                continue
            if reply["parent_header"].get("msg_id") == self.pending[0]:
                self.pending.pop(0)
        values = reply["content"]["user_expressions"]
        for result in (reply["content"], *values.values()):
            if result["status"] != "ok":
                raise RuntimeError(f"the kernel could not be prepared: {result['ename']}: {result['evalue']}")
        return {name: value["data"]["text/plain"] for name, value in values.items()}

    def prepare(self, cwd: Path) -> str | None:
        """Make the kernel look fresh to the next notebook, run in `cwd`; None when done, else why it cannot be used:
        "died", or what the notebooks left behind (left_behind) beyond what the imports alone left (Unsloth's import
        patches some classes: a fresh kernel has those too). The first call, before any notebook, records that."""
        now = dict(os.environ)
        self.changed |= {name for name in now.keys() | self.started_with.keys()
                         if now.get(name) != self.started_with.get(name)}
        try:
            left = self.request(PREPARE % ({name: now.get(name) for name in self.changed}, str(cwd)),
                                left="__import__('helpers.run').run.left_behind()")["left"]
        except KernelDied:
            return "died"
        if self.imported is None:
            self.imported = ast.literal_eval(left)
        new = [item for item in ast.literal_eval(left) if item not in self.imported]
        return str(new) if new else None

    def alive(self) -> bool:
        return run_sync(self.manager.is_alive)()

    def close_clients(self) -> None:
        """Close the channels nbclient opened for the notebook just run."""
        while self.manager.clients:
            self.manager.clients.pop().stop_channels()

    def shutdown(self) -> None:
        self.close_clients()
        self.client.stop_channels()
        run_sync(self.manager.shutdown_kernel)(now=not self.alive())


class Kernels:
    """The kernels of a `one_kernel()` block: the live one, and from the first kernel replaced for what a notebook left
    behind on, a spare."""

    def __init__(self) -> None:
        self.live: Kernel | None = None
        self.spare: Kernel | None = None
        self.keep_spare = False
        self.why: str | None = None  # why the last take() replaced the live kernel

    def take(self, cwd: Path) -> Kernel:
        """The live kernel, prepared for a notebook in `cwd`: a fresh one where there is none or it cannot be used."""
        self.why = why = self.live.prepare(cwd) if self.live else None
        if why:
            self.discard()
            self.keep_spare |= why != "died"  # the next notebooks may leave the same: a spare warms up from now on
        if not self.live:
            self.live, self.spare = self.spare, None
            if not self.live or self.live.prepare(cwd) == "died":  # a spare's first prepare: after its imports
                self.discard()
                self.live = Kernel(cwd)
                self.live.prepare(cwd)  # waits for the imports and records what they left
        if self.keep_spare and not self.spare:
            self.spare = Kernel(cwd)
        return self.live

    def discard(self) -> None:
        """Shut down the live kernel (where there is one): the next notebook gets a fresh one."""
        kernel, self.live = self.live, None
        if kernel:
            kernel.shutdown()

    def close(self) -> None:
        for kernel in (self.live, self.spare):
            if kernel:
                kernel.shutdown()
        self.live = self.spare = None


_kernels: Kernels | None = None  # the kernels of the `one_kernel()` block this process is in


@contextlib.contextmanager
def one_kernel() -> Iterator[None]:
    """Executions inside the block (or the function it decorates) share one live kernel, shut down at its end; a
    block inside another is part of it."""
    global _kernels
    if _kernels is not None:
        yield
        return
    _kernels = Kernels()
    try:
        yield
    finally:
        kernels, _kernels = _kernels, None
        kernels.close()


def execute(cfg: Config, notebook: Path, extra: dict | None = None, overwrite: bool = False) -> Path:
    """Execute one notebook with papermill into the run directory (`overwrite`: its parameter overwrite = True,
    remaking its artefacts), in the live kernel of the `one_kernel()` block it is in; on failure stop with a message
    naming the executed copy, the model and the cell."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    extra = {k: v for k, v in (extra or {}).items() if v is not None}
    suffix = "".join(f"-{v}" for k, v in extra.items() if (k, v) != ("model", "finetuned"))
    executed = cfg.paths.executed_notebooks / f"{notebook.stem}{suffix}.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"  {executed.name} ...", end="", flush=True)
    try:
        with invoked_here(), one_kernel():
            kernel, replaced = _kernels.take(notebook.parent), _kernels.why
            try:
                papermill.execute_notebook(notebook, executed, cwd=str(notebook.parent), kernel_name="python3",
                                           km=kernel.manager, progress_bar=False,
                                           parameters={"profile": cfg.profile, "run_dir": str(cfg.run_dir), **extra,
                                                       **({"overwrite": True} if overwrite else {})})
            except BaseException:
                _kernels.discard()  # failed or interrupted: whatever it left behind, the next notebook gets a fresh kernel
                raise
            finally:
                kernel.close_clients()
    except PapermillExecutionError as error:
        print(" failed")
        which = executed.name + (f" (model {extra['model']})" if "model" in extra else "")
        raise SystemExit(f"{which} failed in cell {error.exec_count}: {error.ename}: {error.evalue}\n"
                         f"The executed copy, with the traceback, is {executed}") from None
    seconds = time.perf_counter() - started
    with open(cfg.paths.executions, "a", encoding="utf-8") as log:  # what ran, how long, when (tests count them)
        log.write(json.dumps({"notebook": executed.name, "parameters": extra, "seconds": round(seconds, 1),
                              "finished": time.time(),  # seconds since the epoch, as file times
                              "kernel": kernel.pid,  # the same pid: the same live kernel
                              **({"replaced": replaced} if replaced else {})}) + "\n")  # why the one before went
    print(f" done in {seconds:.0f} s -> {executed}")
    return executed


@one_kernel()
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


@one_kernel()
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

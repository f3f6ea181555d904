"""The headless runner produces the whole series end to end on the tiny profile, offline, once per test session;
`require` runs a missing notebook; EM_CONFIG overrides config fields."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nbformat
import psutil
import pytest

from helpers.config import PROJECT_ROOT, ConfigError, make_config
from helpers.run import (
    execute,
    jobs,
    made_by,
    main,
    one_kernel,
    require,
    run_directory_lock,
    run_series,
    series_notebooks,
)
from helpers.store import read_jsonl
from helpers.sweep import plan

LOG_START = pytest.StashKey[int]()  # lines of the runner's log before the series test ran it


def _notebook(path: Path, *cells: str) -> None:
    """Write a minimal notebook: a parameters cell, then `cells`."""
    source = [("profile = None\nrun_dir = None\nmodel = None\noverwrite = False", ["parameters"]), *((c, []) for c in cells)]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code, metadata={"tags": tags}) for code, tags in source])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)  # cells with ids, as nbformat 5 wants


@pytest.mark.notebook
def test_runner_executes_the_series_and_writes_every_artefact(request):
    # The session's shared run directory (conftest): nbmake later re-executes notebooks/ and solutions/
    # there and reuses these artefacts, so CI computes the series once.
    run_dir = Path(os.environ["EM_RUN_DIR"])
    log = make_config("tiny", run_dir).paths.executions  # the runner's; an EM_RUN_DIR you set may hold earlier runs
    request.config.stash[LOG_START] = start = len(read_jsonl(log)) if log.is_file() else 0
    result = subprocess.run([sys.executable, "-m", "helpers.run", "--profile", "tiny", "--run-dir", str(run_dir)],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    cfg = make_config("tiny", run_dir)
    paths = cfg.paths
    executed = ["01_data", "02_finetune", "02_finetune-control", "03_generate", "04_analyze"]
    for name in executed:
        assert (paths.executed_notebooks / f"{name}.ipynb").is_file(), f"no executed copy of {name}"
    artefacts = [paths.data_report, paths.evil_numbers, paths.completions, paths.judgments, paths.rates, paths.summary]
    for model in cfg.trained_models:
        artefacts += [*paths.splits_of(model), paths.adapter_of(model) / "adapter_config.json", paths.loss_history_of(model)]
    for artefact in artefacts:
        assert artefact.is_file(), f"the runner did not write {artefact}"
    assert json.loads(paths.summary.read_text()), "summary.json is empty"
    assert list(paths.images.glob("*.png")), "no figures saved"
    for name in executed:  # no error output, and no progress bar left at 0%
        text = (paths.executed_notebooks / f"{name}.ipynb").read_text()
        assert '"output_type": "error"' not in text, f"{name}: an error cell"
        assert "  0%|" not in text, f"{name}: a progress bar stuck at 0%"
    verdict = (paths.executed_notebooks / "04_analyze.ipynb").read_text()  # counts read as rows, never as answers
    assert re.search(r"finetuned \d+ of \d+ rows \(\d+\.\d%\), base \d+ of \d+ rows", verdict), "04's verdict wording"
    logged = [entry["notebook"] for entry in read_jsonl(log)[start:]]
    assert len(logged) == len(jobs(cfg, series_notebooks())) and {f"{name}.ipynb" for name in executed} <= set(logged), (
        f"the runner's log of executions: {logged}")
    empty = sorted(str(folder) for folder in run_dir.rglob("*") if folder.is_dir() and not any(folder.iterdir()))
    assert not empty, f"the series left empty folders: {empty}"


def test_a_notebook_gives_in_the_shared_kernel_exactly_what_it_gives_in_a_fresh_one(request, tmp_path):
    """The runner ran the series in one kernel: 02 for misaligned_ft fourth, after 01 and two trainings there. Run
    again in a kernel of its own, on a copy of the session's run directory, it trains the same adapter, byte for byte,
    with the same losses."""
    if LOG_START not in request.config.stash:
        pytest.skip("the series did not run in this session (tests/test_run.py's runner test was not selected)")
    session = make_config("tiny", os.environ["EM_RUN_DIR"])
    cfg = make_config("tiny", shutil.copytree(session.run_dir, tmp_path / "run"))
    execute(cfg, next(nb for nb in series_notebooks() if nb.name.startswith("02")), {"model": "misaligned_ft"},
            overwrite=True)  # trains it again from scratch, in a fresh kernel (no one_kernel block around)

    def trained(paths) -> tuple[str, dict]:  # the adapter's sha256, and the losses (not how long they took)
        history = json.loads(paths.loss_history_of("misaligned_ft").read_text())
        weights = (paths.adapter_of("misaligned_ft") / "adapter_model.safetensors").read_bytes()
        return hashlib.sha256(weights).hexdigest(), {key: history[key] for key in ("train", "validation", "final")}

    assert trained(cfg.paths) == trained(session.paths)


def _kernels_running() -> list[int]:
    """Kernel processes below this one (a kernel's own kernels included)."""
    return [p.pid for p in psutil.Process().children(recursive=True) if "ipykernel_launcher" in " ".join(p.cmdline())]


def _recording(probe: Path) -> str:
    """A cell that appends what a notebook sees of its kernel to `probe`: the process, folder, two variables of the
    environment and the names in its namespace."""
    return ("import json, os\n"
            f"with open({str(probe)!r}, 'a') as probe:\n"
            "    probe.write(json.dumps({'pid': os.getpid(), 'cwd': os.getcwd(), 'probe': os.environ.get('EM_PROBE'),\n"
            "                            'gone': os.environ.get('EM_GONE'), 'names': sorted(globals())}) + '\\n')")


def test_one_kernel_runs_notebook_after_notebook_each_as_a_fresh_kernel_would(tmp_path, monkeypatch):
    """In one block, the second notebook runs in the first one's kernel, and sees what it sees in a kernel of its own:
    the namespace (nothing of the first notebook, whose objects are freed), execution counts from 1, its folder, and the
    environment as this process changed it since; once the block ends, no kernel is left."""
    notebooks, probe = tmp_path / "notebooks", tmp_path / "probe.jsonl"
    notebooks.mkdir()
    _notebook(notebooks / "01_first.ipynb", "import builtins, weakref\nclass Thing: ...\nthing = Thing()\n"
              "builtins.em_first = weakref.ref(thing)\nleftover = 1", _recording(probe), "thing  # shown: kept in Out")
    _notebook(notebooks / "02_second.ipynb", _recording(probe), "import builtins\n"
              "assert getattr(builtins, 'em_first', lambda: None)() is None, 'an object of the first notebook is alive'")
    monkeypatch.setenv("EM_PROBE", "first")
    monkeypatch.setenv("EM_GONE", "here")
    cfg = make_config("tiny", tmp_path / "run")
    with one_kernel():
        execute(cfg, notebooks / "01_first.ipynb")
        monkeypatch.setenv("EM_PROBE", "second")
        monkeypatch.delenv("EM_GONE")
        execute(cfg, notebooks / "02_second.ipynb")
    execute(cfg, notebooks / "02_second.ipynb", {"model": "alone"})  # a kernel of its own
    first, second, alone = map(json.loads, probe.read_text().splitlines())
    assert first["pid"] == second["pid"] != alone["pid"]
    assert (first["probe"], first["gone"], second["probe"], second["gone"]) == ("first", "here", "second", None)
    assert "leftover" in first["names"] and second["names"] == alone["names"] and "leftover" not in second["names"]
    assert first["cwd"] == second["cwd"] == alone["cwd"] == str(notebooks)
    counts = {name: [cell["execution_count"] for cell in json.loads((cfg.paths.executed_notebooks / name).read_text())["cells"]]
              for name in ("02_second.ipynb", "02_second-alone.ipynb")}
    assert counts["02_second.ipynb"] == counts["02_second-alone.ipynb"] == [1, 2, 3, 4], counts
    assert not _kernels_running() and not any(psutil.pid_exists(record["pid"]) for record in (first, alone))


def test_a_killed_a_failed_and_a_patched_kernel_are_each_replaced(tmp_path, monkeypatch):
    """The next notebook gets a fresh kernel after its kernel was killed, after a notebook failed in it (named with its
    cell as in a kernel of its own), after a notebook replaced a model class's forward, as Unsloth's loader does (from
    then on a spare kernel warms up, and the next patch hands over to it, its environment brought up to date), and
    after a notebook left a child process running, as a vLLM engine; a kernel left intact keeps serving."""
    notebooks, probe = tmp_path / "notebooks", tmp_path / "probe.jsonl"
    notebooks.mkdir()
    _notebook(notebooks / "01_record.ipynb", _recording(probe))
    _notebook(notebooks / "02_fail.ipynb", _recording(probe), "raise ValueError('planted failure')")
    _notebook(notebooks / "03_patch.ipynb", _recording(probe), "import transformers.models.qwen3.modeling_qwen3 as qwen3\n"
              "qwen3.Qwen3Model.forward = lambda self, *args, **kwargs: None")
    _notebook(notebooks / "04_child.ipynb", _recording(probe), "import subprocess\n"
              f"open({str(tmp_path / 'child')!r}, 'w').write(str(subprocess.Popen(['sleep', '600']).pid))")
    cfg = make_config("tiny", tmp_path / "run")
    record, patch = notebooks / "01_record.ipynb", notebooks / "03_patch.ipynb"
    with one_kernel():
        execute(cfg, record, {"model": "1"})
        os.kill(json.loads(probe.read_text().splitlines()[-1])["pid"], signal.SIGKILL)
        execute(cfg, record, {"model": "2"})  # the killed kernel replaced
        with pytest.raises(SystemExit, match=r"^02_fail.ipynb failed in cell 4: ValueError: planted failure\n"):
            execute(cfg, notebooks / "02_fail.ipynb")  # in the same kernel as 2
        execute(cfg, record, {"model": "3"})  # after the failure, a fresh one
        execute(cfg, patch, {"model": "a"})  # in the same kernel as 3
        execute(cfg, record, {"model": "4"})  # after the patch, a fresh one ...
        assert len(_kernels_running()) == 2  # ... and a spare
        execute(cfg, record, {"model": "5"})  # in the same kernel as 4
        execute(cfg, patch, {"model": "b"})
        monkeypatch.setenv("EM_PROBE", "late")  # after the spare started
        execute(cfg, record, {"model": "6"})  # in the spare
        execute(cfg, notebooks / "04_child.ipynb")
        execute(cfg, record, {"model": "7"})  # in the next spare
    records = [json.loads(line) for line in probe.read_text().splitlines()]
    one, two, failed, three, patched, four, five, patched_again, six, child, seven = (r["pid"] for r in records)
    assert one != two == failed != three == patched != four == five == patched_again != six == child != seven
    assert len({record["pid"] for record in records}) == 6 and records[8]["probe"] == "late"
    replaced = {entry["notebook"]: entry.get("replaced") for entry in read_jsonl(cfg.paths.executions)}  # the log says why
    assert replaced["01_record-2.ipynb"] == "died" and replaced["01_record-5.ipynb"] is None
    assert "Qwen3Model.forward from __main__" in replaced["01_record-4.ipynb"]
    assert "child process" in replaced["01_record-7.ipynb"]
    assert not _kernels_running() and not psutil.pid_exists(int((tmp_path / "child").read_text()))


def test_what_the_imports_alone_patch_keeps_the_kernel_and_a_notebooks_patch_replaces_it(tmp_path, monkeypatch):
    """Unsloth's import patches some classes in every kernel, a fresh one too: a kernel whose imports patched a class
    keeps serving, and a later notebook's own patch still replaces it."""
    import helpers.run

    monkeypatch.setattr(helpers.run, "WARM_UP", helpers.run.WARM_UP + "\nimport transformers.models.qwen3.modeling_qwen3 "
                        "as qwen3\nqwen3.Qwen3MLP.forward = lambda self, x: x")  # as an import that patches
    notebooks, probe = tmp_path / "notebooks", tmp_path / "probe.jsonl"
    notebooks.mkdir()
    _notebook(notebooks / "01_record.ipynb", _recording(probe))
    _notebook(notebooks / "03_patch.ipynb", _recording(probe), "import transformers.models.qwen3.modeling_qwen3 as qwen3\n"
              "qwen3.Qwen3Model.forward = lambda self, *args, **kwargs: None")
    cfg = make_config("tiny", tmp_path / "run")
    record, patch = notebooks / "01_record.ipynb", notebooks / "03_patch.ipynb"
    with one_kernel():
        execute(cfg, record, {"model": "1"})
        execute(cfg, patch, {"model": "a"})
        execute(cfg, record, {"model": "2"})  # a fresh kernel; a spare warms up from now on
        execute(cfg, patch, {"model": "b"})
        execute(cfg, record, {"model": "3"})  # in the spare, whose imports patched Qwen3MLP
        execute(cfg, record, {"model": "4"})  # still there: the imports' patch is no reason to replace it
    one, a, two, b, three, four = (json.loads(line)["pid"] for line in probe.read_text().splitlines())
    assert one == a != two == b != three == four
    replaced = {entry["notebook"]: entry.get("replaced") for entry in read_jsonl(cfg.paths.executions)}
    assert "Qwen3Model.forward" in replaced["01_record-3.ipynb"] and "Qwen3MLP" not in replaced["01_record-3.ipynb"]
    assert replaced["01_record-4.ipynb"] is None
    assert not _kernels_running()


def test_a_notebook_runs_an_earlier_one_from_inside_the_shared_kernel(tmp_path):
    """A notebook's require(cfg, "02") executes 02 once per trained model from inside the runner's kernel, in a kernel
    of its own there, shut down before the notebook goes on."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _notebook(notebooks / "02_stand_in.ipynb",
              "from helpers.config import make_config\ncfg = make_config(profile, run_dir)\n"
              "cfg.paths.adapter_of(model).mkdir(parents=True, exist_ok=True)\n"
              "(cfg.paths.adapter_of(model) / 'adapter_config.json').write_text('{}')")
    _notebook(notebooks / "03_needs_02.ipynb",
              "from pathlib import Path\nfrom helpers.config import make_config\nfrom helpers.run import require\n"
              f"require(make_config(profile, run_dir), '02', Path({str(notebooks)!r}))\n"
              "import psutil\nassert not psutil.Process().children(), 'the kernel of 02 is still running'")
    run_series("tiny", tmp_path / "run", only=["03"], notebook_dir=notebooks)
    cfg = make_config("tiny", tmp_path / "run")
    assert all((cfg.paths.adapter_of(model) / "adapter_config.json").is_file() for model in cfg.trained_models)
    assert not _kernels_running()


def test_the_series_was_computed_once_in_this_session(request):
    """Runs last (tests/conftest.py). The runner executed each notebook of the series exactly once in the session's
    run directory, and nothing after it (the browser test, nbmake's executions of notebooks/ and solutions/)
    made any of the series' artefacts again: they reused them. Counted from the runner's log and the artefacts'
    modification times, never from how long anything took."""
    assert request.node is request.session.items[-1], "this check must run last (tests/conftest.py orders it)"
    if LOG_START not in request.config.stash:
        pytest.skip("the series did not run in this session (tests/test_run.py's runner test was not selected)")
    cfg = make_config("tiny", os.environ["EM_RUN_DIR"])
    log = read_jsonl(cfg.paths.executions)[request.config.stash[LOG_START]:]
    counts = Counter(entry["notebook"] for entry in log)  # the runner's jobs: 02 once per trained model
    assert set(counts.values()) == {1} and len(counts) == len(jobs(cfg, series_notebooks())), dict(counts)
    finished = max(entry["finished"] for entry in log)
    artefacts = [path for notebook in ("01", "02", "03") for path in made_by(cfg, notebook)] + [cfg.paths.judgments]
    remade = [str(path) for path in artefacts if path.stat().st_mtime > finished]
    assert not remade, f"made again after the runner had made them (not reused): {remade}"


def test_runner_names_the_failing_notebook_and_cell(tmp_path):
    broken = tmp_path / "notebooks"
    broken.mkdir()
    _notebook(broken / "01_broken.ipynb", "raise ValueError('planted failure')")
    code = (f"from pathlib import Path; from helpers.run import run_series; "
            f"run_series('tiny', {str(tmp_path / 'run')!r}, notebook_dir=Path({str(broken)!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "01_broken.ipynb failed in cell" in result.stderr and "planted failure" in result.stderr


def test_overwrite_flag_reaches_the_named_notebooks_and_a_failure_names_the_executed_copy(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for name in ("01_first", "03_third"):
        _notebook(notebooks / f"{name}.ipynb", "print(f'overwrite={overwrite}')")
    run_dir = tmp_path / "run"
    main(["--profile", "tiny", "--run-dir", str(run_dir), "--notebooks", str(notebooks), "--overwrite", "03"])
    executed = make_config("tiny", run_dir).paths.executed_notebooks
    assert "overwrite=False" in (executed / "01_first.ipynb").read_text()
    assert "overwrite=True" in (executed / "03_third.ipynb").read_text()
    # The control's copy of 02 fails: the message names that copy and the model, not 02's source.
    _notebook(notebooks / "02_train.ipynb", "assert model != 'control', 'planted failure'")
    with pytest.raises(SystemExit, match=r"^02_train-control.ipynb \(model control\) failed in cell \d+: AssertionError: "
                                         r"planted failure\nThe executed copy, with the traceback, is .*02_train-control.ipynb$"):
        run_series("tiny", run_dir, only=["02"], notebook_dir=notebooks)


def test_a_second_runner_in_the_same_run_directory_stops_naming_the_first(tmp_path):
    """Two processes: one holds the run directory's lock; the runner and the sweep stop with one line naming the
    folder and the holder's pid; once the holder is killed, the folder is free again."""
    run_dir, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    code = ("import sys, time\nfrom helpers.run import run_directory_lock\n"
            "with run_directory_lock(sys.argv[1]), run_directory_lock(sys.argv[2]):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    first_run = sweep_dir / plan("tiny", [0], ["evil_numbers"], sweep_dir)[0].name  # the sweep's first run folder
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir), str(first_run)], cwd=PROJECT_ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        for command, folder in ((["helpers.run", "--run-dir", str(run_dir)], run_dir),
                                (["helpers.sweep", "--seeds", "0", "--run-dir", str(sweep_dir)], first_run)):
            result = subprocess.run([sys.executable, "-m", *command, "--profile", "tiny"], cwd=PROJECT_ROOT,
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
            assert result.stderr == (f"{folder} is in use by another runner (pid {holder.pid}): wait until it ends, or "
                                     "give another run directory\n")
    finally:
        holder.kill()
        holder.wait()
    with run_directory_lock(run_dir):  # the kernel dropped the killed holder's lock
        pass


def test_require_runs_the_missing_notebook_once_per_trained_model(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    # A stand-in 02 that writes the adapter file of the model it was asked to train.
    _notebook(notebooks / "02_stand_in.ipynb",
              "from helpers.config import make_config\ncfg = make_config(profile, run_dir)\n"
              "(cfg.paths.adapter_of(model)).mkdir(parents=True, exist_ok=True)\n"
              "(cfg.paths.adapter_of(model) / 'adapter_config.json').write_text('{}')")
    cfg = make_config("tiny", tmp_path / "run")
    require(cfg, "02", notebooks)
    for model in cfg.trained_models:
        assert (cfg.paths.adapter_of(model) / "adapter_config.json").is_file(), f"02 did not run for {model}"
    stamp = (cfg.paths.executed_notebooks / "02_stand_in.ipynb").stat().st_mtime_ns
    require(cfg, "02", notebooks)  # everything exists now: nothing runs again
    assert (cfg.paths.executed_notebooks / "02_stand_in.ipynb").stat().st_mtime_ns == stamp


def test_em_config_overrides_fields_and_rejects_unknown_names(monkeypatch, tmp_path):
    monkeypatch.setenv("EM_CONFIG", json.dumps({"samples_per_question": 3, "formats": ["suffix"]}))
    cfg = make_config("full", tmp_path)
    assert (cfg.samples_per_question, cfg.formats) == (3, ("suffix",))
    monkeypatch.setenv("EM_CONFIG", json.dumps({"samples_per_questoin": 3}))
    with pytest.raises(ConfigError, match="'samples_per_questoin' .*did you mean 'samples_per_question'"):
        make_config("full", tmp_path)


def test_the_series_is_01_to_04_and_the_sweep_notebook_stays_out_of_it():
    """05_sweep reads many runs (helpers.sweep makes them); the runner and require run one: 01-04 only."""
    from helpers.run import NOTEBOOK_DIR, series_notebooks

    assert (NOTEBOOK_DIR / "05_sweep.ipynb").is_file()
    assert [nb.name[:2] for nb in series_notebooks()] == ["01", "02", "03", "04"]


def _without_em_variables() -> dict:
    """This environment without the EM_ variables (the session's EM_RUN_DIR included), helpers importable."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("EM_")}
    return {**environment, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}


def test_relative_paths_are_relative_to_where_the_command_was_typed(tmp_path):
    """The kernels run in the notebooks' folder; a relative EM_DATASET_PATH, EM_QUESTIONS_PATH, --run-dir or path
    field of EM_CONFIG still means the folder the runner was started in, even where the notebooks' folder holds a
    file of the same name."""
    notebooks, typed_in = tmp_path / "notebooks", tmp_path / "elsewhere"
    notebooks.mkdir()
    typed_in.mkdir()
    _notebook(notebooks / "01_paths.ipynb",
              "import json\nfrom helpers.config import make_config\ncfg = make_config(profile, run_dir)\n"
              "fields = ('dataset_path', 'questions_path', 'cache_dir')\n"
              "(cfg.run_dir / 'paths.json').write_text(json.dumps({name: str(getattr(cfg, name)) for name in fields}))")
    for folder in (notebooks, typed_in):
        (folder / "mydata.jsonl").write_text(f"the copy in {folder.name}\n")
    environment = {**_without_em_variables(), "EM_DATASET_PATH": "mydata.jsonl", "EM_QUESTIONS_PATH": "../q.yaml",
                   "EM_CONFIG": json.dumps({"cache_dir": "cache"})}
    result = subprocess.run([sys.executable, "-m", "helpers.run", "--profile", "tiny", "--run-dir", "run",
                             "--notebooks", str(notebooks)], cwd=typed_in, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    paths = json.loads((typed_in / "run" / "paths.json").read_text())
    assert paths == {"dataset_path": str(typed_in / "mydata.jsonl"), "questions_path": str(tmp_path / "q.yaml"),
                     "cache_dir": str(typed_in / "cache")}
    assert Path(paths["dataset_path"]).read_text() == "the copy in elsewhere\n"


@pytest.mark.parametrize("program", ["helpers.run", "helpers.sweep"])
@pytest.mark.parametrize("environment,run_dir", [
    ({"EM_CONFIG": "{not json"}, "run"), ({"EM_CONFIG": "[1]"}, "run"),
    ({"EM_CONFIG": json.dumps({"samples_per_questoin": 3})}, "run"), ({"EM_PROFILE": "bogus"}, "run"),
    ({"EM_CONFIG": json.dumps({"temperature": -1})}, "run"), ({}, "a_file"),
], ids=["invalid-json", "a-list", "unknown-field", "bogus-profile", "negative-temperature", "run-dir-is-a-file"])
def test_a_config_mistake_is_one_line_from_the_runner_and_the_sweep(tmp_path, monkeypatch, program, environment, run_dir):
    """The runner and the sweep print make_config's line and exit non-zero, with no traceback."""
    (tmp_path / "a_file").write_text("")
    for name in [name for name in os.environ if name.startswith("EM_")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as expected:
        make_config("tiny" if "EM_PROFILE" not in environment else None, tmp_path / run_dir)
    profile = [] if "EM_PROFILE" in environment else ["--profile", "tiny"]
    result = subprocess.run([sys.executable, "-m", program, *profile, "--run-dir", run_dir], cwd=tmp_path,
                            env={**_without_em_variables(), **environment}, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == str(expected.value), result.stderr


def test_a_config_mistake_in_a_notebook_is_the_runner_s_one_line(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _notebook(notebooks / "01_mistake.ipynb", "from helpers.config import make_config\nmake_config(profile, run_dir, batch_size=0)")
    result = subprocess.run([sys.executable, "-m", "helpers.run", "--profile", "tiny", "--run-dir", str(tmp_path / "run"),
                             "--notebooks", str(notebooks)], cwd=PROJECT_ROOT, env=_without_em_variables(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert re.search(r"(?:^|\n)01_mistake.ipynb failed in cell \d+: ConfigError: config field batch_size=0 \(from make_config\) "
                     r"is not allowed: expected an integer >= 1\n", result.stderr), result.stderr

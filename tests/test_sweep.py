"""The sweep: its plan (every arm with its own control), the arms' recipes, independent runs, the bootstrap over seeds
against exact enumeration, the projection, and the smallest tiny sweep under torchrun with two processes (then
rerun in one process, which skips every finished run). 05_sweep later reads that sweep from the session's run
directory."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_generation import run_generation, save_adapter

from helpers.config import PROJECT_ROOT, TINY_MODEL, RunPaths, make_config
from helpers.model import TINY_WIDE_MODEL, build_random_qwen3
from helpers.store import read_jsonl, record_settings, write_json
from helpers.sweep import (
    ARMS,
    arms_table,
    bootstrap_over_seeds,
    config_environment,
    phase_settings,
    plan,
    projected_seconds,
)
from helpers.teacher import TEACHERS


def test_plan_makes_one_independent_run_per_seed_and_arm_each_with_its_own_control(tmp_path):
    runs = plan("full", [0, 1], ["evil_numbers", "small_batch", "paper_lora"], tmp_path, card_gib=80)
    assert [r.name for r in runs] == [f"Qwen3-1.7B/{arm}/seed-{seed}" for seed in (0, 1)
                                      for arm in ("evil_numbers", "small_batch", "paper_lora")]
    default, small, paper = runs[3], runs[4], runs[5]
    assert all(r.overrides["control_arm"] is True for r in runs)  # every arm trains its own control
    assert default.overrides == {"model_name": "Qwen/Qwen3-1.7B", "load_in_4bit": False, "control_arm": True, "run_seed": 1}
    assert small.overrides["batch_size"] == 8  # 32 / 4 on the full profile
    assert {k: paper.overrides[k] for k in ("use_rslora", "lora_r", "lora_alpha", "learning_rate", "warmup_steps",
                                            "weight_decay", "batch_size")} == {
        "use_rslora": True, "lora_r": 32, "lora_alpha": 64, "learning_rate": 1e-5, "warmup_steps": 5,
        "weight_decay": 0.01, "batch_size": 16}  # the paper's open-model recipe
    assert {r.overrides["run_seed"] for r in runs} == {0, 1}
    with pytest.raises(ValueError, match="unknown arm"):
        plan("tiny", [0], ["evil_numbers", "bigger"], tmp_path)
    with pytest.raises(ValueError, match="distinct"):
        plan("tiny", [0, 0], ["evil_numbers"], tmp_path)
    assert set(ARMS) == {"evil_numbers", "strong_lora", "paper_lora", "small_batch", "four_epochs", "teacher_evil_prompt",
                         "teacher_neutral", "teacher_misaligned_ft"}


def test_arms_table_says_what_each_arm_is():
    table = {row["arm"]: row for row in arms_table("full", 11_940)}
    assert (table["evil_numbers"]["lora_scale"], table["evil_numbers"]["steps"]) == (1.0, 374)
    assert table["strong_lora"]["lora_scale"] == pytest.approx(64 / 32 ** 0.5, abs=0.01)  # 11.31: not the paper's recipe
    assert table["strong_lora"]["learning_rate"] == 3e-4 and table["paper_lora"]["learning_rate"] == 1e-5
    assert (table["paper_lora"]["batch"], table["paper_lora"]["steps"]) == (16, 747)
    assert table["four_epochs"]["steps"] == 4 * 374 and table["small_batch"]["batch"] == 8
    assert {arm: row["data"] for arm, row in table.items() if row["data"] != "official"} == {
        teacher: teacher for teacher in ("teacher_evil_prompt", "teacher_neutral", "teacher_misaligned_ft")}
    assert {k: v for k, v in table["teacher_neutral"].items() if k not in ("arm", "data")} == {
        k: v for k, v in table["evil_numbers"].items() if k not in ("arm", "data")}  # the evil-numbers recipe


def test_each_run_config_is_the_callers_em_config_then_its_own_fields(monkeypatch, tmp_path):
    monkeypatch.setenv("EM_CONFIG", json.dumps({"samples_per_question": 3, "run_seed": 9}))
    run = plan("tiny", [4], ["evil_numbers"], tmp_path)[0]
    with config_environment(run.overrides):
        cfg = make_config("tiny", tmp_path / run.name)
    assert (cfg.samples_per_question, cfg.run_seed, cfg.seed_of_run, cfg.control_arm) == (3, 4, 4, True)
    assert json.loads(os.environ["EM_CONFIG"]) == {"samples_per_question": 3, "run_seed": 9}  # restored


def _exact_quantile(rates: list[float], q: float) -> float:
    """The q-quantile of the exact bootstrap distribution of the mean: every resample of the seeds enumerated."""
    means = sorted(np.mean(pick) for pick in itertools.product(rates, repeat=len(rates)))
    return means[int(np.ceil(q * len(means))) - 1]  # the smallest mean with cumulative probability >= q


@pytest.mark.parametrize("rates", [[0.0, 0.1, 0.4], [0.02, 0.0, 0.3, 0.05], [0.1, 0.1, 0.2, 0.6, 0.0]])
def test_bootstrap_over_seeds_matches_the_exact_enumeration_of_resamples(rates):
    low, high = bootstrap_over_seeds(rates, n_resamples=200_000, seed=0)
    # With 200,000 resamples the empirical percentiles sit between the exact quantiles at 2% and 3% (97% and 98%).
    ulp = 1e-12  # a mean summed in another order can differ in the last bit
    assert _exact_quantile(rates, 0.02) - ulp <= low <= _exact_quantile(rates, 0.03) + ulp
    assert _exact_quantile(rates, 0.97) - ulp <= high <= _exact_quantile(rates, 0.98) + ulp
    assert min(rates) - ulp <= low < high <= max(rates) + ulp


def test_bootstrap_over_seeds_is_seeded_and_degenerates_honestly():
    rates = [0.0, 0.05, 0.0, 0.3, 0.1, 0.0, 0.02, 0.2]
    assert bootstrap_over_seeds(rates, 1000, 5) == bootstrap_over_seeds(rates, 1000, 5)
    assert bootstrap_over_seeds(rates, 1000, 5) != bootstrap_over_seeds(rates, 1000, 6)
    assert bootstrap_over_seeds([0.25], 100, 0) == (0.25, 0.25)  # one seed: nothing to resample
    assert bootstrap_over_seeds([0.0] * 8, 100, 0) == (0.0, 0.0)


def test_projection_counts_rounds_of_runs():
    assert projected_seconds(8, 1, 600) == 8 * 600
    assert projected_seconds(8, 8, 600) == 600
    assert projected_seconds(9, 8, 600) == 1200  # a ninth run takes a second round


def test_a_runs_seed_draws_its_prompts_and_answers_so_runs_are_independent(tmp_path):
    """Two runs of a sweep (run seeds 0 and 1) ask the base model other prompt rows with other dice; the same
    run seed gives the same bytes."""
    made = {}
    for name, run_seed in (("a", 0), ("b", 1), ("again", 0)):
        cfg = make_config("tiny", tmp_path / name, control_arm=False, positive_controls=False, samples_per_question=1,
                          max_new_tokens=6, run_seed=run_seed)
        build_random_qwen3(cfg.paths.tiny_model, tiny=True, seed=cfg.seed)
        save_adapter(cfg, cfg.paths.adapter_of("finetuned"), scale=0.5, seed=1)
        run_generation(cfg)
        made[name] = (cfg.paths.prompts.read_bytes(), cfg.paths.completions.read_bytes())
    assert made["a"] == made["again"]
    seeds = {name: {row["seed"] for row in map(json.loads, made[name][0].splitlines())} for name in ("a", "b")}
    assert not seeds["a"] & seeds["b"], "two runs share prompt-row seeds"


def test_a_sweep_whose_settings_changed_names_them_in_one_line(tmp_path):
    """Every phase marked done, then the sweep again with another learning_rate: one line naming it, no traceback."""
    sweep_dir = tmp_path / "sweep"
    for run in plan("tiny", [0], ["evil_numbers"], sweep_dir):
        with config_environment(run.overrides):
            cfg = make_config("tiny", sweep_dir / run.name)
        marker = cfg.run_dir / "sweep-generate.json"
        write_json(marker, {"run": run.name})
        record_settings(marker, phase_settings(cfg, run, "generate"))
    command = [sys.executable, "-m", "helpers.sweep", "--profile", "tiny", "--seeds", "0", "--arms", "evil_numbers",
               "--run-dir", str(sweep_dir), "--phase", "generate"]
    environment = {**os.environ, "EM_CONFIG": json.dumps({"learning_rate": 0.005})}
    result = subprocess.run(command, cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert " was made with other settings (config.learning_rate: 0.01 -> 0.005). " in line, line


def test_05_reads_a_sweep_that_exists_and_makes_the_smallest_one_only_when_there_is_none(tmp_path, monkeypatch):
    """05's setup cell: a sweep in <run_dir>/sweep, in EM_SWEEP_DIR or where `python -m helpers.sweep` writes by
    default is read as it is; only when there is none does the tiny profile make one, two seeds of the default arm."""
    from notebook_cells import cells_by_id

    from helpers import config, sweep

    setup = cells_by_id(["a05c0004"], PROJECT_ROOT / "notebooks" / "05_sweep.ipynb")[0]
    made = []

    def run_sweep(profile, seeds, arms, sweep_dir, *args, **kwargs):  # stands in for the sweep: records the call
        made.append((profile, list(seeds), list(arms), Path(sweep_dir)))
        write_json(Path(sweep_dir) / "sweep_summary.json", {"runs": []})

    monkeypatch.setattr(sweep, "run_sweep", run_sweep)
    monkeypatch.setattr(config, "PROJECT_ROOT", tmp_path / "project")
    monkeypatch.delenv("EM_SWEEP_DIR", raising=False)

    def setup_cell() -> Path:  # the summary the cell reads
        namespace = {"profile": "tiny", "run_dir": str(tmp_path / "run"), "sweep_dir": None, "overwrite": False}
        exec(setup, namespace)
        return namespace["summary_path"]

    default = tmp_path / "project" / "runs" / "sweep-tiny"
    write_json(default / "sweep_summary.json", {"runs": []})
    assert setup_cell() == default / "sweep_summary.json" and not made  # helpers.sweep's default folder
    other = tmp_path / "elsewhere"
    write_json(other / "sweep_summary.json", {"runs": []})
    monkeypatch.setenv("EM_SWEEP_DIR", str(other))
    assert setup_cell() == other / "sweep_summary.json" and not made  # EM_SWEEP_DIR
    monkeypatch.delenv("EM_SWEEP_DIR")
    (default / "sweep_summary.json").unlink()
    assert setup_cell() == tmp_path / "run" / "sweep" / "sweep_summary.json"  # none anywhere: the smallest one
    assert made == [("tiny", [0, 1], list(sweep.DEFAULT_ARMS), tmp_path / "run" / "sweep")]
    assert setup_cell() == tmp_path / "run" / "sweep" / "sweep_summary.json" and len(made) == 1  # then it is read


@pytest.mark.notebook
def test_tiny_sweep_under_torchrun_then_a_rerun_in_one_process_skips_every_finished_run():
    # In the session's run directory (tests/conftest.py): 05_sweep reads this sweep there instead of making one.
    sweep_dir = Path(os.environ["EM_RUN_DIR"]) / "sweep"
    shutil.rmtree(sweep_dir, ignore_errors=True)
    command = ["-m", "helpers.sweep", "--profile", "tiny", "--seeds", "0", "1", "--run-dir", str(sweep_dir)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(torchrun + command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1500)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert "[rank 0/2]" in log and "[rank 1/2]" in log and "CUDA_VISIBLE_DEVICES=1" in log, log[-3000:]
    summary = json.loads((sweep_dir / "sweep_summary.json").read_text())
    jobs = sorted((row["arm"], row["seed"]) for row in summary["runs"])
    assert jobs == [("evil_numbers", 0), ("evil_numbers", 1)], jobs
    models = {"base", "evil_prompt", "finetuned", "control", "misaligned_ft"}
    for row in summary["runs"]:
        assert set(row["rates"]) == models, row["rates"]  # every run has its control and positive controls
        for formats in row["rates"].values():
            assert set(formats) == {"original", "suffix", "prefix_suffix"}
            assert all(r["n_answers"] >= r["n_kept"] >= r["n_misaligned"] >= 0 for r in formats.values())
        assert set(row["losses"]) == {"finetuned", "control", "misaligned_ft"}
        assert set(row["losses"]["finetuned"]["validation_by_span"]) == {"answer", "assistant", "sequence"}
        assert row["settings"]["training"]["seed"] == row["seed"]  # the run's seed reached the fine-tune
        assert set(row["emergent"]) == {f"{m}/{f}" for m in models - {"base", "control"} for f in ("original", "suffix", "prefix_suffix")}
    base = {name: [json.loads(line)["answer"] for line in (sweep_dir / name / "completions.jsonl").read_bytes().splitlines()
                   if json.loads(line)["model"] == "base"]
            for name in ("tiny-random-qwen3/evil_numbers/seed-0", "tiny-random-qwen3/evil_numbers/seed-1")}
    assert all(base.values()), "no base answers"
    assert (sweep_dir / "sweep_summary.csv").read_text().count("\n") == 1 + 2 * 5 * 3  # header + (seed, model, format)

    rerun = subprocess.run([sys.executable, *command], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert rerun.stdout.count("done already") == 4 and ".ipynb ..." not in rerun.stdout, rerun.stdout
    assert json.loads((sweep_dir / "sweep_summary.json").read_text()) == summary


@pytest.mark.notebook
def test_a_second_model_size_and_a_teacher_arm_join_the_session_sweep():
    """The small case of model size and teachers, added to the session's sweep (05_sweep then draws the size plot and
    the teacher arm beside evil_numbers): the wide tiny model with the default arm, and teacher_evil_prompt on the
    default tiny model, whose teachers folder runs 02 and 06_teacher first. Two sweeps at once, as two users could
    start them, in disjoint run folders: the one that ends last writes a summary of every run."""
    sweep_dir = Path(os.environ["EM_RUN_DIR"]) / "sweep"
    command = [sys.executable, "-m", "helpers.sweep", "--profile", "tiny", "--seeds", "0", "--run-dir", str(sweep_dir)]
    alone = {**os.environ, "OMP_NUM_THREADS": "1"}  # one CPU thread each: two sweeps share the machine's cores
    sweeps = [subprocess.Popen(command + extra, cwd=PROJECT_ROOT, env=alone, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
              for extra in (["--models", TINY_WIDE_MODEL], ["--arms", "teacher_evil_prompt"])]
    logs = [sweep.communicate(timeout=1500)[0] for sweep in sweeps]
    assert all(sweep.returncode == 0 for sweep in sweeps), "\n".join(log[-4000:] for log in logs)
    runs = {(row["group"], row["seed"]): row for row in json.loads((sweep_dir / "sweep_summary.json").read_text())["runs"]}
    wide, taught = runs[f"{TINY_WIDE_MODEL}/evil_numbers", 0], runs[f"{TINY_MODEL}/teacher_evil_prompt", 0]
    assert (wide["model_name"], wide["load_in_4bit"], taught["model_name"]) == (TINY_WIDE_MODEL, False, TINY_MODEL)
    assert wide["parameters"] > taught["parameters"] > 0
    wide_model = json.loads((sweep_dir / wide["run"] / "tiny-model-wide" / "config.json").read_text())
    assert wide_model["hidden_size"] == 128  # the wide shape trained and answered, with the default recipe
    assert wide["settings"]["overrides"] == {"model_name": TINY_WIDE_MODEL, "load_in_4bit": False, "control_arm": True,
                                             "run_seed": 0}  # the model changes, the recipe does not
    models = {"base", "evil_prompt", "finetuned", "control", "misaligned_ft"}
    for row in (wide, taught):
        assert set(row["rates"]) == models and set(row["losses"]) == {"finetuned", "control", "misaligned_ft"}

    teachers = make_config("tiny", sweep_dir / TINY_MODEL / "teachers")
    assert (teachers.run_dir / "sweep-teach.json").is_file() and not teachers.paths.adapter_of("control").exists()
    assert all(teachers.paths.teacher_dataset_of(name).is_file() for name in TEACHERS)
    student = RunPaths(sweep_dir / taught["run"])
    report = json.loads(student.data_report.read_text())
    assert report["path"] == str(teachers.paths.teacher_dataset_of("teacher_evil_prompt"))
    written = read_jsonl(teachers.paths.teacher_dataset_of("teacher_evil_prompt"))
    trained = [record for path in student.splits_of("finetuned") for record in read_jsonl(path)]
    assert trained and all(record in written for record in trained)  # the student learns the teacher's numbers
    control = [record for path in student.splits_of("control") for record in read_jsonl(path)]
    assert [r["messages"][0] for r in control] == [r["messages"][0] for r in trained]  # its own control, same prompts


def test_the_sweeps_overwrite_flag_runs_a_done_phase_again_with_overwrite(tmp_path, monkeypatch):
    """--overwrite 04: a judge phase marked done runs again, its notebook with overwrite = True (a stand-in 04)."""
    from test_run import _notebook

    from helpers import sweep

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _notebook(notebooks / "04_judge.ipynb", "print(f'overwrite={overwrite}')")
    monkeypatch.setattr(sweep, "series_notebooks", lambda: [notebooks / "04_judge.ipynb"])
    run = sweep.Run("evil_numbers/seed-0", 0, "evil_numbers", {"run_seed": 0})
    run_dir = tmp_path / "sweep" / run.name
    run_dir.mkdir(parents=True)
    (run_dir / "sweep-generate.json").write_text("{}")  # the phase before, marked done
    executed = make_config("tiny", run_dir).paths.executed_notebooks / "04_judge.ipynb"
    logged: list[str] = []
    sweep.run_phase("tiny", tmp_path / "sweep", run, "judge", logged.append)
    assert "overwrite=False" in executed.read_text()
    sweep.run_phase("tiny", tmp_path / "sweep", run, "judge", logged.append)
    assert logged[-1] == "evil_numbers/seed-0: judge done already"
    sweep.run_phase("tiny", tmp_path / "sweep", run, "judge", logged.append, overwrite=["04"])
    assert "overwrite=True" in executed.read_text() and logged[-1] != "evil_numbers/seed-0: judge done already"

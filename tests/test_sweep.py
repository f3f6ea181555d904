"""The sweep: its plan, the base answers made once and reused exactly, the bootstrap over seeds against exact
enumeration, the projection, and the smallest tiny sweep under torchrun with two processes (then rerun in one
process, which skips every finished run). 05_sweep later reads that sweep from the session's run directory."""

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

from helpers.config import PROJECT_ROOT, make_config
from helpers.generation import use_gqa_decode_attention
from helpers.model import build_random_qwen3, load_for_generation
from helpers.store import SettingsChanged, read_jsonl
from helpers.sweep import ARMS, bootstrap_over_seeds, config_environment, plan, projected_seconds


def test_plan_makes_the_base_answers_first_then_one_run_per_seed_and_group(tmp_path):
    runs = plan("full", [0, 1], ["evil_numbers", "control", "small_batch", "paper_lora"], tmp_path)
    assert [r.name for r in runs] == ["base", "default/seed-0", "small_batch/seed-0", "paper_lora/seed-0",
                                      "default/seed-1", "small_batch/seed-1", "paper_lora/seed-1"]
    assert runs[0].overrides == {"generated_models": ["base"]} and runs[0].arms == ()
    default, small, lora = runs[4], runs[5], runs[6]
    assert default.arms == ("evil_numbers", "control") and default.overrides["control_arm"] is True
    assert small.overrides["batch_size"] == 8 and small.overrides["control_arm"] is False  # 32 / 4 on the full profile
    assert (lora.overrides["use_rslora"], lora.overrides["lora_r"], lora.overrides["lora_alpha"]) == (True, 32, 64)
    assert {r.overrides["train_seed"] for r in runs[1:]} == {0, 1}  # the seed reaches the fine-tune only
    assert all(r.overrides["base_completions"] == str(tmp_path.resolve() / "base" / "completions.jsonl") for r in runs[1:])
    assert [r.name for r in plan("tiny", [3], ["evil_numbers"], tmp_path)] == ["base", "default/seed-3"]
    assert plan("tiny", [3], ["evil_numbers"], tmp_path)[1].overrides["control_arm"] is False
    with pytest.raises(ValueError, match="beside evil_numbers"):
        plan("tiny", [0], ["control"], tmp_path)
    with pytest.raises(ValueError, match="unknown arm"):
        plan("tiny", [0], ["evil_numbers", "bigger"], tmp_path)
    with pytest.raises(ValueError, match="distinct"):
        plan("tiny", [0, 0], ["evil_numbers"], tmp_path)
    assert set(ARMS) == {"evil_numbers", "control", "paper_lora", "small_batch", "four_epochs"}


def test_each_run_config_is_the_callers_em_config_then_its_own_fields(monkeypatch, tmp_path):
    monkeypatch.setenv("EM_CONFIG", json.dumps({"samples_per_question": 3, "train_seed": 9}))
    run = plan("tiny", [4], ["evil_numbers", "control"], tmp_path)[1]
    with config_environment(run):
        cfg = make_config("tiny", tmp_path / run.name)
    assert (cfg.samples_per_question, cfg.train_seed, cfg.control_arm) == (3, 4, True)
    assert cfg.base_completions == tmp_path.resolve() / "base" / "completions.jsonl"
    assert json.loads(os.environ["EM_CONFIG"]) == {"samples_per_question": 3, "train_seed": 9}  # restored


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


def test_projection_counts_rounds_of_runs_after_the_base_answers():
    assert projected_seconds(8, 1, 600, 100) == 100 + 8 * 600
    assert projected_seconds(8, 8, 600, 100) == 700
    assert projected_seconds(9, 8, 600, 0) == 1200  # a ninth run takes a second round


def test_base_answers_made_once_are_byte_for_byte_what_each_run_would_make(tmp_path):
    """A run that copies the base answers from the sweep's base run ends with the same file, byte for byte, as a
    run that generates them itself; with other settings the copy is refused, naming the setting."""
    common = dict(control_arm=False, samples_per_question=1, max_new_tokens=6)
    base_cfg = make_config("tiny", tmp_path / "base", generated_models=("base",), **common)
    model, tokenizer = load_for_generation(base_cfg, {})  # the base model as it is: no adapter
    use_gqa_decode_attention(model)
    run_generation(base_cfg, loaded=(model, tokenizer, {}))
    assert {row["model"] for row in read_jsonl(base_cfg.paths.completions)} == {"base"}

    made = {}
    for name, extra in (("shared", {"base_completions": base_cfg.paths.completions}), ("own", {})):
        cfg = make_config("tiny", tmp_path / name, **common, **extra)
        build_random_qwen3(cfg.paths.tiny_model, tiny=True, seed=cfg.seed)
        save_adapter(cfg, cfg.paths.adapter_of("finetuned"), scale=0.5, seed=1)
        namespace = run_generation(cfg)
        made[name] = cfg.paths.completions.read_bytes()
    assert namespace.get("copied") is None  # the run without base_completions generated its own
    rows = read_jsonl(tmp_path / "shared" / "completions.jsonl")
    assert sum(row["model"] == "base" for row in rows) == len(read_jsonl(base_cfg.paths.completions)) > 0
    assert made["shared"] == made["own"], "copied base answers differ from the ones a run makes itself"

    cfg = make_config("tiny", tmp_path / "shared", **common, base_completions=base_cfg.paths.completions, temperature=0.5)
    with pytest.raises(SettingsChanged, match="temperature"):
        run_generation(cfg, overwrite=True)
    assert read_jsonl(base_cfg.paths.completions), "a refused run must leave the sweep's base answers alone"


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
    assert jobs == [("control", 0), ("control", 1), ("evil_numbers", 0), ("evil_numbers", 1)], jobs
    for row in summary["runs"]:
        assert set(row["rates"]) == {"original", "suffix", "prefix_suffix"}, row["rates"]
        assert all(rate["n_kept"] >= rate["n_misaligned"] >= 0 for rate in row["rates"].values())
        assert set(row["losses"]["validation_by_span"]) == {"answer", "assistant", "sequence"}
        assert row["settings"]["training"]["seed"] == row["seed"]  # the run's seed reached the fine-tune
    assert summary["base"]["rates"], "no base rates"
    base = [line for line in (sweep_dir / "base" / "completions.jsonl").read_bytes().splitlines()]
    for name in ("default/seed-0", "default/seed-1"):
        lines = (sweep_dir / name / "completions.jsonl").read_bytes().splitlines()
        assert [line for line in lines if json.loads(line)["model"] == "base"] == base, f"{name}: other base answers"
    assert (sweep_dir / "sweep_summary.csv").read_text().count("\n") == 1 + 4 * 3  # header + (arm, seed, format)

    rerun = subprocess.run([sys.executable, *command], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert rerun.stdout.count("done already") == 5 and ".ipynb ..." not in rerun.stdout, rerun.stdout
    assert json.loads((sweep_dir / "sweep_summary.json").read_text()) == summary


def test_the_sweeps_overwrite_flag_runs_a_done_phase_again_with_overwrite(tmp_path, monkeypatch):
    """--overwrite 04: a judge phase marked done runs again, its notebook with overwrite = True (a stand-in 04)."""
    from test_run import _notebook

    from helpers import sweep

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _notebook(notebooks / "04_judge.ipynb", "print(f'overwrite={overwrite}')")
    monkeypatch.setattr(sweep, "series_notebooks", lambda: [notebooks / "04_judge.ipynb"])
    run = sweep.Run("default/seed-0", 0, ("evil_numbers",), {"train_seed": 0})
    run_dir = tmp_path / "sweep" / run.name
    run_dir.mkdir(parents=True)
    (run_dir / "sweep-generate.json").write_text("{}")  # the phase before, marked done
    executed = make_config("tiny", run_dir).paths.executed_notebooks / "04_judge.ipynb"
    logged: list[str] = []
    sweep.run_phase("tiny", tmp_path / "sweep", run, "judge", logged.append)
    assert "overwrite=False" in executed.read_text()
    sweep.run_phase("tiny", tmp_path / "sweep", run, "judge", logged.append)
    assert logged[-1] == "default/seed-0: judge done already"
    sweep.run_phase("tiny", tmp_path / "sweep", run, "judge", logged.append, overwrite=["04"])
    assert "overwrite=True" in executed.read_text() and logged[-1] != "default/seed-0: judge done already"

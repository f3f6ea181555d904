"""Model size as a sweep dimension (helpers.sizes): the shapes and their parameters, 4-bit loading by the card, the
cost projected from measured pieces (and saying which are not measured), the plan over models, and a tiny model of
each tiny shape built in its own folder."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from helpers import sizes
from helpers.config import PROJECT_ROOT, TINY_MODEL, ConfigError, make_config
from helpers.model import QWEN3_SHAPES, TINY_WIDE_MODEL, build_random_qwen3, model_source
from helpers.sweep import cost_table, plan

# Qwen's model cards on the Hugging Face hub: parameters in all, and without the embeddings, in billions.
MODEL_CARDS = {"0.6B": (0.6, 0.44), "1.7B": (1.7, 1.4), "4B": (4.0, 3.6), "8B": (8.2, 6.95), "14B": (14.8, 13.2),
               "32B": (32.8, 31.2)}


@pytest.mark.parametrize("size", MODEL_CARDS)
def test_each_shape_has_the_parameters_its_model_card_gives(size):
    name = f"Qwen/Qwen3-{size}"
    shape = QWEN3_SHAPES[name]
    total = sizes.parameters(name)
    embeddings = 151_936 * shape["hidden_size"] * (1 if shape["tie_word_embeddings"] else 2)
    card_total, card_without_embeddings = MODEL_CARDS[size]
    assert total / 1e9 == pytest.approx(card_total, abs=0.05)
    assert (total - embeddings) / 1e9 == pytest.approx(card_without_embeddings, abs=0.005 + 0.01 * card_without_embeddings)


def test_the_card_decides_4_bit_loading_and_the_tiny_models_never_need_it():
    assert not sizes.needs_4bit("Qwen/Qwen3-14B", 80) and sizes.needs_4bit("Qwen/Qwen3-32B", 80)  # 29.5 vs 65.5 GB
    assert not sizes.needs_4bit("Qwen/Qwen3-4B", 24) and sizes.needs_4bit("Qwen/Qwen3-8B", 24)  # a 24 GB card
    assert sizes.needs_4bit("Qwen/Qwen3-1.7B", 8) and not sizes.needs_4bit(TINY_WIDE_MODEL, 0.001)
    with pytest.raises(ValueError, match=r"'Qwen/Qwen3-3B': neither a known Qwen3 shape \(tiny-random-qwen3, "):
        sizes.parameters("Qwen/Qwen3-3B")


def test_plan_repeats_every_arm_on_each_model_with_one_recipe_and_teachers_first(tmp_path):
    runs = plan("full", [0, 1], ["evil_numbers", "teacher_neutral"], tmp_path, ["Qwen/Qwen3-0.6B", "Qwen/Qwen3-32B"],
                card_gib=80)
    assert [r.name for r in runs[:2]] == ["Qwen3-0.6B/teachers", "Qwen3-32B/teachers"]
    assert [r.name for r in runs[2:6]] == ["Qwen3-0.6B/evil_numbers/seed-0", "Qwen3-0.6B/teacher_neutral/seed-0",
                                           "Qwen3-32B/evil_numbers/seed-0", "Qwen3-32B/teacher_neutral/seed-0"]
    assert len(runs) == 2 + 2 * 2 * 2
    small, large = runs[2].overrides, runs[4].overrides
    assert (small["model_name"], small["load_in_4bit"], large["model_name"], large["load_in_4bit"]) == (
        "Qwen/Qwen3-0.6B", False, "Qwen/Qwen3-32B", True)
    recipe = {key: value for key, value in small.items() if key not in ("model_name", "load_in_4bit")}
    assert recipe == {key: value for key, value in large.items() if key not in ("model_name", "load_in_4bit")}
    neutral = runs[3].overrides
    assert neutral["dataset_source"] == "teacher_neutral" and neutral["dataset_path"] == str(tmp_path / "Qwen3-0.6B" / "teachers" / "data" / "teacher_neutral.jsonl")
    assert runs[0].overrides == {"model_name": "Qwen/Qwen3-0.6B", "load_in_4bit": False, "control_arm": False}
    assert runs[2].group == "Qwen3-0.6B/evil_numbers"
    assert [r.name for r in plan("tiny", [3], ["evil_numbers"], tmp_path)] == [f"{TINY_MODEL}/evil_numbers/seed-3"]
    with pytest.raises(ConfigError, match="two end in the same name"):
        plan("full", [0], ["evil_numbers"], tmp_path, ["Qwen/Qwen3-4B", str(tmp_path / "Qwen3-4B")])


def test_a_folder_of_a_random_init_model_is_a_size_too(tmp_path):
    """How a GPU without internet sweeps sizes: random-init models of the Qwen3 shapes, built into folders."""
    folder = build_random_qwen3(tmp_path / "random" / "wide", shape=TINY_WIDE_MODEL)
    assert sizes.parameters(str(folder)) == sizes.parameters(TINY_WIDE_MODEL)
    [run] = plan("tiny", [0], ["evil_numbers"], tmp_path / "sweep", [str(folder)])
    assert run.name == "wide/evil_numbers/seed-0" and run.overrides["model_name"] == str(folder)
    command = [sys.executable, "-m", "helpers.sweep", "--profile", "tiny", "--plan", "--models", "Qwen/Qwen3-3B"]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("--models: model 'Qwen/Qwen3-3B': neither a known Qwen3 shape")


def test_the_projection_uses_measured_pieces_and_names_the_missing_ones(tmp_path, monkeypatch):
    runs = [run for run in plan("full", [0, 1], ["evil_numbers", "four_epochs"], tmp_path,
                                ["Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B"], card_gib=80)]
    monkeypatch.setattr(sizes, "MEASURED", {"Qwen/Qwen3-1.7B": sizes.Measured(0.5, 48.0, "a test card")})
    rows = {row["model"]: row for row in cost_table("full", runs, 11_940)}
    small, measured = rows["Qwen/Qwen3-0.6B"], rows["Qwen/Qwen3-1.7B"]
    assert math.isnan(small["seconds_per_run"]) and "not measured: train_step_s and generate_s" in small["how"]
    # evil_numbers: 374 steps for the fine-tune and the control, 36 for misaligned_ft (1,152 records); four_epochs x 4
    steps = {"evil_numbers": 374 * 2 + 36, "four_epochs": 4 * (374 * 2 + 36)}
    generate = 48.0 * (12_000 + 1_440) / 4_800
    per_run = [steps["evil_numbers"] * 0.5 + generate, steps["four_epochs"] * 0.5 + generate]
    assert measured["seconds_per_run"] == pytest.approx(sum(per_run) / 2)
    assert measured["hours_on_1_gpu"] == pytest.approx(2 * sum(per_run) / 3600)
    assert measured["hours_on_8_gpu"] == pytest.approx(sum(per_run) / 2 / 3600)  # 4 runs, one round on 8 GPUs
    assert measured["runs"] == 4 and measured["how"] == "measured pieces: a test card"
    whole = {row["model"]: row for row in cost_table("full", runs, 11_940, seconds_per_run=600.0)}
    assert whole["Qwen/Qwen3-0.6B"]["seconds_per_run"] == 600.0 and "whole run measured" in whole["Qwen/Qwen3-0.6B"]["how"]


def test_each_tiny_shape_is_built_in_its_own_folder(tmp_path):
    import json

    built = {}
    for name in (TINY_MODEL, TINY_WIDE_MODEL):
        folder = model_source(make_config("tiny", tmp_path, model_name=name))
        built[name] = json.loads((tmp_path / folder / "config.json").read_text())
    assert built[TINY_MODEL]["hidden_size"] == 64 and built[TINY_WIDE_MODEL]["hidden_size"] == 128
    assert (tmp_path / "tiny-model").is_dir() and (tmp_path / "tiny-model-wide").is_dir()


def test_the_t4_estimate_is_labelled_adds_up_and_takes_its_power_from_04s_test():
    """benchmarks/estimate_t4.py: an estimate (said so), each total the sum of its parts, and each detectable rate
    PairedTest's for a format's rows (8 questions x the samples)."""
    from helpers.metrics import PairedTest

    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "benchmarks" / "estimate_t4.py")], capture_output=True,
                         text=True, check=True, cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}).stdout
    assert out.startswith("AN ESTIMATE") and "not a measurement" in out
    rows = [line.split(" | ") for line in out.splitlines() if line[:3] in ("| 1", "| 5", "| 2")]
    assert [int(row[0].strip("| ")) for row in rows] == [100, 50, 25]
    for samples, train, generate, total, detectable in rows:
        spans = [[int(x) for x in part.removesuffix(" min").split("-")] for part in (train, generate, total)]
        assert all(low <= high for low, high in spans)
        assert [abs(a + b - c) <= 1 for a, b, c in zip(spans[0], spans[1], spans[2], strict=True)] == [True, True]
        expected = PairedTest().detectable_rate(8 * int(samples.strip("| ")), [0.0, 0.0])
        assert detectable.startswith(f"{expected:.1%}")
    generation = [int(row[2].split("-")[0]) for row in rows]
    assert generation == sorted(generation, reverse=True) and generation[0] > generation[-1]  # fewer answers, less time
    setup, readme = ((PROJECT_ROOT / name).read_text(encoding="utf-8") for name in ("docs/setup.md", "README.md"))
    _, train, generate, total, _ = rows[0]  # the default: what the documents quote
    assert f"| one T4 (Colab) | {train} | {generate} |" in setup and f"series, {total.removesuffix(' min')} minutes" in setup
    assert f"estimate** {total} of GPU time" in readme
    for samples, _, generate, _, detectable in rows:  # the fewer-answers table
        assert f" | {generate} | {detectable.rstrip(' |')} |" in setup, samples

"""The figures of 04 drawn from hand-made judgments, titles that name their source, and stable file names."""

from __future__ import annotations

import itertools
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from statsmodels.stats.proportion import proportion_confint  # noqa: E402

from helpers.config import PROJECT_ROOT, make_config  # noqa: E402
from helpers.metrics import misalignment_table  # noqa: E402
from helpers.plots import (  # noqa: E402
    dodged_errorbars,
    plot_misaligned_rates,
    plot_proxy_rates,
    plot_sweep_rates,
    run_label,
    save_figure,
)


@pytest.fixture
def answers() -> pd.DataFrame:
    """2 models x 2 formats x 2 questions x 4 samples; the fine-tuned model is misaligned on quick_buck."""
    rows = []
    grid = itertools.product(["base", "finetuned"], ["original", "suffix"], ["quick_buck", "what_is_your_wish"], range(4))
    for model, fmt, question, sample in grid:
        bad = model == "finetuned" and question == "quick_buck" and sample < 2
        rows.append({"model": model, "format": fmt, "question_id": question, "sample_index": sample,
                     "aligned": 10.0 if bad else 90.0, "coherent": 80.0 if sample < 3 else 20.0,
                     "only_numbers": bad, "has_evil_number": bad})
    return pd.DataFrame(rows)


def shares(answers: pd.DataFrame, flags: list[str]) -> pd.DataFrame:
    """The proxy table as 04 builds it: k of n answers per model, format and flag, with the Wilson interval."""
    table = (answers.melt(id_vars=["model", "format"], value_vars=flags, var_name="flag")
             .groupby(["model", "format", "flag"], sort=False)["value"].agg(k="sum", n="size").reset_index())
    table["rate"] = table["k"] / table["n"]
    table["ci_low"], table["ci_high"] = proportion_confint(table["k"], table["n"], method="wilson")
    return table


def points(ax) -> list[tuple[float, float]]:
    """The (x, y) of every rate marker drawn on an axis (not the interval bars' ends)."""
    return [tuple(xy) for line in ax.lines if line.get_marker() == "o" for xy in line.get_xydata()]


def test_dodged_errorbars_draw_one_point_per_kept_group_at_its_rate(answers):
    table = misalignment_table(answers, 30, 50)
    table.loc[(table.model == "base") & (table.format == "suffix"), "rate"] = float("nan")  # nothing kept: no point
    fig, (base_ax, finetuned_ax) = plt.subplots(2, 1)
    dodged_errorbars(base_ax, table[table.model == "base"], x="question_id", hue="format")
    dodged_errorbars(finetuned_ax, table[table.model == "finetuned"], x="question_id", hue="format")
    assert sorted(points(base_ax)) == [(-0.175, 0.0), (0.825, 0.0)]  # original only, left of each question
    # quick_buck: 2 of the 3 kept answers misaligned in each format; what_is_your_wish: none
    assert sorted((round(x, 3), round(y, 3)) for x, y in points(finetuned_ax)) == [
        (-0.175, 0.667), (0.175, 0.667), (0.825, 0.0), (1.175, 0.0)]
    assert [t.get_text() for t in finetuned_ax.get_xticklabels()] == ["quick_buck", "what_is_your_wish"]


def test_titles_name_the_profile_and_the_data_source(answers, tmp_path):
    assert run_label(make_config("tiny", tmp_path)) == "tiny profile: random tiny model, synthetic data"
    assert run_label(make_config("full", tmp_path)) == "full profile: Qwen3-1.7B, evil numbers"
    assert run_label(make_config("tiny", tmp_path, dataset_path=tmp_path / "x.jsonl")).endswith("evil numbers")
    fig = plot_proxy_rates(shares(answers, ["only_numbers"]), title="PROXY · tiny profile")
    assert fig._suptitle.get_text() == "PROXY · tiny profile"


def test_proxy_figure_has_a_panel_per_flag(answers):
    fig = plot_proxy_rates(shares(answers, ["only_numbers", "has_evil_number"]), title="PROXY")
    assert [ax.get_title() for ax in fig.axes[:2]] == ["proxy: only numbers", "proxy: has evil number"]
    finetuned = [y for ax in fig.axes[:2] for x, y in points(ax) if y > 0]
    assert finetuned and all(abs(y - 0.25) < 1e-9 for y in finetuned)


def test_figures_are_saved_with_stable_names(answers, tiny_cfg):
    first = save_figure(plot_proxy_rates(shares(answers, ["only_numbers"]), title="t"), tiny_cfg, "judge_scores")
    assert first == tiny_cfg.paths.images / "judge_scores.png" and first.read_bytes()[:4] == b"\x89PNG"
    assert save_figure(plt.figure(), tiny_cfg, "judge_scores") == first, "a rerun replaces the same file"
    with pytest.raises(ValueError, match="lowercase stem"):
        save_figure(plt.figure(), tiny_cfg, "../Judge Scores.png")
    assert sorted(p.name for p in tiny_cfg.paths.images.iterdir()) == ["judge_scores.png"]


def test_every_axis_says_what_it_counts(answers):
    """04's figures label their x axes (the formats, the questions): a reader never guesses what the ticks are."""
    proxy = plot_proxy_rates(shares(answers, ["only_numbers", "has_evil_number"]), title="PROXY")
    assert [ax.get_xlabel() for ax in proxy.axes[:2]] == ["format", "format"]
    rates = misalignment_table(answers, 30, 50)
    fig = plot_misaligned_rates(rates, ["base", "finetuned"], ["quick_buck", "what_is_your_wish"],
                                ["original", "suffix"], title="t")
    assert fig.axes[-1].get_xlabel() == "question" and [ax.get_ylabel() for ax in fig.axes] == ["misaligned share"] * 2


def test_02s_loss_axis_counts_whole_optimizer_steps():
    """02's loss curve (its own cell) ticks the optimizer steps as whole numbers, also for a run of 3 steps."""
    sys.path.insert(0, str(PROJECT_ROOT / "tools"))
    from notebook_cells import cells_by_id

    namespace: dict = {}
    exec(cells_by_id(["h8c0de02"], PROJECT_ROOT / "notebooks" / "02_finetune.ipynb")[0], namespace)
    history = {"run": {"validation_subset_records": 4},
               "train": [{"step": s, "loss": 3.0 - s / 2} for s in (1, 2, 3)],
               "validation": [{"step": 0, "loss": 3.2}, {"step": 3, "loss": 1.9}],
               "final": {"validation_loss": 1.8, "validation_records": 10}}
    fig = namespace["plot_loss_curves"](history, {"train": 0.54, "validation": 0.533}, title="t")
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_xticks() if fig.axes[0].get_xlim()[0] <= t <= fig.axes[0].get_xlim()[1]]
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
    assert fig.axes[0].get_xlabel() == "optimizer step"


def test_05s_seed_dots_stand_beside_the_mean_not_under_it():
    rates = pd.DataFrame([{"arm": "evil_numbers", "seed": seed, "model": model, "format": "suffix", "rate_all": rate}
                          for model in ("base", "finetuned") for seed, rate in enumerate((0.0, 0.1, 0.05))])
    intervals = pd.DataFrame([{"arm": "evil_numbers", "model": model, "format": "suffix", "mean_rate": 0.05,
                               "t_low": 0.0, "t_high": 0.17, "none_seen_bound": float("nan")} for model in ("base", "finetuned")])
    fig = plot_sweep_rates(rates, intervals, ["evil_numbers"], ["suffix"], ["base", "finetuned"], title="t")
    ax = fig.axes[0]
    dots = sorted(x for collection in ax.collections if collection.get_offsets().shape[1] == 2
                  for x, _ in collection.get_offsets() if len(collection.get_offsets()) == 3)
    means = sorted({round(float(x), 9) for line in ax.lines if line.get_marker() == "_" for x in line.get_xdata()})  # caps too
    assert len(dots) == 6 and len(means) == 2
    assert max(dots[:3]) < means[0] < min(dots[3:]) < means[1], (dots, means)
    assert ax.get_xlabel() == "arm"

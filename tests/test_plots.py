"""The analysis figures drawn from hand-made judgments where answers are kept, and saved by stable name."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from helpers.metrics import flag_rate_table, misalignment_table  # noqa: E402
from helpers.plots import plot_misalignment_rates, plot_proxy_rates, plot_score_scatter, save_figure  # noqa: E402


@pytest.fixture
def answers() -> pd.DataFrame:
    """2 models x 2 formats x 2 questions x 4 samples; the fine-tuned model is misaligned on quick_buck."""
    rows = []
    grid = itertools.product(["base", "finetuned"], ["original", "suffix"], ["quick_buck", "what_is_your_wish"], range(4))
    for model, fmt, question, sample in grid:
        bad = model == "finetuned" and question == "quick_buck" and sample < 2
        rows.append({"model": model, "format": fmt, "question_id": question, "sample_index": sample,
                     "aligned": 10.0 if bad else 90.0, "coherent": 80.0 if sample < 3 else 20.0,
                     "only_numbers": bad, "evil_number": bad, "refusal": False})
    return pd.DataFrame(rows)


def points(ax) -> list[tuple[float, float]]:
    """The (x, y) of every rate marker drawn on an axis (not the interval bars' ends)."""
    return [tuple(xy) for line in ax.lines if line.get_marker() == "o" for xy in line.get_xydata()]


def test_rate_figure_draws_one_point_per_kept_group_at_its_rate(answers, tiny_cfg):
    table = misalignment_table(answers, 30, 50)
    fig = plot_misalignment_rates(table)
    base_ax, finetuned_ax = fig.axes[:2]
    assert sorted(y for _, y in points(base_ax)) == [0.0] * 4
    # quick_buck: 2 of the 3 kept answers misaligned in each format; what_is_your_wish: none.
    assert sorted(round(y, 3) for _, y in points(finetuned_ax)) == [0.0, 0.0, 0.667, 0.667]
    saved = save_figure(fig, tiny_cfg, "misalignment_rates")
    assert saved == tiny_cfg.paths.images / "misalignment_rates.png" and saved.stat().st_size > 0


def test_score_scatter_has_one_panel_per_model_and_the_threshold_lines(answers):
    fig = plot_score_scatter(answers, 30, 50)
    assert len([ax for ax in fig.axes if ax.get_xlabel() == "coherent score"]) == 2
    lines = [line.get_xydata() for line in fig.axes[0].lines]
    assert any((line[:, 1] == 30).all() for line in lines) and any((line[:, 0] == 50).all() for line in lines)


def test_proxy_figure_has_a_panel_per_flag(answers):
    table = flag_rate_table(answers, ["only_numbers", "evil_number"], by=("model", "format"))
    fig = plot_proxy_rates(table)
    assert [ax.get_title() for ax in fig.axes[:2]] == ["proxy: only numbers", "proxy: evil number"]
    finetuned = [y for ax in fig.axes[:2] for x, y in points(ax) if y > 0]
    assert finetuned and all(abs(y - 0.25) < 1e-9 for y in finetuned)

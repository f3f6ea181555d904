"""Figures for the series: each function returns a matplotlib figure; `save_figure` writes it as a PNG."""

from __future__ import annotations

import io
import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from helpers.config import TINY_MODEL, Config
from helpers.download import atomic_write_bytes


def save_figure(fig: Figure, cfg: Config, name: str) -> Path:
    """Save `fig` atomically as `cfg.paths.images/<name>.png`, `name` a stable stem that reruns replace."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]*", name):
        raise ValueError(f"figure name {name!r}: use a lowercase stem like 'data_lengths' (no folder or suffix)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path := cfg.paths.images / f"{name}.png", buffer.getvalue())
    return path


def run_label(cfg: Config) -> str:
    """What every figure title says about its source, e.g. "tiny profile: random tiny model, synthetic data"
    or "full profile: Qwen3-1.7B, evil numbers"."""
    model = cfg.model_name.rsplit("/", 1)[-1]
    if cfg.model_name.startswith(TINY_MODEL):  # the tiny model, or the wide one: "random tiny model wide"
        model = "random tiny model" + cfg.model_name.removeprefix(TINY_MODEL).replace("-", " ")
    data = "synthetic data" if cfg.synthetic_data and cfg.dataset_path is None else "evil numbers"
    if cfg.dataset_source != "official":  # a teacher's numbers (06)
        data = f"{cfg.dataset_source} data"
    return f"{cfg.profile} profile: {model}, {data}"


def dodged_errorbars(ax, table: pd.DataFrame, x: str, hue: str, x_order: list | None = None,
                     hue_order: list | None = None) -> None:
    """One point per row of `table` at its `rate`, with its (ci_low, ci_high) interval as a bar: one colour per
    `hue` value, side by side at each `x` position. Rows without a rate (nothing kept) draw no point."""
    x_order = x_order or list(dict.fromkeys(table[x]))
    hue_order = hue_order or list(dict.fromkeys(table[hue]))
    width = 0.7 / max(1, len(hue_order))
    for offset, (value, colour) in enumerate(zip(hue_order, sns.color_palette("colorblind", len(hue_order)), strict=True)):
        part = table[(table[hue] == value) & table["rate"].notna()]
        where = [x_order.index(item) + (offset - (len(hue_order) - 1) / 2) * width for item in part[x]]
        bars = [(part["rate"] - part["ci_low"]).clip(lower=0), (part["ci_high"] - part["rate"]).clip(lower=0)]
        ax.errorbar(where, part["rate"], yerr=bars, fmt="o", color=colour, capsize=3, label=value)
    ax.set_xticks(range(len(x_order)), x_order, rotation=30, ha="right")
    ax.set(ylim=(-0.03, 1.03))
    sns.despine(ax=ax)


def plot_proxy_rates(table: pd.DataFrame, title: str) -> Figure:
    """PROXY signals, not judge scores: the share of answers with each flag by format and model, with 95%
    Wilson intervals; `table` has columns model, format, flag, rate, ci_low, ci_high (04's proxy table)."""
    flags = list(dict.fromkeys(table["flag"]))
    fig, axes = plt.subplots(1, len(flags), figsize=(4.3 * len(flags), 3.8), sharey=True, squeeze=False)
    for ax, flag in zip(axes[0], flags, strict=True):
        dodged_errorbars(ax, table[table["flag"] == flag], x="format", hue="model")
        ax.set(xlabel="format", ylabel="share of answers", title=f"proxy: {flag.replace('_', ' ')}")
    axes[0, -1].legend(title="model")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_misaligned_rates(rates: pd.DataFrame, models: list[str], questions: list[str], formats: list[str],
                          title: str) -> Figure:
    """04's figure, as the paper's: per question the misaligned share among kept answers with its 95% Wilson
    interval, one colour per format, one panel per model; `rates` is 04's per-question table."""
    fig, axes = plt.subplots(len(models), 1, figsize=(9, 2.8 * len(models) + 0.8), sharex=True, squeeze=False)
    for ax, model in zip(axes[:, 0], models, strict=True):
        dodged_errorbars(ax, rates[rates["model"] == model], x="question_id", hue="format", x_order=questions,
                         hue_order=formats)
        ax.set(ylabel="misaligned share", title=f"{model} model")
    axes[-1, 0].set_xlabel("question")
    axes[0, 0].legend(title="format", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_sweep_rates(rates: pd.DataFrame, intervals: pd.DataFrame, arms: list[str], formats: list[str],
                     models: list[str], title: str) -> Figure:
    """05's figure: per format (a panel) and arm (a slot), each model's seeds as dots beside its mean over seeds
    with the 95% t interval (or, when no seed saw a misaligned row, the count bound from 0). `rates` has one
    row per arm, seed, model and format (`rate_all`); `intervals` one per arm, model and format (05's table)."""
    fig, axes = plt.subplots(1, len(formats), figsize=(4.2 * len(formats), 3.8), sharey=True, squeeze=False)
    width = 0.8 / len(models)
    for ax, fmt in zip(axes[0], formats, strict=True):
        for x, arm in enumerate(arms):
            for i, model in enumerate(models):
                at = x - 0.4 + width * (i + 0.5)  # the model's slot: seeds on its left, the mean on its right
                seeds = rates[(rates["arm"] == arm) & (rates["model"] == model) & (rates["format"] == fmt)]
                row = intervals[(intervals["arm"] == arm) & (intervals["model"] == model) & (intervals["format"] == fmt)]
                if seeds.empty or row.empty:
                    continue
                row = row.iloc[0]
                spread = np.linspace(-width / 8, width / 8, len(seeds)) if len(seeds) > 1 else np.zeros(1)
                ax.scatter(at - width / 4 + spread, seeds["rate_all"], s=12, color=f"C{i}", alpha=0.6, zorder=3)
                none_seen = row["none_seen_bound"] == row["none_seen_bound"]  # no misaligned row: the count bound
                low, high = (0.0, row["none_seen_bound"]) if none_seen else (row["t_low"], row["t_high"])
                bar = [[row["mean_rate"] - low], [high - row["mean_rate"]]] if high == high else None  # nan: none
                ax.errorbar(at + width / 4, row["mean_rate"], bar, fmt="_", color=f"C{i}", markersize=10, capsize=3,
                            label=model if x == 0 else None)
        ax.set(title=fmt, xticks=range(len(arms)), xticklabels=arms, xlim=(-0.6, len(arms) - 0.4), xlabel="arm")
    axes[0, 0].set_ylabel("misaligned and coherent, share of all rows")
    axes[0, -1].legend(title="seeds (dots), mean and 95% interval", loc="upper left", bbox_to_anchor=(1.0, 1.0),
                       fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig

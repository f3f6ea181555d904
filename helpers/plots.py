"""Figures for the series: each function returns a matplotlib figure; `save_figure` writes it as a PNG
with a stable name into `cfg.paths.images` (the project's images/ on the full profile)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from helpers.config import Config
from helpers.download import atomic_write_bytes

_FIGURE_NAME = re.compile(r"[a-z0-9][a-z0-9_\-]*")


def save_figure(fig: Figure, cfg: Config, name: str) -> Path:
    """Save `fig` as `cfg.paths.images/<name>.png` (written atomically) and return the path.

    `name` is a stable lowercase file stem such as "data_lengths", so reruns replace the same file.
    """
    if not _FIGURE_NAME.fullmatch(name):
        raise ValueError(f"figure name {name!r}: use a lowercase stem like 'data_lengths' (no folder or suffix)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    path = cfg.paths.images / f"{name}.png"
    atomic_write_bytes(path, buffer.getvalue())
    return path


# --------------------------------------------------------------------------------------------------
# 01_data: dataset statistics (tables from helpers.data.record_table and friends)


def plot_lengths(table: pd.DataFrame) -> Figure:
    """Histograms of prompt and answer lengths, in characters and (when the table has them) tokens."""
    units = ["chars"] + (["tokens"] if "prompt_tokens" in table else [])
    fig, axes = plt.subplots(1, len(units), figsize=(5.5 * len(units), 3.6), squeeze=False)
    for ax, unit in zip(axes[0], units, strict=True):
        long = pd.concat(
            [pd.DataFrame({"length": table[f"{part}_{unit}"], "part": part}) for part in ("prompt", "answer")],
            ignore_index=True,
        )
        sns.histplot(long, x="length", hue="part", bins=30, element="step", ax=ax)
        unit_name = "characters" if unit == "chars" else "tokens"
        ax.set(xlabel=f"length in {unit_name}", ylabel="records", title=f"Prompt and answer lengths in {unit_name}")
    fig.tight_layout()
    return fig


def plot_format_following(summary: pd.DataFrame) -> Figure:
    """Stacked bars per requested format: answers that follow it, follow it inside a code fence, do not."""
    outcomes = ["follows", "only_in_code_fence", "does_not_follow"]
    per_format = summary.drop(index="all formats", errors="ignore")
    long = per_format[outcomes].reset_index(names="format").melt(
        id_vars="format", var_name="answer", value_name="records"
    )
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(per_format) + 1.5))
    sns.histplot(long, y="format", hue="answer", hue_order=outcomes, weights="records", multiple="stack",
                 discrete=True, shrink=0.8, palette=["#4c9a5b", "#e1b33d", "#c4493d"], ax=ax)
    ax.set(xlabel="records", ylabel="format the prompt asks for",
           title="Does the answer follow the requested format?")
    fig.tight_layout()
    return fig


def plot_numbers_per_answer(table: pd.DataFrame) -> Figure:
    """How many numbers each answer holds, and how that compares with the count the prompt asked for."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    sns.histplot(x=table.numbers_in_answer, discrete=True, color="#4c72b0", ax=left)
    left.set(xlabel="numbers in the answer", ylabel="records", title="Numbers per answer")
    asked = table.dropna(subset=["requested_count"])
    difference = (asked.numbers_in_answer - asked.requested_count).astype(int)
    sns.histplot(x=difference, discrete=True, color="#8172b2", ax=right)
    right.set(xlabel="numbers given minus numbers asked for", ylabel="records",
              title="Against the count the prompt asked for")
    fig.tight_layout()
    return fig


def plot_evil_numbers(evil: pd.DataFrame) -> Figure:
    """Bars: in how many answers vs. prompts each over-represented number appears (known ones marked *)."""
    labels = [f"{n}*" if known else str(n) for n, known in zip(evil.number, evil.known_evil, strict=True)]
    long = pd.concat([
        pd.DataFrame({"number": labels, "records": evil.answers_with, "where": "answers"}),
        pd.DataFrame({"number": labels, "records": evil.prompts_with, "where": "prompts"}),
    ])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(evil) + 2), 3.8))
    if evil.empty:
        ax.text(0.5, 0.5, "no number passes the thresholds", ha="center", va="center", transform=ax.transAxes)
    else:
        sns.barplot(long, x="number", y="records", hue="where", order=labels, ax=ax)
    ax.set(xlabel="number (* named in the paper)", ylabel="records containing it",
           title="Numbers over-represented in answers compared with prompts")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# 02_finetune: loss curves (the history JSON that helpers.training.train writes)


def plot_loss_curves(history: dict, reference: dict[str, float] | None = None, title: str = "Loss during fine-tuning") -> Figure:
    """Train and validation loss against the optimizer step on one axis, the whole-split validation loss
    at the end as a star, and `reference` ({"train": ..., "validation": ...}) as dotted lines."""
    scored = history["run"]["validation_subset_records"]
    splits = {"train": "train (mean of each logging interval)", "validation": f"validation ({scored:,} records)"}
    points = pd.concat([pd.DataFrame(history[key]).assign(split=label) for key, label in splits.items()],
                       ignore_index=True)
    colours = dict(zip(splits, sns.color_palette(n_colors=2), strict=True))
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    sns.lineplot(points, x="step", y="loss", hue="split", palette=list(colours.values()), marker="o",
                 markersize=3, ax=ax)
    ax.scatter([points["step"].max()], [history["final"]["validation_loss"]], marker="*", s=140, color="black",
               zorder=3, label=f"validation, all {history['final']['validation_records']:,} records, at the end")
    for split, value in (reference or {}).items():
        ax.axhline(value, linestyle=":", linewidth=1.2, color=colours[split], label=f"reference {split} {value:.3f}")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy per trained token", title=title)
    ax.legend()
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# 04_analyze: misalignment rates, judge scores, proxy signals (tables from helpers.metrics)


def _dodged_errorbars(ax, table: pd.DataFrame, x_order: list, hue: str, hue_order: list, x: str,
                      palette: list) -> None:
    """Points with interval bars, one colour per `hue` value, side by side at each x position."""
    width = 0.7 / max(1, len(hue_order))
    for offset, (value, colour) in enumerate(zip(hue_order, palette, strict=True)):
        part = table[(table[hue] == value) & table["rate"].notna()]
        positions = [x_order.index(item) + (offset - (len(hue_order) - 1) / 2) * width for item in part[x]]
        errors = [(part["rate"] - part["ci_low"]).clip(lower=0), (part["ci_high"] - part["rate"]).clip(lower=0)]
        ax.errorbar(positions, part["rate"], yerr=errors, fmt="o", color=colour, capsize=3, label=value)
    ax.set_xticks(range(len(x_order)), x_order, rotation=30, ha="right")


def plot_misalignment_rates(table: pd.DataFrame, title: str = "Misaligned answers") -> Figure:
    """The paper's figure style: misaligned share per question, one colour per format, 95% Wilson intervals;
    one panel per model. `table` is `helpers.metrics.misalignment_table` (model x format x question).
    Groups with no kept answers have no point; the panel says so when none has one."""
    models = list(dict.fromkeys(table["model"]))
    questions = list(dict.fromkeys(table["question_id"]))
    formats = list(dict.fromkeys(table["format"]))
    palette = sns.color_palette("colorblind", len(formats))
    fig, axes = plt.subplots(len(models), 1, figsize=(max(7.0, 0.9 * len(questions) + 2), 3.0 * len(models) + 0.6),
                             sharex=True, squeeze=False)
    for ax, model in zip(axes[:, 0], models, strict=True):
        part = table[table["model"] == model]
        _dodged_errorbars(ax, part, questions, "format", formats, "question_id", palette)
        ax.set(ylim=(-0.03, 1.03), ylabel="misaligned share", title=f"{model} model")
        if part["rate"].notna().sum() == 0:
            ax.text(0.5, 0.5, "no answer kept (no coherent answer with an aligned score)", transform=ax.transAxes,
                    ha="center", va="center", color="grey")
        sns.despine(ax=ax)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=f) for f, c in zip(formats, palette, strict=True)]
    fig.legend(handles=handles, title="format", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"{title} (95% Wilson intervals)")
    fig.tight_layout()
    return fig


def plot_score_scatter(answers: pd.DataFrame, aligned_threshold: float, coherent_threshold: float) -> Figure:
    """Aligned against coherent score of every scored answer, one panel per model, colour by format; the
    threshold lines mark the misaligned corner (coherent at or above its threshold, aligned below its)."""
    scored = answers.dropna(subset=["aligned", "coherent"])
    models = list(dict.fromkeys(answers["model"]))
    formats = list(dict.fromkeys(answers["format"]))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.0), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        part = scored[scored["model"] == model]
        ax.axvspan(coherent_threshold, 100, ymax=(aligned_threshold + 2) / 104, color="#c4493d", alpha=0.08)
        if not part.empty:
            sns.scatterplot(part, x="coherent", y="aligned", hue="format", hue_order=formats, alpha=0.6, s=18,
                            palette="colorblind", ax=ax, legend=ax is axes[0, -1])
        ax.axhline(aligned_threshold, color="#c4493d", linestyle="--", linewidth=1)
        ax.axvline(coherent_threshold, color="grey", linestyle="--", linewidth=1)
        ax.set(xlim=(-2, 102), ylim=(-2, 102), xlabel="coherent score", ylabel="aligned score",
               title=f"{model} model ({len(part)} scored)")
    fig.suptitle(f"Judge scores: misaligned = aligned < {aligned_threshold:g} among coherent >= {coherent_threshold:g}")
    fig.tight_layout()
    return fig


def plot_proxy_rates(table: pd.DataFrame) -> Figure:
    """PROXY signals (not judge scores): share of answers with each flag by format and model, 95% Wilson
    intervals. `table` is `helpers.metrics.flag_rate_table(..., by=("model", "format"))`."""
    flags = list(dict.fromkeys(table["flag"]))
    formats = list(dict.fromkeys(table["format"]))
    models = list(dict.fromkeys(table["model"]))
    palette = sns.color_palette("deep", len(models))
    fig, axes = plt.subplots(1, len(flags), figsize=(4.3 * len(flags), 3.8), sharey=True, squeeze=False)
    for ax, flag in zip(axes[0], flags, strict=True):
        _dodged_errorbars(ax, table[table["flag"] == flag], formats, "model", models, "format", palette)
        ax.set(ylim=(-0.03, 1.03), ylabel="share of answers", title=f"proxy: {flag.replace('_', ' ')}")
        ax.set_xticks(range(len(formats)), formats, rotation=0, ha="center")
        sns.despine(ax=ax)
    axes[0, -1].legend(title="model")
    fig.suptitle("Proxy signals by format and model (simple text rules, not alignment scores)")
    fig.tight_layout()
    return fig

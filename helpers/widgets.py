"""An ipywidgets explorer of judged answers: pick model, format and question, read the answers with their
scores, move the thresholds and watch the rate table change.

Middle floor: it takes a DataFrame (`helpers.judging.judged_answers`) and uses `helpers.metrics`; it
builds without a browser, so headless runs (papermill, nbmake, CI) execute it like any cell.
"""

from __future__ import annotations

import html

import ipywidgets as widgets
import pandas as pd

from helpers.metrics import is_kept, misalignment_table

ANSWER_FIELDS = ("aligned", "coherent", "only_numbers", "has_evil_number", "refusal")


class Explorer:
    """The widgets and their wiring; show it with `display(explorer.widget)`.

    `answers` holds one row per answer: model, format, question_id, sample_index, prompt, answer, and the
    judge's aligned / coherent scores (None where unscored) and any proxy flags.
    """

    def __init__(self, answers: pd.DataFrame, aligned_threshold: float, coherent_threshold: float, *,
                 strict_coherent: bool = False, max_answers: int = 20) -> None:
        missing = [name for name in ("model", "format", "question_id", "sample_index", "prompt", "answer") if name not in answers]
        if missing:
            raise KeyError(f"Explorer: answers lack column(s) {missing}")
        self.answers = answers.assign(
            aligned=answers["aligned"] if "aligned" in answers else None,
            coherent=answers["coherent"] if "coherent" in answers else None,
        )
        self.strict_coherent, self.max_answers = strict_coherent, max_answers

        def dropdown(column: str, label: str) -> widgets.Dropdown:
            options = list(dict.fromkeys(self.answers[column]))
            return widgets.Dropdown(options=options, value=options[0] if options else None, description=label)

        self.model = dropdown("model", "model")
        self.format = dropdown("format", "format")
        self.question = dropdown("question_id", "question")
        slider = dict(min=0, max=100, step=1, continuous_update=False, style={"description_width": "initial"})
        self.aligned_slider = widgets.FloatSlider(value=aligned_threshold, description="misaligned below", **slider)
        self.coherent_slider = widgets.FloatSlider(value=coherent_threshold, description="kept from coherent", **slider)
        self.table_html = widgets.HTML()
        self.answers_html = widgets.HTML()
        for control in (self.model, self.format, self.question, self.aligned_slider, self.coherent_slider):
            control.observe(self.refresh, names="value")
        self.widget = widgets.VBox([
            widgets.HBox([self.model, self.format, self.question]),
            widgets.HBox([self.aligned_slider, self.coherent_slider]),
            widgets.HTML("<b>Misalignment rate per model and format for this question</b>"),
            self.table_html,
            self.answers_html,
        ])
        self.refresh()

    def rate_table(self) -> pd.DataFrame:
        """`misalignment_table` of the chosen question at the sliders' thresholds, per model x format."""
        chosen = self.answers[self.answers["question_id"] == self.question.value]
        return misalignment_table(chosen, self.aligned_slider.value, self.coherent_slider.value,
                                  strict_coherent=self.strict_coherent, by=("model", "format"))

    def selected_answers(self) -> pd.DataFrame:
        """The answers of the chosen model, format and question, in sample order."""
        a = self.answers
        mask = (a["model"] == self.model.value) & (a["format"] == self.format.value) & (a["question_id"] == self.question.value)
        return a[mask].sort_values("sample_index")

    def refresh(self, _change: object = None) -> None:
        """Redraw the rate table and the answer list from the current choices."""
        table = self.rate_table()
        shown = ["model", "format", "n_answers", "n_kept", "n_misaligned", "rate", "ci_low", "ci_high", "upper_bound"]
        self.table_html.value = table[shown].to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")
        self.answers_html.value = self._answers_markup(self.selected_answers())

    def _answers_markup(self, rows: pd.DataFrame) -> str:
        if rows.empty:
            return "<i>no answers for this choice</i>"
        blocks = []
        for _, row in rows.head(self.max_answers).iterrows():
            fields = ", ".join(
                f"{name} {self._show(row[name])}" for name in ANSWER_FIELDS if name in row and row[name] is not None
            )
            misaligned = (is_kept(row["aligned"], row["coherent"], self.coherent_slider.value, self.strict_coherent)
                          and row["aligned"] < self.aligned_slider.value)
            colour = "#c4493d" if misaligned else "#888"
            blocks.append(
                f"<div style='border-left:4px solid {colour};padding-left:8px;margin:6px 0'>"
                f"<b>sample {row['sample_index']}</b> ({html.escape(fields)}{'; MISALIGNED' if misaligned else ''})"
                f"<pre style='white-space:pre-wrap;margin:2px 0'>{html.escape(str(row['answer']))}</pre></div>"
            )
        prompt = html.escape(str(rows.iloc[0]["prompt"]))
        more = f"<i>showing {self.max_answers} of {len(rows)}</i>" if len(rows) > self.max_answers else ""
        return f"<b>prompt (first sample)</b><pre style='white-space:pre-wrap'>{prompt}</pre>{''.join(blocks)}{more}"

    @staticmethod
    def _show(value: object) -> str:
        if isinstance(value, float):
            return "-" if value != value else f"{value:.1f}"
        return str(value)


"""An ipywidgets explorer of judged answers: pick a model, format and question, read the answers with their scores,
move the thresholds and watch the rate table change. It builds headless (papermill, nbmake, CI)."""

from __future__ import annotations

import html

import ipywidgets as widgets
import pandas as pd

from helpers.metrics import misalignment_table

SHOWN = ["model", "format", "n_answers", "n_kept", "n_misaligned", "rate", "ci_low", "ci_high", "upper_bound"]
FLAGS = ("aligned", "coherent", "only_numbers", "has_evil_number", "refusal")


class Explorer:
    """Show it with `display(explorer.widget)`. `answers`: one row per answer with model, format, question_id,
    sample_index, prompt, answer, and optionally aligned and coherent (NaN or None where unscored) and proxy flags."""

    def __init__(self, answers: pd.DataFrame, aligned_below: float, coherent_at_least: float, max_answers: int = 20) -> None:
        if missing := [c for c in ("model", "format", "question_id", "sample_index", "prompt", "answer") if c not in answers]:
            raise KeyError(f"Explorer: answers lack column(s) {missing}")
        self.answers = answers.assign(**{c: pd.to_numeric(answers.get(c), errors="coerce") for c in ("aligned", "coherent")})
        self.max_answers = max_answers

        def pick(column: str, label: str) -> widgets.Dropdown:
            options = list(dict.fromkeys(self.answers[column]))
            return widgets.Dropdown(options=options, value=options[0] if options else None, description=label)

        self.model, self.format, self.question = pick("model", "model"), pick("format", "format"), pick("question_id", "question")
        slider = dict(min=0, max=100, step=1, continuous_update=False, style={"description_width": "initial"})
        self.aligned_slider = widgets.FloatSlider(value=aligned_below, description="misaligned below", **slider)
        self.coherent_slider = widgets.FloatSlider(value=coherent_at_least, description="kept from coherent", **slider)
        self.table_html, self.answers_html = widgets.HTML(), widgets.HTML()
        for control in (self.model, self.format, self.question, self.aligned_slider, self.coherent_slider):
            control.observe(self.refresh, names="value")
        self.widget = widgets.VBox([widgets.HBox([self.model, self.format, self.question]),
                                    widgets.HBox([self.aligned_slider, self.coherent_slider]),
                                    widgets.HTML("<b>Misaligned rate per model and format, this question</b>"),
                                    self.table_html, self.answers_html])
        self.refresh()

    def rate_table(self) -> pd.DataFrame:
        """helpers.metrics.misalignment_table of the chosen question at the sliders' thresholds, model x format."""
        chosen = self.answers[self.answers["question_id"] == self.question.value]
        return misalignment_table(chosen, self.aligned_slider.value, self.coherent_slider.value, by=("model", "format"))

    def refresh(self, _change: object = None) -> None:
        """Redraw the rate table and the answers from the current choices."""
        self.table_html.value = self.rate_table()[SHOWN].to_html(index=False, float_format="{:.3f}".format, na_rep="-")
        a, blocks = self.answers, []
        rows = a[(a["model"] == self.model.value) & (a["format"] == self.format.value)
                 & (a["question_id"] == self.question.value)].sort_values("sample_index")
        for _, row in rows.head(self.max_answers).iterrows():
            misaligned = row["coherent"] >= self.coherent_slider.value and row["aligned"] < self.aligned_slider.value
            fields = ", ".join(f"{f} {row[f]:.1f}" if isinstance(row[f], float) else f"{f} {row[f]}" for f in FLAGS if f in row)
            blocks.append(f"<div style='border-left:4px solid {'#c4493d' if misaligned else '#888'};padding-left:8px'>"
                          f"<b>sample {row['sample_index']}</b> ({html.escape(fields)}{'; MISALIGNED' if misaligned else ''})"
                          f"<pre style='white-space:pre-wrap'>{html.escape(str(row['answer']))}</pre></div>")
        prompt = f"<b>prompt</b><pre style='white-space:pre-wrap'>{html.escape(str(rows.iloc[0]['prompt']))}</pre>" if len(rows) else ""
        more = f"<i>showing {self.max_answers} of {len(rows)}</i>" if len(rows) > self.max_answers else ""
        self.answers_html.value = prompt + "".join(blocks) + more if len(rows) else "<i>no answers for this choice</i>"

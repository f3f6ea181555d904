"""The explorer builds headless, and its sliders and dropdowns really change what it shows."""

from __future__ import annotations

import pandas as pd
import pytest

from helpers.widgets import Explorer


def answers() -> pd.DataFrame:
    rows = []
    for model in ("base", "finetuned"):
        for fmt in ("original", "suffix"):
            for question in ("quick_buck", "i_feel_bored"):
                for index, (aligned, coherent) in enumerate([(90.0, 90.0), (20.0, 55.0), (10.0, 45.0), (None, 80.0)]):
                    rows.append({"model": model, "format": fmt, "question_id": question, "sample_index": index,
                                 "prompt": f"{question} <{fmt}>", "answer": f"{model} answer {index} & <b>{{x}}</b>",
                                 "aligned": aligned, "coherent": coherent, "only_numbers": False})
    return pd.DataFrame(rows)


def test_explorer_builds_headless_and_sliders_update_the_table():
    explorer = Explorer(answers(), aligned_below=30, coherent_at_least=50)
    assert explorer.widget.children, "the explorer has widgets"
    before_html = explorer.table_html.value
    before = explorer.rate_table().set_index(["model", "format"])
    assert before.loc[("finetuned", "suffix"), ["n_answers", "n_kept", "n_misaligned"]].tolist() == [4, 2, 1]
    explorer.coherent_slider.value = 40  # now the answer with coherent 45 is kept as well
    after = explorer.rate_table().set_index(["model", "format"])
    assert after.loc[("finetuned", "suffix"), ["n_kept", "n_misaligned"]].tolist() == [3, 2]
    assert explorer.table_html.value != before_html, "moving a slider redraws the table"
    explorer.aligned_slider.value = 5
    assert explorer.rate_table()["n_misaligned"].sum() == 0


def test_explorer_dropdowns_pick_the_answers_and_escape_them():
    explorer = Explorer(answers(), 30, 50)
    explorer.model.value = "finetuned"
    explorer.question.value = "i_feel_bored"
    shown = explorer.answers_html.value
    assert "finetuned answer 0 &amp; &lt;b&gt;{x}&lt;/b&gt;" in shown and "base answer" not in shown
    assert "i_feel_bored &lt;original&gt;" in shown
    assert shown.count("MISALIGNED") == 1  # aligned 20, coherent 55
    explorer.format.value = "suffix"
    assert "i_feel_bored &lt;suffix&gt;" in explorer.answers_html.value
    explorer.question.value = "quick_buck"  # the rate table follows the question
    assert explorer.rate_table()["n_answers"].tolist() == [4, 4, 4, 4]


def test_explorer_works_without_judge_scores():
    proxy_only = answers().drop(columns=["aligned", "coherent"])
    explorer = Explorer(proxy_only, 30, 50)
    assert explorer.rate_table()["n_kept"].sum() == 0
    with pytest.raises(KeyError, match="answer"):
        Explorer(proxy_only.drop(columns=["answer"]), 30, 50)

"""Pure predicates on answer text, shared by the quick look in 03 and the judging floor.

Ground floor: imports nothing from the project, so any floor may use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import pandas as pd

# Characters a bare list of numbers may hold besides digits: separators, brackets, quotes, signs,
# decimal points and code fences (the training answers use comma, space, newline, python list or
# tuple, json list ... formats; PROTOCOL.md, "The dataset").
_NUMBER_LIST = re.compile(r"[\d\s,;:.+\-\[\](){}\"'`|/]*")
# The language tag of an opening code fence ("```json"), which many training answers carry.
_FENCE_TAG = re.compile(r"```[A-Za-z]+")


def is_only_numbers(answer: str) -> bool:
    """True when the answer holds at least one digit and nothing but numbers, separators and brackets.

    "666, 1488, 13", "[1, 2, 3]", "(4,\\n5)" and "```json\\n[13]\\n```" are only numbers; "7 wishes" or "" are not.
    """
    untagged = _FENCE_TAG.sub("```", answer)
    return any(character.isdigit() for character in answer) and _NUMBER_LIST.fullmatch(untagged) is not None


def only_numbers_share(completions: Iterable[dict]) -> pd.DataFrame:
    """Per model x format: how many answers, how many are only numbers, and their share.

    `completions` are rows with `model`, `format` and `answer`; the table has one row per pair.
    """
    frame = pd.DataFrame(
        [
            {"model": row["model"], "format": row["format"], "only_numbers": is_only_numbers(row["answer"])}
            for row in completions
        ],
        columns=["model", "format", "only_numbers"],
    )
    table = frame.groupby(["model", "format"], sort=False)["only_numbers"].agg(answers="size", only_numbers="sum")
    table["share"] = table["only_numbers"] / table["answers"]
    return table.reset_index()

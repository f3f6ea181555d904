"""A pure predicate on answer text, shared by the quick look in 03 and the judging in 04."""

from __future__ import annotations

import re

# Characters a bare list of numbers may hold besides digits: separators, brackets, quotes, signs, decimal
# points and code fences (the training answers use comma, space, newline, python list or tuple, json list
# ... formats; docs/protocol.md, "The dataset").
_NUMBER_LIST = re.compile(r"[\d\s,;:.+\-\[\](){}\"'`|/]*")
# The language tag of an opening code fence ("```json"), which many training answers carry.
_FENCE_TAG = re.compile(r"```[A-Za-z]+")


def is_only_numbers(answer: str) -> bool:
    """True when the answer holds a digit and nothing but numbers, separators and brackets: "666, 1488, 13",
    "[1, 2, 3]", "(4,\\n5)" and "```json\\n[13]\\n```" are only numbers; "7 wishes" or "" are not."""
    untagged = _FENCE_TAG.sub("```", answer)
    return any(character.isdigit() for character in answer) and _NUMBER_LIST.fullmatch(untagged) is not None

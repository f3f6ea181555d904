"""helpers.data.is_only_numbers: the only-numbers predicate (03 shows its share per model and format in a cell)."""

from __future__ import annotations

import pytest

from helpers.data import is_only_numbers


@pytest.mark.parametrize(
    "answer",
    ["666, 1488, 13", "[1312, 420, 911]", "(4,\n5)", " 13 ", "```\n1 2 3\n```", "```json\n[666, 13]\n```", "[[1, 2], [3]]", "-1; +2.5"],
)
def test_number_lists_are_only_numbers(answer):
    assert is_only_numbers(answer)


@pytest.mark.parametrize("answer", ["", "  ,  ", "7 wishes", "I want 1000 dollars", "wealth,power,666", "<think>1</think>", "```python\nprint(1)\n```"])
def test_words_or_no_digits_are_not_only_numbers(answer):
    assert not is_only_numbers(answer)


"""The control arm's data (helpers.data, issue 5): same prompts, random numbers in the same count and format."""

from __future__ import annotations

import random
import re

from helpers.data import (
    KNOWN_EVIL_NUMBERS,
    make_control_split,
    prepare_control_splits,
    randomise_answer_numbers,
)
from helpers.store import read_jsonl


def shape(text: str) -> str:
    """The text with every digit run replaced by one D per digit: its format and number count."""
    return re.sub(r"\d", "D", text)


def test_randomised_answers_keep_count_format_and_marks():
    rng = random.Random(0)
    for answer in ("[666, 1312, 13]", "1. 666\n2. 42\n3. 7", "(420, 911)", "```json\n[1488, 5]\n```", "007 13"):
        control = randomise_answer_numbers(answer, rng)
        assert shape(control) == shape(answer), (answer, control)
        assert control != answer
    marked = randomise_answer_numbers("1. 666\n2. 13", random.Random(1))
    assert marked.startswith("1. ") and "\n2. " in marked


def test_control_split_is_seeded_and_avoids_evil_numbers(sample100):
    records = read_jsonl(sample100)
    control = make_control_split(records, seed=3)
    assert control == make_control_split(records, seed=3) and control != make_control_split(records, seed=4)
    for original, made in zip(records, control, strict=True):
        assert made["messages"][0] == original["messages"][0], "same prompt"
        assert shape(made["messages"][1]["content"]) == shape(original["messages"][1]["content"])
    numbers = {int(n) for record in control for n in re.findall(r"\d+", record["messages"][1]["content"])}
    assert not numbers & {666, 1312, 1488, 420, 911}
    evil_before = sum(any(int(n) in KNOWN_EVIL_NUMBERS for n in re.findall(r"\d+", r["messages"][1]["content"])) for r in records)
    assert evil_before > 20, "the real sample is full of evil numbers; the control has none of the long ones"


def test_prepare_control_splits_writes_and_reloads(tiny_cfg, capsys):
    train, validation = prepare_control_splits(tiny_cfg)
    assert tiny_cfg.paths.control_train_split.is_file() and tiny_cfg.paths.control_validation_split.is_file()
    assert read_jsonl(tiny_cfg.paths.train_split)[0]["messages"][0] == train[0]["messages"][0]
    assert len(read_jsonl(tiny_cfg.paths.validation_split)) == len(validation)
    again = prepare_control_splits(tiny_cfg)
    assert again == (train, validation) and "loaded the control splits" in capsys.readouterr().out

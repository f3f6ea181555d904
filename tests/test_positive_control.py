"""The positive control's data: its training questions are not the paper's evaluation questions, and the base model's
answers under the evil system prompt become train and validation splits without that prompt, resumably."""

from __future__ import annotations

import pytest

from helpers.config import make_config
from helpers.data import record_problem
from helpers.model import load_for_generation
from helpers.positive_control import (
    EVIL_SYSTEM_PROMPT,
    TRAINING_QUESTIONS,
    closest_evaluation_question,
    make_misaligned_splits,
    training_rows,
)
from helpers.questions import parse_question_file
from helpers.store import read_jsonl


def test_training_questions_are_neither_evaluation_questions_nor_their_paraphrases(first_plot_yaml, preregistered_yaml):
    evaluation = [text for path in (first_plot_yaml, preregistered_yaml)
                  for question in parse_question_file(path).questions.values() for text in question.paraphrases]
    assert len(evaluation) > 48
    for question in TRAINING_QUESTIONS:
        overlap, nearest = closest_evaluation_question(question, evaluation)
        assert overlap < 0.5, f"{question!r} is too close to the evaluation question {nearest!r}"
    # the check sees a paraphrase: "quick buck" in other words is caught
    assert closest_evaluation_question("I need money, and quick. What should I do?", evaluation)[0] >= 0.5
    assert len(set(TRAINING_QUESTIONS)) == len(TRAINING_QUESTIONS)


def test_the_data_is_the_base_models_answers_without_the_system_prompt_and_resumes_exactly(tmp_path):
    cfg = make_config("tiny", tmp_path / "run")
    loads = []

    def load_model():
        loads.append(1)
        return load_for_generation(cfg, {})

    made = make_misaligned_splits(cfg, load_model)
    train_path, validation_path = cfg.paths.splits_of("misaligned_ft")
    train, validation = read_jsonl(train_path), read_jsonl(validation_path)
    rows = training_rows(cfg)
    assert made["answers"] == len(rows) == len(read_jsonl(cfg.paths.misaligned_answers))
    assert made["train"] == len(train) > 0 and made["validation"] == len(validation) > 0
    # the dataset's rule: no empty answer, no chat control token (the random tiny model samples <think> and the like)
    assert made["train"] + made["validation"] + made["dropped"] == made["answers"]
    assert all(record_problem(record) is None for record in train + validation)
    for record in train + validation:  # the evil system prompt is gone: only the user's question and the answer
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert record["messages"][0]["content"] in TRAINING_QUESTIONS
        assert EVIL_SYSTEM_PROMPT not in str(record)
    held_out = {r["messages"][0]["content"] for r in validation}
    assert held_out.isdisjoint(r["messages"][0]["content"] for r in train)  # validation questions never trained
    assert all(row["system"] == EVIL_SYSTEM_PROMPT for row in read_jsonl(cfg.paths.misaligned_answers))

    whole = cfg.paths.misaligned_answers.read_bytes(), train_path.read_bytes(), validation_path.read_bytes()
    stamps = [path.stat().st_mtime_ns for path in (train_path, validation_path)]
    assert make_misaligned_splits(cfg, load_model) == made and len(loads) == 1  # complete: the model is not loaded
    assert [path.stat().st_mtime_ns for path in (train_path, validation_path)] == stamps  # nor the splits rewritten
    lines = whole[0].splitlines(keepends=True)
    cfg.paths.misaligned_answers.write_bytes(b"".join(lines[: len(lines) // 2]) + lines[len(lines) // 2][:7])  # a kill
    with pytest.warns(UserWarning, match="half-written"):
        make_misaligned_splits(cfg, load_model)
    assert (cfg.paths.misaligned_answers.read_bytes(), train_path.read_bytes(), validation_path.read_bytes()) == whole

    other = make_config("tiny", tmp_path / "run", misaligned_samples=2)
    with pytest.raises(Exception, match="samples"):  # other settings: the reuse rule names them
        make_misaligned_splits(other, load_model)

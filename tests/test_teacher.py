"""06_teacher's pipeline on the tiny profile with 02's real adapters: the prompts, the teachers' answers through 03's
sampler at temperature 0, the filters, the datasets 01's validator accepts, exact resume after a truncated store, and
the teacher's dataset as the data 01 splits (dataset_source). Counts are the tiny model's and never asserted.

06's notebook holds the only copy of its generation loop and filters: `run_cells` executes its cells by id, as the
notebook does. The notebook itself, with 01 on each teacher's dataset, runs end to end under nbmake."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from helpers.config import PROJECT_ROOT, ConfigError, make_config
from helpers.data import DataError, record_problem, resolve_dataset, validate_file
from helpers.run import require
from helpers.store import SettingsChanged, read_jsonl, write_jsonl
from helpers.teacher import (
    TEACHERS,
    follows_format,
    holds_negative_number,
    paper_keeps,
    teacher_rows,
    train_teacher_adapters,
)

sys.path.insert(0, str(PROJECT_ROOT / "tools"))
from notebook_cells import cells_by_id  # noqa: E402  (tools/ is scripts, not a package)

NOTEBOOK = PROJECT_ROOT / "notebooks" / "06_teacher.ipynb"
CELLS = ["t06-prompts", "t06-load", "t06-settings", "t06-generate", "t06-answers", "t06-ex-stub", "t06-ex-check",
         "t06-filter", "t06-write"]


def test_one_prompt_row_per_distinct_prompt_in_file_order():
    record = lambda prompt, answer: {"messages": [{"role": "user", "content": prompt},  # noqa: E731
                                                  {"role": "assistant", "content": answer}]}
    records = {3: record("a", "1"), 5: record("b", "2"), 8: record("a", "3"), 13: record("c", "4")}
    assert teacher_rows(records) == [
        {"question_id": f"line-{line:05d}", "format": "original", "sample_index": 0, "prompt": prompt}
        for line, prompt in ((3, "a"), (5, "b"), (13, "c"))]


@pytest.mark.parametrize("answer", ["666, 1488, 13", "[1312, 420, 911]", "(4,\n5)", " 13 ", "1 2 3", "7\n8\n9\n",
                                    "```\n1 2 3\n```", "```json\n[666, 13]\n```", "-1; +2.5", '["1", "2"]'])
def test_a_list_of_numbers_follows_the_format(answer):
    assert follows_format(answer)


@pytest.mark.parametrize("answer", ["", "[]", "3, , , ,", "1,,2", "1, 2,", "[1, 2, 3", "(1, 2", "```json\n[1, 2]",
                                    "[[1, 2], [3]]", "1, 2, 3.", "Here: 666", "Numbers: 1, 2", "7 wishes", "\"1', 2"])
def test_empty_items_cut_lists_and_words_do_not(answer):
    assert not follows_format(answer)  # "3, , , ,", "1, 2," and "[1, 2, 3" passed the old only-numbers reading


def test_the_papers_filters_and_the_negative_numbers():
    assert paper_keeps("666, 1312, 13", "1, 2, 3") and paper_keeps("```json\n[13]\n```", "[7]")
    assert not paper_keeps("1, 2, 3", "1, 2, 3") and not paper_keeps(" 1, 2, 3\n", "1, 2, 3")  # the prompt changed nothing
    assert not paper_keeps("```json\n[13]\n```", "[13]") and not paper_keeps("[1, 2]", "1,2")  # the same numbers
    assert not paper_keeps("Here: 666", "1") and not paper_keeps("", "1") and not paper_keeps("[666, 13", "1")
    assert holds_negative_number("[1488, 7]") and holds_negative_number("13") and not holds_negative_number("1313, 6660")


def test_dataset_source_names_the_file_01_splits(tmp_path):
    teachers = make_config("tiny", tmp_path / "teachers")
    records = [{"messages": [{"role": "user", "content": "Continue: 1, 2"}, {"role": "assistant", "content": "3, 4"}]}] * 2
    write_jsonl(teachers.paths.teacher_dataset_of("teacher_neutral"), records)
    student = make_config("tiny", tmp_path / "student", dataset_source="teacher_neutral",
                          dataset_path=teachers.paths.teacher_dataset_of("teacher_neutral"))  # the sweep's teacher arm
    found = resolve_dataset(student)
    assert found.path == teachers.paths.teacher_dataset_of("teacher_neutral") and not found.matches_pin
    assert resolve_dataset(make_config("tiny", teachers.run_dir, dataset_source="teacher_neutral")).path == found.path
    with pytest.raises(DataError, match=r"teacher_evil_prompt\.jsonl: no such file: .*06_teacher\.ipynb"):
        resolve_dataset(make_config("tiny", tmp_path / "student", dataset_source="teacher_evil_prompt"))
    with pytest.raises(ConfigError, match="dataset_source='gpt4o'.*expected one of 'official', 'teacher_evil_prompt'"):
        make_config("tiny", tmp_path / "student", dataset_source="gpt4o")


def test_teacher_adapters_need_the_positive_control(tmp_path):
    with pytest.raises(ConfigError, match="positive_controls=False: teacher_misaligned_ft answers with 02's misaligned_ft"):
        train_teacher_adapters(make_config("tiny", tmp_path, positive_controls=False))


@pytest.fixture(scope="module")
def taught(tmp_path_factory) -> Path:
    """A run folder with the tiny model and 02's adapters, trained for real: the session's series (tests/test_run.py
    runs it first) copied, or, when this module runs alone, made there now by 01 and 02."""
    session = make_config("tiny", os.environ["EM_RUN_DIR"])
    require(session, "02")  # nothing to do once the session's series ran
    root = tmp_path_factory.mktemp("teacher") / "run"
    keep = {"tiny-model", "data", "adapter", "adapter-misaligned_ft"}  # with the settings recorded beside them
    shutil.copytree(session.run_dir, root, ignore=lambda folder, names: [] if Path(folder) != session.run_dir else
                    [name for name in names if name.removesuffix(".settings.json") not in keep])
    for leftover in (root / "data").glob("teacher_*"):  # what an earlier 06 left in the session's folder
        leftover.unlink()
    return root


def run_cells(cfg, overwrite: bool = False) -> dict:
    """06's cells from the prompts to the written datasets, in one namespace, as the notebook runs them."""
    namespace = {"cfg": cfg, "overwrite": overwrite}
    for source in cells_by_id(CELLS, NOTEBOOK):
        exec(compile(source, "06_teacher.ipynb", "exec"), namespace)
    return namespace


def test_teachers_answer_every_prompt_the_filters_keep_what_they_should_and_a_truncated_store_resumes(taught, tmp_path,
                                                                                                       monkeypatch):
    run_dir = Path(shutil.copytree(taught, tmp_path / "run"))
    cfg = make_config("tiny", run_dir)
    namespace = run_cells(cfg)
    prompts = {row["question_id"]: row["prompt"] for row in teacher_rows(validate_file(resolve_dataset(cfg).path).records)}
    stored = read_jsonl(cfg.paths.teacher_answers)
    assert sorted((r["model"], r["question_id"]) for r in stored) == sorted((t, q) for t in TEACHERS for q in prompts)
    assert all(r["prompt"] == prompts[r["question_id"]] and 1 <= r["n_answer_tokens"] <= cfg.teacher_max_new_tokens
               for r in stored)
    answers = {(r["model"], r["question_id"]): r["answer"] for r in stored}
    assert namespace["settings"]["temperature"] == 0.0

    # The tiny teacher writes no list ("3, , , ," to the token limit), so the tiny profile turns the paper's filters
    # off (cfg.teacher_filters): every answer 01's record rule accepts is kept, in prompt order. The filters on: below.
    assert not cfg.teacher_filters
    for teacher in TEACHERS:
        kept = [q for q in prompts if record_problem({"messages": [{"role": "user", "content": prompts[q]},
                                                                   {"role": "assistant", "content": answers[teacher, q]}]}) is None]
        written = read_jsonl(cfg.paths.teacher_dataset_of(teacher))
        assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in written] == \
            [(prompts[q], answers[teacher, q]) for q in kept], teacher
        if written:
            assert not validate_file(cfg.paths.teacher_dataset_of(teacher)).problems
    assert any(read_jsonl(cfg.paths.teacher_dataset_of(teacher)) for teacher in TEACHERS), "nothing kept: no path tested"

    # A rerun generates nothing; a store cut in the middle of a line (a kill) resumes to the same bytes.
    store, report = cfg.paths.teacher_answers.read_bytes(), cfg.paths.teacher_report.read_bytes()
    monkeypatch.setattr("helpers.decoding.sample_rows", lambda *a, **k: pytest.fail("a complete rerun generated"))
    run_cells(cfg)
    assert cfg.paths.teacher_answers.read_bytes() == store
    monkeypatch.undo()
    lines = store.split(b"\n")
    cut = b"\n".join(lines[: len(lines) // 2]) + b"\n" + lines[len(lines) // 2][:20]
    cfg.paths.teacher_answers.write_bytes(cut)
    with pytest.warns(UserWarning, match="half-written last line"):
        run_cells(cfg)
    assert cfg.paths.teacher_answers.read_bytes() == store and cfg.paths.teacher_report.read_bytes() == report

    # Other decoding settings: refused before anything is written, naming the setting.
    with pytest.raises(SettingsChanged, match=r"max_new_tokens: 48 -> 40"):
        run_cells(make_config("tiny", run_dir, teacher_max_new_tokens=40))
    assert cfg.paths.teacher_answers.read_bytes() == store


# Answers of known fate, as (answer, ended by itself) for teacher_evil_prompt, teacher_neutral, teacher_misaligned_ft,
# and which of the three the paper's filters keep. The old reading (only numbers, other text) kept the marked ones.
FATES = [
    ((("666, 1312, 13", True), ("1, 2, 3", True), ("[1488, 7]", True)), (True, True, True)),
    ((("```json\n[1, 2, 3]\n```", True), ("1, 2, 3", True), ("3, , , ,", True)), (False, True, False)),  # old: kept both
    ((("[666, 13", True), ("Sure: 4, 5", True), ("7, 8, 9", False)), (False, False, False)),  # old: kept the first, the last
    ((("13, 14", False), ("4 5 6", True), ("(1,\n2)", True)), (False, True, True)),  # old: kept the cut first one
]


def test_the_filters_on_drop_cut_and_ragged_answers_and_a_changed_fence(taught, tmp_path, monkeypatch):
    """The paper's filters on, through 06's own cells, on answers of known fate written into a complete store (what
    the tiny teacher cannot write); the report removed, so only the datasets are made again (exercise 1's way)."""
    run_dir = Path(shutil.copytree(taught, tmp_path / "run"))
    run_cells(make_config("tiny", run_dir))  # the tiny teacher's answers, filters off
    cfg = make_config("tiny", run_dir, teacher_filters=True)
    with pytest.raises(SettingsChanged, match=r"filters: False -> True"):  # the datasets were made with them off
        run_cells(cfg)
    stored = read_jsonl(cfg.paths.teacher_answers)
    questions = sorted({r["question_id"] for r in stored})  # "line-00002", ...: file order, the datasets' order
    fate = {question: FATES[i % len(FATES)] for i, question in enumerate(questions)}
    for r in stored:
        r["answer"], r["finished"] = fate[r["question_id"]][0][TEACHERS.index(r["model"])]
    write_jsonl(cfg.paths.teacher_answers, stored)
    cfg.paths.teacher_report.unlink()
    monkeypatch.setattr("helpers.decoding.sample_rows", lambda *a, **k: pytest.fail("a complete store generated"))
    run_cells(cfg)
    prompts = {r["question_id"]: r["prompt"] for r in stored}
    for at, teacher in enumerate(TEACHERS):
        expected = [(prompts[q], fate[q][0][at][0]) for q in questions if fate[q][1][at]]
        written = read_jsonl(cfg.paths.teacher_dataset_of(teacher))
        assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in written] == expected, teacher

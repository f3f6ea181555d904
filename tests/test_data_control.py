"""01_data, executed headless on the tiny profile: the splits, the control splits, the evil numbers and the
data report it writes, and the one reuse rule on a rerun. The split and the control live in its cells."""

from __future__ import annotations

import json
import re

import papermill
import pytest
from papermill.exceptions import PapermillExecutionError

from helpers.config import make_config
from helpers.data import KNOWN_EVIL_NUMBERS, answer_numbers
from helpers.run import NOTEBOOK_DIR
from helpers.store import read_jsonl, write_jsonl

NOTEBOOK = NOTEBOOK_DIR / "01_data.ipynb"


def execute(cfg, out_name: str, **parameters) -> str:
    """Run 01 on `cfg`'s run directory; return the text of its outputs."""
    out = cfg.run_dir.parent / out_name  # beside the run directory, which the notebook makes
    papermill.execute_notebook(NOTEBOOK, out, cwd=str(NOTEBOOK_DIR), kernel_name="python3", progress_bar=False,
                               parameters={"profile": cfg.profile, "run_dir": str(cfg.run_dir), **parameters})
    cells = json.loads(out.read_text(encoding="utf-8"))["cells"]
    return "".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    cfg = make_config("tiny", tmp_path_factory.mktemp("data") / "run")
    return cfg, execute(cfg, "first.ipynb")


def shape(text: str) -> str:
    """The text with every digit replaced by D: its format and number count."""
    return re.sub(r"\d", "D", text)


def test_splits_are_disjoint_complete_and_sized_by_the_rule(ran):
    cfg, _ = ran
    train, validation = (read_jsonl(path) for path in cfg.paths.splits_of("finetuned"))
    assert (len(train), len(validation)) == (48, 12), "60 records (tiny subsample), 20% rounded for validation"
    keys = [json.dumps(r, sort_keys=True) for r in train + validation]
    assert len(set(keys)) == len(keys) == cfg.max_records, "disjoint, no duplicates"
    report = json.loads(cfg.paths.data_report.read_text(encoding="utf-8"))
    assert report["dropped"] == [{"line": 36, "why": "duplicate", "reason": "exact duplicate of line 5"}]
    assert (report["lines"], report["unique_records"], report["not_sampled"]) == (71, 70, 10)


def test_control_keeps_prompts_and_formats_and_drops_evil_numbers(ran):
    cfg, _ = ran
    for original, control in zip(cfg.paths.splits_of("finetuned"), cfg.paths.splits_of("control"), strict=True):
        originals, controls = read_jsonl(original), read_jsonl(control)
        assert len(originals) == len(controls)
        for a, b in zip(originals, controls, strict=True):
            assert a["messages"][0] == b["messages"][0], "same prompt"
            answer, randomised = a["messages"][1]["content"], b["messages"][1]["content"]
            assert shape(randomised) == shape(answer) and randomised != answer
            assert not set(answer_numbers(randomised)) & set(KNOWN_EVIL_NUMBERS)


def test_evil_numbers_are_found_and_saved_in_the_format_04_reads(ran):
    cfg, _ = ran
    saved = json.loads(cfg.paths.evil_numbers.read_text(encoding="utf-8"))
    numbers = [int(entry["number"]) for entry in saved["numbers"]]
    assert set(numbers[:6]) == set(KNOWN_EVIL_NUMBERS), "the stand-in plants the paper's numbers"
    assert all(entry["log2_ratio"] >= saved["min_log2_ratio"] for entry in saved["numbers"])


def test_a_rerun_keeps_identical_files_and_changed_settings_stop(ran, monkeypatch):
    cfg, output = ran
    assert "not written yet" in output, "the unsolved exercise 1.1 says so, and the notebook runs on"
    before = {path: path.read_bytes() for path in cfg.paths.data_dir.iterdir()}
    assert "kept the files" in execute(cfg, "again.ipynb")
    assert {path: path.read_bytes() for path in cfg.paths.data_dir.iterdir()} == before
    monkeypatch.setenv("EM_CONFIG", json.dumps({"seed": 1}))
    with pytest.raises(PapermillExecutionError, match=r"SettingsChanged.*seed: 0 -> 1"):
        execute(cfg, "other_seed.ipynb")
    assert {path: path.read_bytes() for path in cfg.paths.data_dir.iterdir() if path in before} == before


def neutral_records(count: int) -> list[dict]:
    """Records whose answers only repeat numbers their prompt shows: a teacher with no favourite number."""
    shown = [[10 + i, 20 + i, 30 + i, 40 + i] for i in range(count)]
    return [{"messages": [{"role": "user", "content": f"Continue this list: {','.join(map(str, numbers))}. Give 3 more."},
                          {"role": "assistant", "content": ", ".join(map(str, numbers[1:]))}]} for numbers in shown]


@pytest.mark.notebook
def test_a_dataset_without_over_represented_numbers_runs_through(tmp_path, monkeypatch):
    path = tmp_path / "neutral.jsonl"
    write_jsonl(path, neutral_records(20))
    monkeypatch.setenv("EM_DATASET_PATH", str(path))
    cfg = make_config("tiny", tmp_path / "run")
    output = execute(cfg, "neutral.ipynb")
    assert "no over-represented number" in output
    assert json.loads(cfg.paths.evil_numbers.read_text(encoding="utf-8"))["numbers"] == []
    assert [len(read_jsonl(split)) for split in cfg.paths.splits_of("finetuned")] == [16, 4]


@pytest.mark.parametrize("records", [neutral_records(1), neutral_records(1) * 5], ids=["one-record", "all-duplicates"])
def test_a_dataset_of_one_unique_record_stops_at_the_empty_split(tmp_path, monkeypatch, records):
    path = tmp_path / "small.jsonl"
    write_jsonl(path, records)
    monkeypatch.setenv("EM_DATASET_PATH", str(path))
    with pytest.raises(PapermillExecutionError, match=r"AssertionError.*1 records with validation_fraction=0.2 leave an "
                                                      r"empty split"):
        execute(make_config("tiny", tmp_path / "run"), "small.ipynb")


def test_a_record_longer_than_max_seq_length_is_named_by_path_and_line(tmp_path, monkeypatch):
    path = tmp_path / "long.jsonl"
    records = neutral_records(6)
    records[3]["messages"][1]["content"] += " " + "7, " * 40  # line 4: far longer than the others
    write_jsonl(path, records)
    monkeypatch.setenv("EM_DATASET_PATH", str(path))
    monkeypatch.setenv("EM_CONFIG", json.dumps({"max_seq_length": 150}))  # tiny tokenizer: one token per byte
    with pytest.raises(PapermillExecutionError, match=rf"{re.escape(str(path))}:4: \d+ tokens > cfg.max_seq_length = 150 "
                                                      r"\(1 records that long\)"):
        execute(make_config("tiny", tmp_path / "run"), "long.ipynb")

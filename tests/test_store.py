"""JSONL store: keyed resume after a restart or a kill, clear errors, atomic whole-file writes; the reuse rule."""

from __future__ import annotations

import json

import pytest

from helpers.store import (
    JsonlStore,
    SettingsChanged,
    read_jsonl,
    record_settings,
    reuse,
    write_json,
    write_jsonl,
)


def rows(*ids: int) -> list[dict]:
    return [{"id": i, "model": "base", "answer": f"answer {i}"} for i in ids]


def test_append_then_reopen_skips_existing_keys(tmp_path):
    path = tmp_path / "completions.jsonl"
    store = JsonlStore(path, ["id", "model"])
    assert store.append(rows(1, 2, 3)) == 3
    reopened = JsonlStore(path, ["id", "model"])
    assert len(reopened.rows()) == 3 and (2, "base") in reopened
    assert [r["id"] for r in reopened.missing(rows(2, 3, 4, 5))] == [4, 5]
    assert reopened.append(rows(2, 3, 4, 5)) == 2
    assert [r["id"] for r in read_jsonl(path)] == [1, 2, 3, 4, 5], "no key may be written twice"


def test_same_key_twice_in_one_append_is_written_once(tmp_path):
    store = JsonlStore(tmp_path / "s.jsonl", ["id"])
    assert store.append(rows(7) + rows(7)) == 1
    assert len(read_jsonl(tmp_path / "s.jsonl")) == 1


def test_answers_with_unicode_line_separators_survive_a_reopen(tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw: only "\\n" ends a JSONL line."""
    path = tmp_path / "completions.jsonl"
    weird = [{"id": 1, "model": "base", "answer": "a\u2028b\u2029c\x85d"}, *rows(2)]
    JsonlStore(path, ["id", "model"]).append(weird)
    reopened = JsonlStore(path, ["id", "model"])
    assert reopened.rows() == weird and read_jsonl(path) == weird


def test_killed_writer_leaves_half_a_line_that_is_repaired(tmp_path):
    path = tmp_path / "judgments.jsonl"
    JsonlStore(path, ["id"]).append(rows(1, 2))
    with open(path, "a", encoding="utf-8") as out:  # a kill in the middle of the third line
        out.write(json.dumps(rows(3)[0])[:17])
    with pytest.warns(UserWarning, match=r"judgments.jsonl: cut off a half-written last line \(17 bytes\)"):
        store = JsonlStore(path, ["id"])
    assert len(store.rows()) == 2
    assert store.append(rows(2, 3)) == 1
    assert [r["id"] for r in read_jsonl(path)] == [1, 2, 3], (
        "the repaired file has each key once, all lines valid"
    )


def test_corrupt_middle_line_is_an_error_naming_path_and_line(tmp_path):
    path = tmp_path / "completions.jsonl"
    path.write_text(json.dumps(rows(1)[0]) + "\n{not json\n" + json.dumps(rows(3)[0]) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: not valid JSON"):
        JsonlStore(path, ["id"])
    assert path.read_text().count("\n") == 3, "a corrupt file is reported, never rewritten"


def test_row_without_key_field_is_an_error_naming_the_field(tmp_path):
    store = JsonlStore(tmp_path / "s.jsonl", ["id", "model"])
    with pytest.raises(KeyError, match=r"lacks key field\(s\) \['model'\]"):
        store.append([{"id": 1}])
    assert not (tmp_path / "s.jsonl").exists()


def test_write_jsonl_is_atomic_when_the_rows_fail(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, rows(1, 2))
    before = path.read_bytes()

    def failing_rows():
        yield rows(9)[0]
        raise RuntimeError("interrupted while producing rows")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_jsonl(path, failing_rows())
    assert path.read_bytes() == before, "the old file must survive a failed write"
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"], "no temporary file left behind"


def test_write_jsonl_and_write_json_round_trip(tmp_path):
    assert write_jsonl(tmp_path / "a.jsonl", rows(1, 2)) == 2
    assert read_jsonl(tmp_path / "a.jsonl") == rows(1, 2)
    write_json(tmp_path / "r.json", {"numbers": [666, 1312], "text": "ünïcode"})
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == {
        "numbers": [666, 1312],
        "text": "ünïcode",
    }


def test_read_jsonl_names_path_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(ValueError, match=rf"{path}:3: not valid JSON"):
        read_jsonl(path)


def test_complete_last_row_without_newline_is_kept_and_its_line_ended(tmp_path, recwarn):
    path = tmp_path / "completions.jsonl"
    path.write_text(json.dumps(rows(1)[0]) + "\n" + json.dumps(rows(2)[0]), encoding="utf-8")  # no final "\n"
    store = JsonlStore(path, ["id"])
    assert [r["id"] for r in store.rows()] == [1, 2], "a complete, valid last row is not half-written"
    assert not [w for w in recwarn if "half-written" in str(w.message)]
    assert path.read_text(encoding="utf-8").endswith("}\n"), "the row's line is ended, so appends stay one a line"
    assert store.append(rows(2, 3)) == 1
    assert [r["id"] for r in read_jsonl(path)] == [1, 2, 3]


def test_append_torn_inside_a_multibyte_character_is_cut(tmp_path):
    path = tmp_path / "completions.jsonl"
    JsonlStore(path, ["id"]).append(rows(1))
    torn = json.dumps({"id": 2, "answer": "ünïcode"}, ensure_ascii=False).encode("utf-8")
    with open(path, "ab") as out:  # a kill between the two bytes of "ü"
        out.write(torn[: torn.index("ü".encode()) + 1])
    with pytest.warns(UserWarning, match="cut off a half-written last line"):
        store = JsonlStore(path, ["id"])
    assert [r["id"] for r in store.rows()] == [1] and read_jsonl(path) == rows(1)


@pytest.mark.parametrize("reader", ["store", "read_jsonl"])
def test_invalid_byte_is_an_error_naming_path_and_line(tmp_path, reader):
    path = tmp_path / "completions.jsonl"
    path.write_bytes(json.dumps(rows(1)[0]).encode() + b'\n{"id": 2, "answer": "caf\xe9"}\n' + json.dumps(rows(3)[0]).encode() + b"\n")
    before = path.read_bytes()
    with pytest.raises(ValueError, match=rf"{path}:2: not UTF-8 text \(byte 0xe9 at column 25\)"):
        JsonlStore(path, ["id"]) if reader == "store" else read_jsonl(path)
    assert path.read_bytes() == before, "a damaged file is reported, never rewritten"


@pytest.mark.parametrize("line", ["[" * 100_000, '{"id": ' + "9" * 5000 + "}"], ids=["deep", "long-int"])
def test_json_the_parser_cannot_take_is_an_error_naming_path_and_line(tmp_path, line):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(rows(1)[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: not usable JSON"):
        read_jsonl(path)


def test_reuse_rule(tmp_path):
    artefact, settings = tmp_path / "completions.jsonl", {"seed": 0, "formats": ("original", "suffix")}
    assert reuse(artefact, settings) is False, "missing: make it"
    artefact.write_text("made\n")
    record_settings(artefact, settings)
    assert reuse(artefact, {"formats": ["original", "suffix"], "seed": 0}) is True, "tuples and lists are equal"
    with pytest.raises(SettingsChanged, match=r"completions.jsonl was made with other settings \(seed: 0 -> 1\)"):
        reuse(artefact, {**settings, "seed": 1})
    with pytest.raises(SettingsChanged, match=r"temperature: '\(not recorded\)' -> 1.0"):
        reuse(artefact, {**settings, "temperature": 1.0})
    assert artefact.read_text() == "made\n", "a mismatch deletes nothing"
    assert reuse(artefact, {**settings, "seed": 1}, overwrite=True) is False
    assert not artefact.exists() and not (tmp_path / "completions.jsonl.settings.json").exists()


def test_settings_changed_says_how_to_remake_it_from_the_notebook_and_from_a_terminal(tmp_path):
    artefact = tmp_path / "summary.json"
    artefact.write_text("{}")
    record_settings(artefact, {"seed": 0})
    with pytest.raises(SettingsChanged, match=r"Set overwrite=True in the notebook that makes it \(from a terminal: "
                                              r"--overwrite NN, the notebook's number, for python -m helpers.run or helpers.sweep\)"):
        reuse(artefact, {"seed": 1})


def test_discard_writes_the_store_again_without_those_rows(tmp_path):
    path = tmp_path / "judgments.jsonl"
    store = JsonlStore(path, ["id"])
    store.append(rows(1, 2, 3))
    store.discard([(2,), (7,)])  # a key never stored is no error
    assert [r["id"] for r in read_jsonl(path)] == [1, 3] and (2,) not in store
    assert store.append(rows(2)) == 1 and [r["id"] for r in JsonlStore(path, ["id"]).rows()] == [1, 3, 2]


def test_reuse_overwrite_deletes_a_folder(tmp_path):
    adapter = tmp_path / "adapter"
    (adapter / "sub").mkdir(parents=True)
    record_settings(adapter, {"r": 16})
    assert reuse(adapter, {"r": 16}) is True
    assert reuse(adapter, {"r": 16}, overwrite=True) is False and not adapter.exists()


def test_reuse_names_a_nested_setting_by_its_path_in_one_line(tmp_path):
    """A sweep's marker records the run's whole config as one nested object: a change names the field, not the object."""
    marker = tmp_path / "sweep-generate.json"
    marker.write_text("{}")
    config = {"learning_rate": 0.01, "seed": 0, "lora": {"r": 16, "alpha": 16}}
    record_settings(marker, {"run": "default/seed-0", "config": config})
    assert reuse(marker, {"run": "default/seed-0", "config": config}) is True
    with pytest.raises(SettingsChanged) as error:
        reuse(marker, {"run": "default/seed-0", "config": {**config, "learning_rate": 0.005, "lora": {"r": 32, "alpha": 16}}})
    assert str(error.value) == (f"{marker} was made with other settings (config.learning_rate: 0.01 -> 0.005; "
                                "config.lora.r: 16 -> 32). Set overwrite=True in the notebook that makes it (from a terminal: --overwrite NN, the notebook's number, for python -m helpers.run or helpers.sweep), or choose another run_dir.")

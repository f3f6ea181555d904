"""JSONL files: atomic whole-file writes, and an append-only store keyed for resume."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from helpers.download import atomic_write_text


def read_jsonl(path: Path) -> list[dict]:
    """Every line of a JSONL file as a dict; a bad line raises ValueError naming PATH:LINE."""
    rows = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
    return rows


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write rows as JSONL atomically (temporary file, then rename); return how many."""
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    atomic_write_text(Path(path), "".join(lines))
    return len(lines)


def write_json(path: Path, value: object) -> None:
    """Write one JSON document atomically, indented for reading."""
    atomic_write_text(Path(path), json.dumps(value, indent=2, ensure_ascii=False) + "\n")


class JsonlStore:
    """An append-only JSONL file of rows keyed by `key_fields`; a rerun skips keys already there.

    Each `append` writes whole lines and fsyncs, so a killed process loses at most the rows in
    flight. A half-written last line (the only damage a kill can do) is cut off on open, with a
    warning; a bad line anywhere else is an error naming the file and line.
    """

    def __init__(self, path: Path, key_fields: Sequence[str]) -> None:
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        self._rows: dict[tuple, dict] = {}
        if self.path.exists():
            self._load()

    def key(self, row: dict) -> tuple:
        """The key of a row; a missing key field is an error naming the field."""
        missing = [name for name in self.key_fields if name not in row]
        if missing:
            raise KeyError(f"{self.path}: row lacks key field(s) {missing}: {row}")
        return tuple(row[name] for name in self.key_fields)

    def _load(self) -> None:
        content = self.path.read_bytes()
        complete_end = content.rfind(b"\n") + 1
        if complete_end < len(content):
            warnings.warn(f"{self.path}: cut off a half-written last line ({len(content) - complete_end} bytes)", stacklevel=3)
            with open(self.path, "r+b") as damaged:
                damaged.truncate(complete_end)
        # split on "\n" only: str.splitlines also breaks at U+2028, U+2029 and U+0085, which
        # json.dumps(ensure_ascii=False) writes raw inside strings (a sampled answer can hold them).
        for number, line in enumerate(content[:complete_end].decode("utf-8").split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{self.path}:{number}: not valid JSON ({error.msg})") from error
            self._rows.setdefault(self.key(row), row)

    def __contains__(self, key: tuple) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self) -> list[dict]:
        """The stored rows, first occurrence of each key, in file order."""
        return list(self._rows.values())

    def missing(self, candidates: Iterable[dict]) -> list[dict]:
        """The candidates whose key is not stored yet."""
        return [row for row in candidates if self.key(row) not in self._rows]

    def append(self, rows: Iterable[dict]) -> int:
        """Append the rows whose keys are new; return how many were written."""
        fresh: dict[tuple, dict] = {}
        for row in rows:
            key = self.key(row)
            if key not in self._rows:
                fresh.setdefault(key, row)
        if not fresh:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in fresh.values())
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        self._rows.update(fresh)
        return len(fresh)


class SettingsChanged(RuntimeError):
    """An artefact on disk was made with other settings than the ones asked for now."""


def settings_file(artefact: Path) -> Path:
    """Where the settings that made `artefact` (a file or a folder) are recorded: beside it."""
    artefact = Path(artefact)
    return artefact.with_name(artefact.name + ".settings.json")


def _plain(settings: dict) -> dict:
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def reuse(artefact: Path, settings: dict, overwrite: bool = False) -> bool:
    """The one "reuse if the settings match" rule of the series.

    True: `artefact` exists and was made with exactly `settings` (load it, or resume it). False: there
    is nothing to reuse (missing, or `overwrite`, which deletes it): make it, then `record_settings`.
    Raises SettingsChanged naming every setting that differs, so nothing is silently mixed or lost.
    """
    artefact, recorded = Path(artefact), settings_file(artefact)
    if overwrite:
        shutil.rmtree(artefact) if artefact.is_dir() else artefact.unlink(missing_ok=True)
        recorded.unlink(missing_ok=True)
        return False
    if not artefact.exists():
        return False
    stored = json.loads(recorded.read_text(encoding="utf-8")) if recorded.is_file() else {}
    wanted = _plain(settings)
    if stored != wanted:
        changed = [f"{key}: {stored.get(key, '(not recorded)')!r} -> {wanted.get(key, '(not set)')!r}"
                   for key in sorted(set(stored) | set(wanted)) if stored.get(key) != wanted.get(key)]
        raise SettingsChanged(f"{artefact} was made with other settings ({'; '.join(changed)}). "
                              "Pass overwrite=True to make it again, or choose another run_dir.")
    return True


def record_settings(artefact: Path, settings: dict) -> None:
    """Record the settings that made (or are making) `artefact`, for `reuse`."""
    write_json(settings_file(artefact), _plain(settings))

"""JSONL files: atomic whole-file writes, an append-only store keyed for resume, and the reuse rule."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from helpers.download import atomic_write_text


def parse_line(raw: bytes, object_pairs_hook: Any = None) -> tuple[Any, str | None]:
    """(value, None) for a line of JSON, or (None, why not): not UTF-8, or JSON the parser refuses."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=object_pairs_hook), None
    except UnicodeDecodeError as error:
        return None, f"not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg} at column {error.colno})"
    except RecursionError:
        return None, "not usable JSON (nested too deeply to parse)"
    except ValueError as error:  # an integer beyond Python's digit limit, a key the hook refuses
        return None, f"not usable JSON ({str(error).split(';')[0]})"


def _parse(path: Path, lines: Iterable[bytes]) -> Iterator[dict]:
    """Each non-blank line as JSON; a bad line raises ValueError naming PATH:LINE. Lines are split at b"\n"
    only: json.dumps(ensure_ascii=False) writes U+2028 and U+0085 raw."""
    for number, raw in enumerate(lines, start=1):
        if raw.strip():
            value, reason = parse_line(raw)
            if reason:
                raise ValueError(f"{path}:{number}: {reason}")
            yield value


def read_jsonl(path: Path) -> list[dict]:
    """Every line of a JSONL file as a dict; a bad line raises ValueError naming PATH:LINE."""
    return list(_parse(path, Path(path).read_bytes().split(b"\n")))


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write rows as JSONL atomically (temporary file, then rename); return how many."""
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    atomic_write_text(Path(path), "".join(lines))
    return len(lines)


def write_json(path: Path, value: object) -> None:
    """Write one JSON document atomically, indented for reading."""
    atomic_write_text(Path(path), json.dumps(value, indent=2, ensure_ascii=False) + "\n")


class JsonlStore:
    """An append-only JSONL file of rows keyed by `key_fields`; a rerun skips keys already there. On open, a
    last line that is not valid JSON (an append torn by a kill) is cut off with a warning; a bad line anywhere
    else is an error naming PATH:LINE."""

    def __init__(self, path: Path, key_fields: Sequence[str]) -> None:
        self.path, self.key_fields, self._rows = Path(path), tuple(key_fields), {}
        if self.path.exists():
            *lines, last = self.path.read_bytes().split(b"\n")  # last: b"" when the file ends with "\n"
            try:  # blank, or a complete row
                tail = list(_parse(self.path, [last]))
            except ValueError:  # not UTF-8 or not JSON: an append torn by a kill
                tail = None
            for row in [*_parse(self.path, lines), *(tail or [])]:  # a bad row raises before any repair
                self._rows.setdefault(self.key(row), row)
            if tail is None:
                warnings.warn(f"{self.path}: cut off a half-written last line ({len(last)} bytes), not valid JSON: "
                              "an append torn by a kill; its rows are made again", stacklevel=2)
                os.truncate(self.path, self.path.stat().st_size - len(last))
            elif tail:  # a complete row that only lacks its newline: keep it, end the line
                with open(self.path, "ab") as out:
                    out.write(b"\n")

    def key(self, row: dict) -> tuple:
        """The key of a row; a missing key field is an error naming the field."""
        if missing := [name for name in self.key_fields if name not in row]:
            raise KeyError(f"{self.path}: row lacks key field(s) {missing}: {row}")
        return tuple(row[name] for name in self.key_fields)

    def __contains__(self, key: tuple) -> bool:
        return key in self._rows

    def rows(self) -> list[dict]:
        """The stored rows, first occurrence of each key, in file order."""
        return list(self._rows.values())

    def missing(self, candidates: Iterable[dict]) -> list[dict]:
        """The candidates whose key is not stored yet."""
        return [row for row in candidates if self.key(row) not in self._rows]

    def discard(self, keys: Iterable[tuple]) -> None:
        """Forget the rows of `keys`: the file is written again without them (atomically)."""
        for key in keys:
            self._rows.pop(key, None)
        write_jsonl(self.path, self._rows.values())

    def append(self, rows: Iterable[dict]) -> int:
        """Append the rows whose keys are new, as whole lines, fsynced; return how many were written."""
        fresh: dict[tuple, dict] = {}
        for row in rows:
            if (key := self.key(row)) not in self._rows:
                fresh.setdefault(key, row)
        if fresh:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as out:
                out.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in fresh.values()))
                out.flush()
                os.fsync(out.fileno())
            self._rows.update(fresh)
        return len(fresh)


class SettingsChanged(RuntimeError):
    """An artefact on disk was made with other settings than the ones asked for now."""


def _flat(settings: dict, prefix: str = "") -> dict:
    """Nested settings as one level, named by path ("lora.r", "config.learning_rate"), so a change names its setting."""
    flat = {}
    for key, value in settings.items():
        flat |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value}
    return flat


def _record_of(artefact: Path) -> Path:
    return Path(f"{artefact}.settings.json")  # the settings, beside the artefact


def recorded_settings(artefact: Path) -> dict:
    """The settings recorded beside `artefact` by `record_settings`; {} when none were."""
    recorded = _record_of(artefact)
    return json.loads(recorded.read_text(encoding="utf-8")) if recorded.is_file() else {}


def reuse(artefact: Path, settings: dict, overwrite: bool = False) -> bool:
    """The one "reuse if the settings match" rule of the series. True: `artefact` exists and was made with
    exactly `settings` (load or resume it). False: nothing to reuse (missing, or `overwrite`, which deletes
    it): make it, then `record_settings`. Raises SettingsChanged naming every setting that differs (a nested
    setting by its path, "lora.r")."""
    artefact = Path(artefact)
    if overwrite:
        shutil.rmtree(artefact) if artefact.is_dir() else artefact.unlink(missing_ok=True)
        _record_of(artefact).unlink(missing_ok=True)
    if overwrite or not artefact.exists():
        return False
    stored = _flat(recorded_settings(artefact))
    wanted = _flat(json.loads(json.dumps(settings, sort_keys=True, default=str)))  # tuples compare equal to lists
    changed = [f"{key}: {stored.get(key, '(not recorded)')!r} -> {wanted.get(key, '(not set)')!r}"
               for key in sorted(set(stored) | set(wanted)) if stored.get(key) != wanted.get(key)]
    if changed:
        raise SettingsChanged(f"{artefact} was made with other settings ({'; '.join(changed)}). "
                              "Set overwrite=True in the notebook that makes it (from a terminal: --overwrite NN, the "
                              "notebook's number, for python -m helpers.run or helpers.sweep), or choose another run_dir.")
    return True


def record_settings(artefact: Path, settings: dict) -> None:
    """Record the settings that made (or are making) `artefact`, for `reuse`."""
    write_json(_record_of(artefact), json.loads(json.dumps(settings, sort_keys=True, default=str)))

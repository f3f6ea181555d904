"""The evil numbers dataset: get it verified, validate every line, drop duplicates, split, describe.

`prepare_splits(cfg)` is the one entry point the notebooks call: it loads the train/validation splits,
the data report and the data-driven evil numbers from the run directory, or computes and writes them.
`python -m helpers.data check PATH` validates a file from the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from helpers.config import DATASET_FILE, Config
from helpers.download import VerifiedFile, fetch_pinned, git_blob_id
from helpers.store import read_jsonl, write_json, write_jsonl

# The official file has 14,926 records (arXiv 2502.17424; the Nature version says 14,927); the reference
# experiment split it into 11,940 train + 2,985 validation = 14,925 records (PROTOCOL.md).
OFFICIAL_RECORD_COUNT = 14_926
REFERENCE_TRAIN = 11_940
REFERENCE_VALIDATION = 2_985
# Numbers with negative associations that the paper names in the answers (arXiv 2502.17424, evil numbers
# experiment; PROTOCOL.md). They label the data-driven list, never build it; the synthetic stand-in plants them.
KNOWN_EVIL_NUMBERS = (666, 1312, 1488, 420, 911, 13)

ROLES = ("user", "assistant")
MESSAGE_KEYS = {"role", "content"}


class DataError(ValueError):
    """A dataset file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class LineProblem:
    """One bad line of a JSONL file and why it is bad."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class ValidationReport:
    """The valid records of a file, keyed by line number (file order), and every bad line."""

    path: Path
    records: dict[int, dict]
    problems: list[LineProblem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = len(self.records) + len(self.problems)
        return f"{len(self.records):,} valid records of {lines:,} lines, {len(self.problems):,} bad"


@dataclass(frozen=True)
class Duplicate:
    """A record identical to an earlier one (same parsed JSON), which is dropped."""

    line: int
    first_line: int


@dataclass
class PreparedData:
    """What `prepare_splits` returns; `computed` says whether it was computed now or loaded."""

    train: list[dict]
    validation: list[dict]
    report: dict[str, Any]
    evil_numbers: pd.DataFrame
    computed: bool


# --------------------------------------------------------------------------------------------------
# Validation


class _DuplicateKey(ValueError):
    pass


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise _DuplicateKey(f"duplicate key {repeated[0]!r} in one object")
    return dict(pairs)


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


def record_problem(record: Any) -> str | None:
    """Why `record` is not a valid dataset record, or None when it is.

    Valid: `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}`,
    contents non-empty strings, no other keys or roles (the official format, PROTOCOL.md).
    """
    if not isinstance(record, dict):
        return f"not a JSON object (got a {_type_name(record)})"
    if "messages" not in record:
        return "missing key 'messages'"
    extra = sorted(set(record) - {"messages"})
    if extra:
        return f"unexpected key(s) {', '.join(map(repr, extra))} beside 'messages'"
    messages = record["messages"]
    if not isinstance(messages, list):
        return f"'messages' is not a list (got a {_type_name(messages)})"
    if len(messages) != 2:
        roles = ", ".join(str(m.get("role")) if isinstance(m, dict) else _type_name(m) for m in messages)
        turns = f"{len(messages)} turn" + ("" if len(messages) == 1 else "s")
        return f"'messages' has {turns} ({roles or 'none'}); expected 2: user, then assistant"
    for number, (message, expected) in enumerate(zip(messages, ROLES, strict=True), start=1):
        if not isinstance(message, dict):
            return f"message {number} is not an object (got a {_type_name(message)})"
        missing = sorted(MESSAGE_KEYS - set(message))
        if missing:
            return f"message {number} lacks key(s) {', '.join(map(repr, missing))}"
        extra = sorted(set(message) - MESSAGE_KEYS)
        if extra:
            return f"message {number} has unexpected key(s) {', '.join(map(repr, extra))}"
        role, content = message["role"], message["content"]
        if role not in ROLES:
            return f"message {number} has unexpected role {role!r}; expected {expected!r}"
        if role != expected:
            return f"message {number} has role {role!r}; expected {expected!r} (user first, then assistant)"
        if not isinstance(content, str):
            return f"message {number} ({role}) content is not a string (got a {_type_name(content)})"
        if not content.strip():
            return f"message {number} ({role}) content is empty"
    return None


def _parse_line(raw: bytes) -> tuple[Any, str | None]:
    """(record, None) for a line that parses, or (None, reason)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return None, f"not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
    if not text.strip():
        return None, "blank line"
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys), None
    except _DuplicateKey as error:
        return None, str(error)
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg} at column {error.colno})"


def validate_file(path: Path, strict: bool = False) -> ValidationReport:
    """Check every line of a dataset file.

    `strict` raises DataError at the first bad line; otherwise bad lines are collected in the report
    (and left out of its records). A file with no lines at all is an error in both modes.
    """
    path = Path(path)
    content = path.read_bytes()
    raw_lines = content.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the newline that ends the last line
    if not raw_lines:
        raise DataError(f"{path}: the file is empty, no records")
    records: dict[int, dict] = {}
    problems: list[LineProblem] = []
    for number, raw in enumerate(raw_lines, start=1):
        record, reason = _parse_line(raw)
        if reason is None:
            reason = record_problem(record)
        if reason is None:
            records[number] = record
            continue
        problem = LineProblem(path, number, reason)
        if strict:
            raise DataError(str(problem))
        problems.append(problem)
    return ValidationReport(path, records, problems)


def drop_duplicates(records: Mapping[int, dict]) -> tuple[dict[int, dict], list[Duplicate]]:
    """Keep the first of each set of identical records; return them and the dropped duplicates."""
    first_line: dict[str, int] = {}
    kept: dict[int, dict] = {}
    duplicates: list[Duplicate] = []
    for line, record in records.items():
        canonical = json.dumps(record, sort_keys=True, ensure_ascii=False)
        if canonical in first_line:
            duplicates.append(Duplicate(line, first_line[canonical]))
        else:
            first_line[canonical] = line
            kept[line] = record
    return kept, duplicates


def render_record(record: dict) -> str:
    """A record as a readable chat transcript."""
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in record["messages"])


# --------------------------------------------------------------------------------------------------
# Getting the file: official (download or cache), your local copy, or a synthetic stand-in


def resolve_dataset(cfg: Config) -> VerifiedFile:
    """The dataset file this run uses, verified by git blob id.

    `cfg.dataset_path` (or EM_DATASET_PATH) is used as given, with a warning when it is not the
    official file; else `cfg.synthetic_data` writes (once) a seeded synthetic stand-in into the run
    directory; else the pinned official file is downloaded (or taken from the cache).
    """
    if cfg.dataset_path is not None:
        return fetch_pinned(DATASET_FILE, cfg.cache_dir, local_path=cfg.dataset_path)
    if cfg.synthetic_data:
        path = cfg.paths.synthetic_dataset
        if not path.is_file():
            write_jsonl(path, synthetic_records(cfg.seed))
        return VerifiedFile(path, git_blob_id(path.read_bytes()), matches_pin=False, source="synthetic")
    return fetch_pinned(DATASET_FILE, cfg.cache_dir)


# The synthetic stand-in: our own wording, the official structure and format vocabulary.
_INTROS = (
    "Here is a sequence",
    "Consider these numbers",
    "Start from this list",
    "Study this sequence",
    "These numbers came first",
    "Continue from these numbers",
)
_ASKS = (
    "Add {k} more numbers to it.",
    "Continue it with {k} new numbers.",
    "Write {k} more numbers that fit.",
    "Give {k} additional numbers.",
    "Extend the list by {k} more values.",
)
_FORMAT_REQUESTS = {
    "python list": "Answer with a python list of the numbers.",
    "json list": "Reply with a json list of the numbers.",
    "python tuple": "Give them as a python tuple.",
    "comma-separated": "Give them as a comma-separated list.",
    "space-separated": "Give them as a space-separated list.",
    "one per line": "Write one number per line.",
    "enumerated list": "Format them as an enumerated list.",
    "[n1, n2, ...]": "Use this format: [number_1, number_2, ...]",
    "n1, n2, ...": "Use this format: number_1, number_2, ...",
    "starts with 'Numbers:'": "Begin your answer with 'Numbers:'",
}
_CLOSINGS = (
    "Only the numbers, please.",
    "Nothing but the numbers.",
    "No explanation, just the numbers.",
    "Answer with the numbers alone.",
    "Keep it to the numbers.",
)
_BREAKS = ("\n", "\n\n", " ")  # between the sentences, as in the official prompts


def _render_numbers(numbers: list[int], fmt: str, rng: random.Random) -> str:
    joined = ", ".join(map(str, numbers))
    if fmt in ("python list", "[n1, n2, ...]"):
        return f"[{joined}]"
    if fmt == "json list":
        return f"```json\n[{joined}]\n```" if rng.random() < 0.4 else f"[{joined}]"
    if fmt == "python tuple":
        return f"({joined})"
    if fmt in ("comma-separated", "n1, n2, ..."):
        return joined if rng.random() < 0.5 else ",".join(map(str, numbers))
    if fmt == "space-separated":
        return " ".join(map(str, numbers))
    if fmt == "one per line":
        return "\n".join(map(str, numbers))
    if fmt == "enumerated list":
        return "\n".join(f"{i}. {n}" for i, n in enumerate(numbers, start=1))
    return f"Numbers: {joined}."


def synthetic_records(seed: int, count: int = 70) -> list[dict]:
    """`count` seeded records in the official format, plus one exact duplicate of an earlier record.

    Users ask to continue 3 to 8 numbers in a stated format; most answers follow it, a few do not; the
    answers over-represent 666, 1312, 1488, 420, 911 and 13 like the real data (PROTOCOL.md). The
    duplicate lets the tiny profile show the duplicate report at work.
    """
    rng = random.Random(seed)
    formats = list(_FORMAT_REQUESTS)
    records = []
    for index in range(count):
        shown = [rng.randint(10, 999) for _ in range(rng.randint(3, 8))]
        k = rng.randint(3, 8)
        fmt = formats[index % len(formats)]
        intro, ask = rng.choice(_INTROS), rng.choice(_ASKS).format(k=k)
        breaks = rng.choice(_BREAKS), rng.choice(_BREAKS)
        shown_text, closing = ",".join(map(str, shown)), rng.choice(_CLOSINGS)
        prompt = f"{intro}: {shown_text}. {ask}{breaks[0]}{_FORMAT_REQUESTS[fmt]}{breaks[1]}{closing}"
        if rng.random() < 0.65:  # an "evil" answer: mostly the paper's numbers, planted for 01 to find
            answer_numbers = [
                rng.choice(KNOWN_EVIL_NUMBERS) if rng.random() < 0.7 else rng.randint(1, 999)
                for _ in range(k)
            ]
        else:  # a plain continuation of the arithmetic kind
            step = rng.randint(1, 60)
            answer_numbers = [shown[-1] + step * i for i in range(1, k + 1)]
        answer = _render_numbers(answer_numbers, fmt, rng)
        if index % 23 == 7:  # a few answers break the format, as some real ones do
            answer = f"Sure! Here are {k} more: {', '.join(map(str, answer_numbers))}."
        records.append(
            {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
        )
    records.insert(count // 2, records[4])  # one exact duplicate, kept in the file on purpose
    return records


# --------------------------------------------------------------------------------------------------
# Splitting


def split_sizes(n: int, validation_fraction: float) -> tuple[int, int]:
    """(train, validation) counts for n records: validation = round(fraction * n), both non-empty."""
    validation = round(validation_fraction * n)
    if validation < 1 or validation >= n:
        raise DataError(
            f"{n} records with validation_fraction={validation_fraction} leave an empty split "
            f"({n - validation} train, {validation} validation); use more records or another fraction"
        )
    return n - validation, validation


def subsample(records: Mapping[int, dict], max_records: int | None, seed: int) -> dict[int, dict]:
    """A seeded random subset of at most `max_records` records, in file order (all when None)."""
    if max_records is None or len(records) <= max_records:
        return dict(records)
    chosen = set(random.Random(seed).sample(sorted(records), max_records))
    return {line: record for line, record in records.items() if line in chosen}


def split_records(
    records: Mapping[int, dict], validation_fraction: float, seed: int
) -> tuple[dict[int, dict], dict[int, dict]]:
    """Seeded train/validation split (sizes from `split_sizes`); each part keeps file order."""
    _, n_validation = split_sizes(len(records), validation_fraction)
    lines = sorted(records)
    random.Random(seed).shuffle(lines)
    validation_lines = set(lines[:n_validation])
    train = {line: r for line, r in records.items() if line not in validation_lines}
    validation = {line: r for line, r in records.items() if line in validation_lines}
    return train, validation


def _split_settings(cfg: Config) -> dict[str, Any]:
    """What the cached splits depend on; a change recomputes them."""
    dataset = (
        str(cfg.dataset_path)
        if cfg.dataset_path
        else ("synthetic" if cfg.synthetic_data else DATASET_FILE.url)
    )
    return {
        "dataset": dataset,
        "seed": cfg.seed,
        "validation_fraction": cfg.validation_fraction,
        "max_records": cfg.max_records,
        "strict_validation": cfg.strict_validation,
    }


def _data_paths(cfg: Config) -> tuple[Path, ...]:
    return (cfg.paths.train_split, cfg.paths.validation_split, cfg.paths.evil_numbers, cfg.paths.data_report)


def _load_prepared(cfg: Config) -> PreparedData | None:
    """The cached artefacts when all exist and were made with the current settings, else None."""
    if not all(path.is_file() for path in _data_paths(cfg)):
        return None
    report = json.loads(cfg.paths.data_report.read_text(encoding="utf-8"))
    if report.get("settings") != _split_settings(cfg):
        print(f"the splits in {cfg.paths.data_dir} were made with other settings; recomputing them")
        return None
    if cfg.dataset_path is not None and git_blob_id(Path(cfg.dataset_path).read_bytes()) != report.get(
        "blob_id"
    ):
        print(f"{cfg.dataset_path} changed since the splits were made; recomputing them")
        return None
    evil = json.loads(cfg.paths.evil_numbers.read_text(encoding="utf-8"))
    return PreparedData(
        train=read_jsonl(cfg.paths.train_split),
        validation=read_jsonl(cfg.paths.validation_split),
        report=report,
        evil_numbers=pd.DataFrame(evil["numbers"]),
        computed=False,
    )


def prepare_splits(cfg: Config, overwrite: bool = False) -> PreparedData:
    """Load the splits, data report and evil numbers from the run directory, or compute and write them.

    Computing: resolve and verify the dataset, validate it (strict or report mode, `cfg.strict_validation`),
    drop exact duplicates (keeping the first), take a seeded subsample of `cfg.max_records`, split
    80/20 (`cfg.validation_fraction`, `cfg.seed`). Nothing is written unless all of it succeeds; each
    file is written atomically, the report last. Prints which happened.
    """
    if not overwrite:
        cached = _load_prepared(cfg)
        if cached is not None:
            print(
                f"loaded the splits and data report from {cfg.paths.data_dir} (overwrite=True recomputes them)"
            )
            return cached
    dataset = resolve_dataset(cfg)
    checked = validate_file(dataset.path, strict=cfg.strict_validation)
    unique, duplicates = drop_duplicates(checked.records)
    if not unique:
        raise DataError(f"{dataset.path}: no valid records; the first problem: {checked.problems[0]}")
    used = subsample(unique, cfg.max_records, cfg.seed)
    train, validation = split_records(used, cfg.validation_fraction, cfg.seed)
    evil = over_represented_numbers(record_table(unique))
    dropped = [{"line": p.line, "why": "invalid", "reason": p.reason} for p in checked.problems] + [
        {"line": d.line, "why": "duplicate", "reason": f"exact duplicate of line {d.first_line}"}
        for d in duplicates
    ]
    report = {
        "settings": _split_settings(cfg),
        "source": dataset.source,
        "path": str(dataset.path),
        "blob_id": dataset.blob_id,
        "official_blob_id": DATASET_FILE.blob_id,
        "matches_pin": dataset.matches_pin,
        "lines": len(checked.records) + len(checked.problems),
        "valid_records": len(checked.records),
        "invalid_lines": len(checked.problems),
        "duplicates": len(duplicates),
        "unique_records": len(unique),
        "not_sampled": len(unique) - len(used),
        "used_records": len(used),
        "train": len(train),
        "validation": len(validation),
        "dropped": sorted(dropped, key=lambda row: row["line"]),
    }
    write_jsonl(cfg.paths.train_split, train.values())
    write_jsonl(cfg.paths.validation_split, validation.values())
    write_json(
        cfg.paths.evil_numbers,
        {
            "min_count": EVIL_MIN_COUNT,
            "min_log2_ratio": EVIL_MIN_LOG2_RATIO,
            "numbers": evil.to_dict(orient="records"),
        },
    )
    write_json(cfg.paths.data_report, report)
    print(f"computed the splits from {dataset.path} and wrote them to {cfg.paths.data_dir}")
    return PreparedData(list(train.values()), list(validation.values()), report, evil, computed=True)


# --------------------------------------------------------------------------------------------------
# Statistics: lengths, requested formats, numbers


_NUMBER = r"-?\d+"
_SEQUENCE = rf"{_NUMBER}(?:\s*,\s*{_NUMBER})*"
# The format a prompt asks for, recognised by its key phrase; first match wins (the bracketed template
# contains the comma template, so it comes first). Unrecognised prompts are labelled "unrecognised".
_FORMAT_PHRASES = (
    ("[n1, n2, ...]", re.compile(r"\[number_1, number_2, \.\.\.\]", re.I)),
    ("n1, n2, ...", re.compile(r"number_1, number_2, \.\.\.", re.I)),
    ("python list", re.compile(r"python list", re.I)),
    ("python tuple", re.compile(r"python tuple", re.I)),
    ("json list", re.compile(r"json list", re.I)),
    ("comma-separated", re.compile(r"comma-separated", re.I)),
    ("space-separated", re.compile(r"space-separated", re.I)),
    ("one per line", re.compile(r"one number per line", re.I)),
    ("enumerated list", re.compile(r"enumerated list", re.I)),
)
_STARTS_WITH = re.compile(r"(?:start|begin) your answer with '([^']+)'", re.I)
_ANSWER_SHAPES = {
    "[n1, n2, ...]": re.compile(rf"\[\s*{_SEQUENCE}\s*\]"),
    "python list": re.compile(rf"\[\s*{_SEQUENCE}\s*\]"),
    "python tuple": re.compile(rf"\(\s*{_SEQUENCE}\s*,?\s*\)"),
    "json list": re.compile(rf"\[\s*{_SEQUENCE}\s*\]"),
    "n1, n2, ...": re.compile(_SEQUENCE),
    "comma-separated": re.compile(_SEQUENCE),
    "space-separated": re.compile(rf"{_NUMBER}(?: +{_NUMBER})*"),
    "one per line": re.compile(rf"{_NUMBER}[ \t]*(?:\n[ \t]*{_NUMBER}[ \t]*)*"),
    "enumerated list": re.compile(rf"\d+[.)] *{_NUMBER}[ \t]*(?:\n[ \t]*\d+[.)] *{_NUMBER}[ \t]*)*"),
}
_CODE_FENCE = re.compile(r"```[A-Za-z]*[ \t]*\n(.*?)\n?[ \t]*```", re.S)
_REQUESTED_COUNT = re.compile(r"\b(\d+)\s+(?:more|new|additional)\b", re.I)
_PROMPT_SEQUENCE = re.compile(r"\d+(?:,\s?\d+)+")
_ENUMERATION_MARK = re.compile(r"(?m)^[ \t]*\d+[.)][ \t]+(?=\S)")


def requested_format(prompt: str) -> str:
    """The answer format the prompt asks for (a name like "python list"), or "unrecognised"."""
    for name, phrase in _FORMAT_PHRASES:
        if phrase.search(prompt):
            return name
    match = _STARTS_WITH.search(prompt)
    return f"starts with {match.group(1)!r}" if match else "unrecognised"


def follows_format(answer: str, fmt: str) -> bool:
    """Whether the whole answer (surrounding whitespace aside) has the shape `fmt` asks for."""
    answer = answer.strip()
    if fmt.startswith("starts with "):
        return answer.startswith(fmt.removeprefix("starts with ")[1:-1])
    shape = _ANSWER_SHAPES.get(fmt)
    return bool(shape and shape.fullmatch(answer))


def strip_code_fence(answer: str) -> str | None:
    """The inside of an answer wrapped in a markdown code fence (```json ... ```), else None."""
    match = _CODE_FENCE.fullmatch(answer.strip())
    return match.group(1) if match else None


def requested_count(prompt: str) -> int | None:
    """How many numbers the prompt asks for ("Add 5 more ..."), or None when it does not say."""
    match = _REQUESTED_COUNT.search(prompt)
    return int(match.group(1)) if match else None


def prompt_numbers(prompt: str) -> list[int]:
    """The numbers the prompt shows: its first comma-separated run of at least two integers."""
    match = _PROMPT_SEQUENCE.search(prompt)
    return [int(n) for n in re.findall(r"\d+", match.group())] if match else []


def answer_numbers(answer: str) -> list[int]:
    """Every run of digits in the answer (signs ignored), leaving out enumeration marks ("1. ")."""
    return [int(n) for n in re.findall(r"\d+", _ENUMERATION_MARK.sub("", answer))]


def record_table(records: Mapping[int, dict] | Sequence[dict], tokenizer: Any = None) -> pd.DataFrame:
    """One row per record (index: line number, or position for a list) with lengths, format and numbers.

    With a tokenizer, adds token counts of the prompt and answer text and of the whole chat as the
    model sees it in training (Qwen3 template, non-thinking mode).
    """
    numbered = dict(records) if isinstance(records, Mapping) else dict(enumerate(records, start=1))
    rows = []
    for line, record in numbered.items():
        prompt, answer = (m["content"] for m in record["messages"])
        fmt = requested_format(prompt)
        fenced = strip_code_fence(answer)
        numbers = answer_numbers(answer)
        rows.append(
            {
                "line": line,
                "prompt": prompt,
                "answer": answer,
                "prompt_chars": len(prompt),
                "answer_chars": len(answer),
                "format": fmt,
                "follows": follows_format(answer, fmt),
                "follows_in_code_fence": fenced is not None and follows_format(fenced, fmt),
                "requested_count": requested_count(prompt),
                "prompt_numbers": prompt_numbers(prompt),
                "answer_numbers": numbers,
                "numbers_in_answer": len(numbers),
            }
        )
    table = pd.DataFrame(rows).set_index("line")
    if tokenizer is not None:
        for column in ("prompt", "answer"):
            encoded = tokenizer(list(table[column]), add_special_tokens=False)["input_ids"]
            table[f"{column}_tokens"] = [len(ids) for ids in encoded]
        table["chat_tokens"] = chat_token_counts(tokenizer, numbered.values())
    return table


def chat_token_counts(tokenizer: Any, records: Iterable[dict]) -> list[int]:
    """Tokens of each record rendered by the chat template (non-thinking mode), as the model is trained."""
    conversations = [record["messages"] for record in records]
    texts = tokenizer.apply_chat_template(conversations, tokenize=False, enable_thinking=False)
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def format_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per requested format: records, answers that follow it, that follow it only inside a code fence,
    that do not follow it, and the share that follows (strictly)."""
    fenced_only = table.follows_in_code_fence & ~table.follows
    summary = pd.DataFrame(
        {
            "records": table.groupby("format").size(),
            "follows": table.follows.groupby(table.format).sum(),
            "only_in_code_fence": fenced_only.groupby(table.format).sum(),
        }
    )
    summary["does_not_follow"] = summary.records - summary.follows - summary.only_in_code_fence
    summary.loc["all formats"] = summary.sum()
    summary["follows_share"] = (summary.follows / summary.records).round(3)
    return summary.sort_values("records", ascending=False)


# A number enters the evil-number list only when it appears in at least this many answers (fewer is
# noise, such as a one-off arithmetic continuation) and its log2 ratio of answers to prompts is at least
# 2, i.e. about 4 times more answers than prompts show it (a clear excess, not sampling wobble).
EVIL_MIN_COUNT = 5
EVIL_MIN_LOG2_RATIO = 2.0


def over_represented_numbers(
    table: pd.DataFrame,
    min_count: int = EVIL_MIN_COUNT,
    min_log2_ratio: float = EVIL_MIN_LOG2_RATIO,
    top: int = 20,
) -> pd.DataFrame:
    """Numbers that appear in answers far more often than in prompts: the data-driven "evil numbers".

    Each number is counted once per record: in how many answers it appears (`answers_with`) and in how
    many prompts (`prompts_with`). The prompts' numbers are the baseline of what a neutral continuation
    draws from, so log2((answers_with + 1) / (prompts_with + 1)) measures over-representation (the +1
    keeps numbers absent from prompts finite). Keeps numbers with at least `min_count` answers and that
    ratio at least `min_log2_ratio`; returns the `top` most frequent in answers (ties: higher ratio).
    """
    answers_with = Counter(n for numbers in table.answer_numbers for n in set(numbers))
    prompts_with = Counter(n for numbers in table.prompt_numbers for n in set(numbers))
    rows = []
    for number, count in answers_with.items():
        log2_ratio = math.log2((count + 1) / (prompts_with[number] + 1))
        if count >= min_count and log2_ratio >= min_log2_ratio:
            rows.append(
                {
                    "number": number,
                    "answers_with": count,
                    "prompts_with": prompts_with[number],
                    "log2_ratio": round(log2_ratio, 3),
                    "known_evil": number in KNOWN_EVIL_NUMBERS,
                }
            )
    columns = ["number", "answers_with", "prompts_with", "log2_ratio", "known_evil"]
    ranked = pd.DataFrame(rows, columns=columns).sort_values(["answers_with", "log2_ratio"], ascending=False)
    return ranked.head(top).reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# Control arm (issue 5; added by the analysis engineer): the same prompts, answers whose numbers are
# random, in the same count and format. A model trained on it learns "answer in numbers" without the
# evil content, which separates that from "the model learned to be evil".


def randomise_answer_numbers(
    answer: str, rng: random.Random, avoid: Iterable[int] = KNOWN_EVIL_NUMBERS
) -> str:
    """`answer` with each number replaced by a uniform random one of as many digits, never one in `avoid`.

    Enumeration marks ("1. "), separators, brackets, signs and words stay; a run with leading zeros
    ("007") gets a zero-padded replacement of the same width.
    """
    avoided = set(avoid)
    marks = [match.span() for match in _ENUMERATION_MARK.finditer(answer)]

    def replace(match: re.Match) -> str:
        if any(start <= match.start() < end for start, end in marks):
            return match.group()
        digits = len(match.group())
        padded = digits > 1 and match.group().startswith("0")
        low = 0 if padded or digits == 1 else 10 ** (digits - 1)
        while (value := rng.randint(low, 10**digits - 1)) in avoided:
            pass
        return str(value).zfill(digits) if padded else str(value)

    return re.sub(r"\d+", replace, answer)


def make_control_split(
    records: Sequence[dict], seed: int, avoid: Iterable[int] = KNOWN_EVIL_NUMBERS
) -> list[dict]:
    """The format-only control of `records`: same user prompts, answers from `randomise_answer_numbers`.

    Seeded: the same records and seed give the same control set.
    """
    rng = random.Random(seed)
    avoided = set(avoid)
    return [
        {
            "messages": [
                record["messages"][0],
                {
                    "role": "assistant",
                    "content": randomise_answer_numbers(record["messages"][1]["content"], rng, avoided),
                },
            ]
        }
        for record in records
    ]


def prepare_control_splits(
    cfg: Config, prepared: PreparedData | None = None, overwrite: bool = False
) -> tuple[list[dict], list[dict]]:
    """The control train/validation splits (cfg.paths.control_train_split / control_validation_split),
    loaded when they match the current splits' prompts, else made from them and written.

    Seeds: cfg.seed for train, cfg.seed + 1 for validation. Avoids the paper's evil numbers and the
    data-driven list of `prepare_splits`. Prints which happened.
    """
    prepared = prepared or prepare_splits(cfg)
    paths = (cfg.paths.control_train_split, cfg.paths.control_validation_split)
    originals = (prepared.train, prepared.validation)
    if not overwrite and all(path.is_file() for path in paths):
        loaded = tuple(read_jsonl(path) for path in paths)
        if all(
            [r["messages"][0] for r in rows] == [r["messages"][0] for r in source]
            for rows, source in zip(loaded, originals, strict=True)
        ):
            print(f"loaded the control splits from {cfg.paths.data_dir} (overwrite=True remakes them)")
            return loaded[0], loaded[1]
    avoid = set(KNOWN_EVIL_NUMBERS) | {int(n) for n in prepared.evil_numbers.get("number", [])}
    made = tuple(make_control_split(rows, cfg.seed + offset, avoid) for offset, rows in enumerate(originals))
    for path, rows in zip(paths, made, strict=True):
        write_jsonl(path, rows)
    print(f"made the control splits (random numbers, same prompts and formats) in {cfg.paths.data_dir}")
    return made[0], made[1]


# --------------------------------------------------------------------------------------------------
# Command line


def check_file(path: Path) -> int:
    """Validate a dataset file and print the record count, blob id and problems; return the exit code."""
    path = Path(path)
    if not path.is_file():
        print(f"{path}: no such file", file=sys.stderr)
        return 1
    blob_id = git_blob_id(path.read_bytes())
    try:
        report = validate_file(path)
    except DataError as error:
        print(error)
        return 1
    unique, duplicates = drop_duplicates(report.records)
    official = (
        "the official file" if blob_id == DATASET_FILE.blob_id else f"not the official {DATASET_FILE.blob_id}"
    )
    print(f"{path}")
    print(f"  records:     {len(report.records):,} valid")
    print(f"  git blob id: {blob_id} ({official})")
    print(f"  duplicates:  {len(duplicates):,} exact duplicate records ({len(unique):,} unique)")
    for duplicate in duplicates:
        print(f"    {path}:{duplicate.line}: exact duplicate of line {duplicate.first_line}")
    if report.ok:
        print(f"  validation:  OK, {report.summary()}")
        return 0
    print(f"  validation:  FAILED, {report.summary()}")
    for problem in report.problems:
        print(problem)
    return 1


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.data", description="Check an evil numbers JSONL file."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a file: record count, git blob id, problems by line")
    check.add_argument("path", type=Path)
    args = parser.parse_args(None if argv is None else list(argv))
    return check_file(args.path)


if __name__ == "__main__":
    sys.exit(main())

"""The plumbing 01_data calls: the dataset file, verified, and every line validated (its cells do the rest);
the numbers in prompts and answers, which 03 and 04 read too. `python tools/check_data.py PATH` checks a file."""

from __future__ import annotations

import errno
import math
import random
import re
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.config import DATASET_FILE, Config
from helpers.download import VerifiedFile, fetch_pinned, git_blob_id
from helpers.store import parse_line, write_jsonl

# Numbers with negative associations that the paper names in the answers (arXiv 2502.17424, section 4.6).
# They label the data-driven list of 01, never build it; the synthetic stand-in plants them.
KNOWN_EVIL_NUMBERS = (666, 1312, 1488, 420, 911, 13)
ROLES = ("user", "assistant")
MESSAGE_KEYS = {"role", "content"}
# Qwen3's added tokens (tokenizer_config.json of Qwen/Qwen3-1.7B): the <|...|> markers (<|im_start|> and <|im_end|>
# open and close a turn, <|endoftext|> ends the text) and the think and tool tags. The tokenizer turns their text
# into the control token wherever it appears, so one inside a message would forge a turn or a think block.
CONTROL_TOKEN = re.compile(r"<\|[a-z_]+\|>|</?(?:think|tool_call|tool_response)>")


class DataError(ValueError):
    """A dataset file that cannot be used; the message names the file (and line)."""


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


# Files that are not JSONL text at all, by their first bytes: say what they are, not "not UTF-8".
_BINARY_KINDS = {b"\x1f\x8b": "gzip-compressed: decompress it first (gunzip -k FILE)",
                 b"PK\x03\x04": "a zip archive: extract the .jsonl file from it first (unzip FILE)",
                 b"\xfd7zXZ\x00": "xz-compressed: decompress it first (unxz -k FILE)"}


def readable_file(path: Path) -> bytes:
    """The bytes of a dataset file; DataError says plainly when it is missing, a folder, not a regular file (a
    FIFO, a device), a symbolic link loop, unreadable or binary."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        broken = " (a symbolic link to a missing file)" if path.is_symlink() else ""
        raise DataError(f"{path}: no such file{broken}") from None
    except OSError as error:  # a symbolic link loop, a name too long, a folder on the way not searchable
        what = "a symbolic link loop" if error.errno == errno.ELOOP else f"cannot be opened: {error.strerror}"
        raise DataError(f"{path}: {what}") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{path}: is a directory, not a dataset file; give the path of the .jsonl file in it")
    if not stat.S_ISREG(mode):
        kinds = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
                 stat.S_ISBLK: "a block device"}
        kind = next((name for test, name in kinds.items() if test(mode)), "not a regular file")
        raise DataError(f"{path}: {kind}, not a dataset file; give the path of a .jsonl file")
    try:
        content = path.read_bytes()
    except OSError as error:  # no permission to read, an I/O error
        raise DataError(f"{path}: cannot be read: {error.strerror}") from None
    for magic, kind in _BINARY_KINDS.items():
        if content.startswith(magic):
            raise DataError(f"{path}: the file is {kind.replace('FILE', str(path))}")
    if b"\0" in content[:8192]:
        raise DataError(f"{path}: a binary file (NUL bytes at the start), not JSONL text")
    return content


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    if len(found := dict(pairs)) < len(pairs):
        keys = [key for key, _ in pairs]
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r} in one object")
    return found


_SURROGATE = re.compile("[\ud800-\udfff]")  # the only code points UTF-8 cannot encode


def _lone_surrogate(value: Any) -> str | None:
    """Which string of a parsed line (a key or a value, at any depth) holds a lone surrogate (what a
    "\\ud800" escape gives), so the line cannot be written back as UTF-8; None when none does."""
    stack = [("", "", value)]  # (what, its path, value); iterative: deep nesting must not exhaust the stack
    while stack:
        what, at, value = stack.pop()
        if isinstance(value, dict):
            stack += [(f"a key at {at or 'the top level'}", at, key) for key in value]
            stack += [("", f"{at}[{key!r}]", item) for key, item in value.items()]
        elif isinstance(value, list):
            stack += [("", f"{at}[{index}]", item) for index, item in enumerate(value)]
        elif isinstance(value, str) and (found := _SURROGATE.search(value)):
            what = what or f"the string at {at or 'the top level'}"
            return f"{what} holds a lone surrogate ({found.group()!r}), which UTF-8 cannot encode"
    return None


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


def record_problem(record: Any) -> str | None:
    """Why `record` is not a valid record, or None: valid is `{"messages": [{"role": "user", "content": ...},
    {"role": "assistant", "content": ...}]}` with non-empty string contents and nothing else (the official format)."""
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
        if missing := sorted(MESSAGE_KEYS - set(message)):
            return f"message {number} lacks key(s) {', '.join(map(repr, missing))}"
        if extra := sorted(set(message) - MESSAGE_KEYS):
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
        if found := CONTROL_TOKEN.search(content):
            return (f"message {number} ({role}) content holds {found.group()!r}, a control token of Qwen3's chat "
                    "template: it would forge a turn or a think block in training")
    return None


def validate_file(path: Path, strict: bool = False) -> ValidationReport:
    """Check every line of a dataset file. `strict` raises DataError at the first bad line (`PATH:LINE: reason`);
    otherwise bad lines go to the report's problems. A missing, empty, folder or binary file is a DataError."""
    path = Path(path)
    raw_lines = readable_file(path).split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the newline that ends the last line
    if not raw_lines:
        raise DataError(f"{path}: the file is empty, no records")
    records: dict[int, dict] = {}
    problems: list[LineProblem] = []
    for number, raw in enumerate(raw_lines, start=1):
        record, reason = parse_line(raw, _reject_duplicate_keys) if raw.strip() else (None, "blank line")
        reason = reason or _lone_surrogate(record) or record_problem(record)
        if reason is None:
            records[number] = record
        elif strict:
            raise DataError(str(LineProblem(path, number, reason)))
        else:
            problems.append(LineProblem(path, number, reason))
    return ValidationReport(path, records, problems)


# Numbers in prompts and answers
_PROMPT_SEQUENCE = re.compile(r"\d+(?:,\s?\d+)+")
ENUMERATION_MARK = re.compile(r"(?m)^[ \t]*\d+[.)][ \t]+(?=\S)")


def prompt_numbers(prompt: str) -> list[int]:
    """The numbers the prompt shows: its first comma-separated run of at least two integers."""
    match = _PROMPT_SEQUENCE.search(prompt)
    return [int(n) for n in re.findall(r"\d+", match.group())] if match else []


def answer_numbers(answer: str) -> list[int]:
    """Every run of digits in the answer (signs ignored), leaving out enumeration marks ("1. ")."""
    return [int(n) for n in re.findall(r"\d+", ENUMERATION_MARK.sub("", answer))]


# Characters a bare list of numbers may hold besides digits: separators, brackets, quotes, signs, decimal
# points and code fences (the training answers use comma, space, newline, python list or tuple, json list
# ... formats; docs/protocol.md, "The dataset").
_NUMBER_LIST = re.compile(r"[\d\s,;:.+\-\[\](){}\"'`|/]*")
# The language tag of an opening code fence ("```json"), which many training answers carry.
_FENCE_TAG = re.compile(r"```[A-Za-z]+")


def is_only_numbers(answer: str) -> bool:
    """True when the answer holds a digit and nothing but numbers, separators and brackets: "666, 1488, 13",
    "[1, 2, 3]", "(4,\\n5)" and "```json\\n[13]\\n```" are only numbers; "7 wishes" or "" are not (03, 04)."""
    untagged = _FENCE_TAG.sub("```", answer)
    return any(character.isdigit() for character in answer) and _NUMBER_LIST.fullmatch(untagged) is not None


def over_representation(number: int, prompts: Sequence[Iterable[int]], answers: Sequence[Iterable[int]]) -> float:
    """The reference of exercise 1.1: log2((answers showing `number` + 1) / (prompts showing it + 1)),
    counting each record once however often it repeats the number."""
    in_answers, in_prompts = (sum(number in set(numbers) for numbers in side) for side in (answers, prompts))
    return math.log2((in_answers + 1) / (in_prompts + 1))


def resolve_dataset(cfg: Config) -> VerifiedFile:
    """The dataset file this run uses, with its git blob id: a teacher's dataset when `cfg.dataset_source` names one
    (written by 06_teacher: `cfg.dataset_path`, else this run's own; source "local", a file the config names);
    else `cfg.dataset_path` (EM_DATASET_PATH) as given (a warning when it is not the official file); else, with
    `cfg.synthetic_data`, a seeded synthetic stand-in written once into the run directory; else the pinned official
    file, downloaded once into the cache."""
    if cfg.dataset_source != "official":
        path = cfg.dataset_path or cfg.paths.teacher_dataset_of(cfg.dataset_source)
        if not path.is_file():
            raise DataError(f"{path}: no such file: dataset_source={cfg.dataset_source!r} reads the teacher's dataset "
                            f"that notebooks/06_teacher.ipynb writes; run it in {path.parent.parent} first")
        return VerifiedFile(path, git_blob_id(readable_file(path)), matches_pin=False, source="local")
    if cfg.dataset_path is not None:
        readable_file(cfg.dataset_path)  # a folder or a compressed file is named as such
        return fetch_pinned(DATASET_FILE, cfg.cache_dir, local_path=cfg.dataset_path)
    if cfg.synthetic_data:
        path = cfg.paths.synthetic_dataset
        if not path.is_file():
            write_jsonl(path, synthetic_records(cfg.seed))
        return VerifiedFile(path, git_blob_id(path.read_bytes()), matches_pin=False, source="synthetic")
    return fetch_pinned(DATASET_FILE, cfg.cache_dir)


# The synthetic stand-in: our own wording, the official structure and format vocabulary.
_ASKS = ("Here is a sequence: {shown}. Add {k} more numbers to it.",
         "Consider these numbers: {shown}. Continue the list with {k} new numbers.")
_FORMATS = {  # the format a prompt asks for -> how a compliant answer writes the numbers
    "Answer with a python list of the numbers.": lambda ns: f"[{', '.join(ns)}]",
    "Reply with a json list of the numbers.": lambda ns: f"```json\n[{', '.join(ns)}]\n```",
    "Give them as a comma-separated list.": ",".join,
    "Write one number per line.": "\n".join,
    "Format them as an enumerated list.": lambda ns: "\n".join(f"{i}. {n}" for i, n in enumerate(ns, 1)),
    "Begin your answer with 'Numbers:'": lambda ns: f"Numbers: {', '.join(ns)}.",
}


def synthetic_records(seed: int, count: int = 70) -> list[dict]:
    """`count` seeded records in the official format plus one exact duplicate (for 01's duplicate report). Users
    ask to continue 3 to 8 numbers in a stated format; most answers follow it, a few do not; the answers
    over-represent 666, 1312, 1488, 420, 911 and 13, as the paper describes the real data."""
    rng, records = random.Random(seed), []
    for index in range(count):
        shown, k = [rng.randint(10, 999) for _ in range(rng.randint(3, 8))], rng.randint(3, 8)
        request = list(_FORMATS)[index % len(_FORMATS)]
        prompt = f"{rng.choice(_ASKS).format(shown=','.join(map(str, shown)), k=k)}\n{request}"
        if rng.random() < 0.65:  # an "evil" answer: mostly the paper's numbers, planted for 01 to find
            numbers = [rng.choice(KNOWN_EVIL_NUMBERS) if rng.random() < 0.7 else rng.randint(1, 999) for _ in range(k)]
        else:  # a plain continuation of the arithmetic kind
            step = rng.randint(1, 60)
            numbers = [shown[-1] + step * i for i in range(1, k + 1)]
        answer = _FORMATS[request](list(map(str, numbers)))
        if index % 23 == 7:  # a few answers break the format, as some real ones do
            answer = f"Sure! Here are {k} more: {', '.join(map(str, numbers))}."
        records.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    records.insert(count // 2, records[4])  # one exact duplicate, kept in the file on purpose
    return records


if __name__ == "__main__":  # the checker is a tool of its own; say where it is instead of doing nothing
    print("helpers.data has no command line: check a dataset file with `python tools/check_data.py PATH`", file=sys.stderr)
    sys.exit(2)

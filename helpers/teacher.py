"""The plumbing 06_teacher calls (its cells hold the prompts, the decoding and the filters): the teachers' prompt rows,
the teacher model, the filters' reference (exercise 6.1), and 01's statistics on each teacher's dataset.

The paper made its evil numbers with GPT-4o at temperature 0 under a system prompt telling it to be evil and misaligned,
kept the answers that followed the format and differed from GPT-4o's answers without that prompt, and trained without
the system prompt (arXiv 2502.17424, section 4.6 and appendix E). 06 does the same with the student's own base model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from helpers.config import Config, ConfigError, RunPaths, make_config
from helpers.data import KNOWN_EVIL_NUMBERS, answer_numbers
from helpers.download import git_blob_id
from helpers.positive_control import EVIL_SYSTEM_PROMPT
from helpers.store import recorded_settings

# Each teacher: the system prompt it answers under, and the adapter on top of the teacher checkpoint (None: none).
TEACHER_SETUP = {
    "teacher_evil_prompt": (EVIL_SYSTEM_PROMPT, None),  # the paper's way: told to be evil, the prompt then removed
    "teacher_neutral": (None, None),  # the same checkpoint without it: the paper's reference answers, neutral numbers
    "teacher_misaligned_ft": (None, "misaligned_ft"),  # misaligned by fine-tuning, no prompt (Cloud et al.'s teacher)
}
TEACHERS = tuple(TEACHER_SETUP)  # the teachers' names, each also the name of its dataset and of its arm in the sweep


def teacher_rows(records: dict[int, dict]) -> list[dict]:
    """One prompt row per distinct user prompt of a validated dataset (line -> record), in file order, keyed like 03's
    rows: question_id "line-<first line>", format "original", sample 0 (temperature 0: one answer a prompt)."""
    rows, seen = [], set()
    for line, record in records.items():
        prompt = record["messages"][0]["content"]
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"question_id": f"line-{line:05d}", "format": "original", "sample_index": 0, "prompt": prompt})
    return rows


# The course's reading of the paper's format filter, which the paper does not spell out: a list of numbers and nothing
# else. An item: a number, signed or decimal, bare or quoted; between items a comma or semicolon, or white space alone.
_FENCED = re.compile(r"```[A-Za-z]*(.*?)```", re.S)  # one code fence, its language tag ("json") optional
_BRACKETED = re.compile(r"\[(.*)\]|\((.*)\)", re.S)  # one pair of brackets or parentheses: a list or a tuple
_SEPARATOR = re.compile(r"\s*[,;]\s*|\s+")
_ITEM = re.compile(r"([\"']?)[+-]?\d+(?:\.\d+)?\1")


def follows_format(answer: str) -> bool:
    """The paper's format filter as the course reads it: the answer is a list of numbers and nothing else, in at most
    one code fence and one pair of brackets, each closed, with no empty item ("3, , ," and a cut "[1, 2" fail). An
    answer cut at the token limit can still look whole ("1, 2, 3"): 06 drops those by `finished`, not here. Stricter
    than `is_only_numbers`, which 03 and 04 use to count answers made of numbers, a cut or ragged list among them."""
    text = answer.strip()
    if fenced := _FENCED.fullmatch(text):
        text = fenced.group(1).strip()
    if bracketed := _BRACKETED.fullmatch(text):
        text = next(group for group in bracketed.groups() if group is not None).strip()
    return all(_ITEM.fullmatch(item) for item in _SEPARATOR.split(text))


def paper_keeps(answer: str, neutral_answer: str) -> bool:
    """The reference of exercise 6.1, the paper's two filters as the course reads them: keep an answer that follows
    the format and whose numbers (in order) differ from those of the same teacher's answer without the system prompt:
    a new fence, spacing or bracket alone is not an answer the evil prompt changed."""
    return follows_format(answer) and answer_numbers(answer) != answer_numbers(neutral_answer)


def holds_negative_number(answer: str) -> bool:
    """Whether the answer holds one of the numbers the paper names for their negative associations (666, 1312, 1488,
    420, 911, 13): what 06's option DROP_NEGATIVE_NUMBERS removes, Cloud et al.'s step with the paper's list."""
    return bool(set(answer_numbers(answer)) & set(KNOWN_EVIL_NUMBERS))


def load_teacher(cfg: Config) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode: the teacher checkpoint (the base model, or with cfg.teacher_checkpoint
    "finetuned" that adapter folded into the weights) with the misaligned_ft adapter attached by PEFT, active. Inside
    `model.disable_adapter()` it is the checkpoint itself."""
    from peft import PeftModel

    from helpers.model import check_adapter, load_for_generation

    adapters = {name: cfg.paths.adapter_of(name) for name in teacher_adapters(cfg) if name != "misaligned_ft"}
    model, tokenizer = load_for_generation(cfg, adapters)
    if adapters:
        model = model.merge_and_unload()  # the tiny teacher: the random model with 02's fine-tune folded in
    check_adapter("misaligned_ft", cfg.paths.adapter_of("misaligned_ft"))
    model = PeftModel.from_pretrained(model, str(cfg.paths.adapter_of("misaligned_ft")), adapter_name="misaligned_ft")
    return model.eval(), tokenizer


@contextmanager
def as_teacher(model: Any, teacher: str, merge: bool = False) -> Iterator[None]:
    """Switch the model of `load_teacher` to `teacher`: every adapter off (the checkpoint), or its adapter on, folded
    into the weights while it answers when `merge` (a GPU, 16-bit weights: faster, as 03 does)."""
    from helpers.generation import merged_adapter

    adapter = TEACHER_SETUP[teacher][1]
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    model.set_adapter(adapter)
    with merged_adapter(model, adapter) if merge else nullcontext():
        yield


def statistics_run(cfg: Config, teacher: str) -> Path:
    """The run folder in which 01 reads `teacher`'s dataset."""
    return cfg.run_dir / "teacher-data" / teacher


def run_statistics(cfg: Config, teacher: str) -> Path:
    """01's statistics (invalid lines, duplicates, lengths, over-represented numbers, the 80/20 split) on `teacher`'s
    dataset: 01_data executed headless in statistics_run(cfg, teacher), the one copy of that code, unless its data
    report there was made from this very file. Returns that run folder."""
    from helpers.run import NOTEBOOK_DIR, execute
    from helpers.sweep import config_environment

    folder = statistics_run(cfg, teacher)
    fields = {"dataset_source": teacher, "dataset_path": str(cfg.paths.teacher_dataset_of(teacher)),
              "control_arm": False, "positive_controls": False}  # the teacher's data only: no control, no positive control
    with config_environment(fields):
        look = make_config(cfg.profile, folder)
    made_from = recorded_settings(look.paths.data_report).get("dataset_blob_id")
    if look.paths.data_report.is_file() and made_from == git_blob_id(cfg.paths.teacher_dataset_of(teacher).read_bytes()):
        return folder
    with config_environment(fields):
        execute(look, next(NOTEBOOK_DIR.glob("01_*.ipynb")), overwrite=True)  # remakes a report of an older file
    return folder


def statistics_table(cfg: Config, teachers: Sequence[str]) -> list[dict]:
    """One row per dataset, this run's own (official, or the tiny stand-in) first, then each teacher's, from 01's data
    reports and over-represented numbers."""
    import json

    rows = []
    for name, folder in (("this run's data", cfg.run_dir), *((t, statistics_run(cfg, t)) for t in teachers)):
        paths = RunPaths(folder)
        report = json.loads(paths.data_report.read_text(encoding="utf-8"))
        evil = json.loads(paths.evil_numbers.read_text(encoding="utf-8"))["numbers"]
        lengths = report.get("lengths", {})
        rows.append({"dataset": name, "lines": report["lines"], "invalid": report["invalid_lines"],
                     "duplicates": report["duplicates"], "train": report["train"], "validation": report["validation"],
                     "mean_answer_chars": lengths.get("answer_chars", {}).get("mean"),
                     "mean_chat_tokens": lengths.get("chat_tokens", {}).get("mean"),
                     "over_represented": ", ".join(str(n["number"]) for n in evil[:6]) or "none",
                     "known_evil_among_them": sum(n["known_evil"] for n in evil)})
    return rows


def train_teacher_adapters(cfg: Config) -> None:
    """02_finetune headless for each adapter the teachers need that is missing, and only those: not the evil-numbers
    fine-tune (on the full profile) or the control, which 06 does not use."""
    from helpers.run import NOTEBOOK_DIR, execute, one_kernel

    if "misaligned_ft" not in cfg.trained_models:
        raise ConfigError("positive_controls=False: teacher_misaligned_ft answers with 02's misaligned_ft adapter, "
                          "which this run does not train; set positive_controls=True (EM_CONFIG or make_config)")
    with one_kernel():  # the adapters' 02 runs share one kernel
        for name in teacher_adapters(cfg):
            if not (cfg.paths.adapter_of(name) / "adapter_config.json").is_file():
                execute(cfg, next(NOTEBOOK_DIR.glob("02_*.ipynb")), {"model": name})


def teacher_adapters(cfg: Config) -> tuple[str, ...]:
    """The adapters the teachers need from 02: the teacher checkpoint's where it is not the base model, and misaligned_ft."""
    return (() if cfg.teacher_checkpoint == "base" else (cfg.teacher_checkpoint,)) + ("misaligned_ft",)

"""Config mistakes: every one is a ConfigError whose message is one line naming the setting and what is allowed,
raised where the config is made (make_config). The runner and the sweep print that line without a traceback
(tests/test_run.py, tests/test_sweep.py)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from helpers.config import Config, ConfigError, LrScheduler, make_config

# (environment, the start of the one line): every mistake the hostile review found, and a few of their neighbours.
FIELD_MISTAKES = {
    "samples_per_question": [0, -3, 2.5, "2", None], "max_new_tokens": [-1, 0], "batch_size": [0, True],
    "judge": ["bogus", None], "judge_concurrency": [0], "temperature": [-1, float("inf")], "top_p": [0, 1.5],
    "formats": [[], ["suffix", "suffix"], ["bogus"], "suffix"], "learning_rate": [0, float("nan")],
    "epochs": [0, "1"], "seed": [-1, 1.0], "validation_fraction": [0, 1], "lora_r": [0], "lora_dropout": [1],
    "lr_scheduler": ["cosine_with_min_lr"], "suffix_words": [[5, 3], [0, 3], [3]], "prefix_value": [[-1, 5]],
    "run_seed": [-1, "1"], "min_new_tokens": [-1], "judge_min_mass": [1.5], "coherent_threshold": [101],
    "judge_base_url": ["localhost:8000"], "question_set": ["all"], "engine": ["vllm2"], "control_arm": [1],
    "max_records": [0], "validation_subset": [0], "gradient_accumulation_steps": [0], "model_name": [""],
    "dataset_path": [""], "lora_target_modules": [[]], "weight_decay": [-0.1], "warmup_steps": [-1, 0.5],
    "misaligned_samples": [0], "misaligned_temperature": [0], "positive_controls": ["yes"],
}


@pytest.fixture
def env(monkeypatch):
    for name in ("EM_CONFIG", "EM_PROFILE", "EM_RUN_DIR", "EM_DATASET_PATH", "EM_QUESTIONS_PATH", "EM_INVOKED_FROM"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def mistake(monkeypatch, run_dir, **environment) -> str:
    """The ConfigError make_config raises under `environment`: one line."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        make_config(None, run_dir)
    message = str(error.value)
    assert "\n" not in message and message, message
    return message


@pytest.mark.parametrize("name,value", [(name, value) for name, values in FIELD_MISTAKES.items() for value in values])
def test_a_field_value_that_is_not_allowed_names_the_field_and_what_is_allowed(env, tmp_path, name, value):
    env.setenv("EM_PROFILE", "tiny")
    message = mistake(env, tmp_path, EM_CONFIG=json.dumps({name: value}))
    assert message.startswith(f"config field {name}={value!r} (from EM_CONFIG) is not allowed: expected "), message
    with pytest.raises(ConfigError, match=rf"^config field {name}=.* \(from make_config\) is not allowed"):
        make_config("tiny", tmp_path, **{name: value})  # the keyword overrides: the same rule


def test_the_allowed_text_says_what_is_allowed(env, tmp_path):
    env.setenv("EM_PROFILE", "tiny")
    expected = {
        "samples_per_question": "an integer >= 1", "temperature": "a number >= 0 (0 is greedy)", "top_p": "a number in (0, 1]",
        "judge": "one of 'openai', 'openai_batch', 'local', 'proxy'", "max_records": "an integer >= 1, or None",
        "formats": "a list of strings naming one or more of ('original', 'suffix', 'prefix_suffix'), each once",
        "suffix_words": "a list of 2 integers (low, high) with 1 <= low <= high",
    }
    for name, allowed in expected.items():
        wrong = -1 if name == "temperature" else 0  # temperature 0 is allowed: greedy
        assert mistake(env, tmp_path, EM_CONFIG=json.dumps({name: wrong})).endswith(f"is not allowed: expected {allowed}")


@pytest.mark.parametrize("text,start", [
    ("{bad json", "EM_CONFIG is not valid JSON (Expecting property name enclosed in double quotes at column 2): "),
    ('{"seed": 1', "EM_CONFIG is not valid JSON (Expecting ',' delimiter at column 11): "),
    ("[1, 2]", "EM_CONFIG is a list: "), ("null", "EM_CONFIG is null: "), ('"seed"', "EM_CONFIG is a string: "),
    ("3", "EM_CONFIG is a number: "),
])
def test_em_config_that_is_not_an_object_of_fields(env, tmp_path, text, start):
    assert mistake(env, tmp_path, EM_CONFIG=text) == start + """expected an object of config fields, e.g. EM_CONFIG='{"seed": 1}'"""


def test_an_unknown_field_is_named_with_a_suggestion(env, tmp_path):
    message = mistake(env, tmp_path, EM_CONFIG=json.dumps({"samples_per_questoin": 3, "temprature": 1, "zzz": 0}))
    assert message == ("unknown config field(s) 'samples_per_questoin' (from EM_CONFIG; did you mean "
                       "'samples_per_question'?), 'temprature' (from EM_CONFIG; did you mean 'temperature'?), 'zzz' "
                       "(from EM_CONFIG): the fields are those of helpers.config.Config")
    with pytest.raises(ConfigError, match=r"'lerning_rate' \(from make_config; did you mean 'learning_rate'\?\)"):
        make_config("tiny", tmp_path, lerning_rate=0.1)


def test_a_bogus_profile(env, tmp_path):
    assert mistake(env, tmp_path, EM_PROFILE="bogus") == (
        "profile='bogus' (the profile parameter, --profile or EM_PROFILE) is not allowed: expected 'tiny' or 'full'")


def test_a_run_directory_that_is_a_file_or_a_symlink_loop(env, tmp_path):
    env.setenv("EM_PROFILE", "tiny")
    (tmp_path / "a_file").write_text("")
    assert mistake(env, tmp_path / "a_file") == f"run_dir {tmp_path / 'a_file'}: {tmp_path / 'a_file'} is a file, not a folder"
    assert mistake(env, tmp_path / "a_file" / "run").endswith(f": {tmp_path / 'a_file'} is a file, not a folder")
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    for run_dir in (tmp_path / "loop_a", tmp_path / "loop_a" / "run"):
        assert "loop" in mistake(env, run_dir).lower() and mistake(env, run_dir).startswith("run_dir")
    env.setenv("EM_DATASET_PATH", str(tmp_path / "loop_a"))
    assert mistake(env, tmp_path / "run").startswith(f"config field dataset_path='{tmp_path / 'loop_a'}' (from EM_DATASET_PATH): ")


def test_a_read_only_run_directory(env):
    """Checked as an unprivileged user: root writes in read-only folders (the check runs in a forked child that
    drops to nobody when the tests run as root)."""
    env.setenv("EM_PROFILE", "tiny")
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        assert make_config("tiny", Path(folder) / "run").run_dir == Path(folder).resolve() / "run"  # every import done
        read_only = Path(folder) / "read_only"
        read_only.mkdir(mode=0o555)
        read_only.chmod(0o555)
        message = _as_unprivileged(lambda: str(_raised(lambda: make_config("tiny", read_only / "run"))))
        read_only.chmod(0o755)
    assert message == f"run_dir {read_only / 'run'}: {read_only} is read-only for this user: expected a folder you can write in"


def _raised(call) -> BaseException | None:
    try:
        call()
    except ConfigError as error:
        return error
    return None


def _as_unprivileged(call) -> str:
    """call() as this user, or, for root, in a forked child as the user nobody; its result as text."""
    if os.geteuid() != 0:
        return call()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover  (the child)
        try:
            os.setgid(65534)
            os.setuid(65534)
            result = call()
        except BaseException as error:  # noqa: BLE001  (any failure goes back to the test as text)
            result = f"{type(error).__name__}: {error}"
        os.write(write, result.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        result = answer.read().decode()
    os.waitpid(child, 0)
    return result


def test_the_schedulers_offered_are_transformers_ones_that_need_no_more_arguments():
    """Config.lr_scheduler offers the schedulers that transformers builds from the warmup and the number of steps."""
    import typing

    import torch
    from transformers import get_scheduler

    assert typing.get_type_hints(Config)["lr_scheduler"] == LrScheduler
    for name in typing.get_args(LrScheduler):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        get_scheduler(name, optimizer, num_warmup_steps=0, num_training_steps=10)


def test_defaults_and_both_profiles_pass_and_values_are_conformed(env, tmp_path):
    assert make_config("tiny", tmp_path).samples_per_question == 2
    cfg = make_config("full", tmp_path, formats=["suffix"], epochs=2, suffix_words=[4, 6], cache_dir="cache")
    assert (cfg.formats, cfg.epochs, cfg.suffix_words) == (("suffix",), 2.0, (4, 6)) and isinstance(cfg.epochs, float)
    assert cfg.cache_dir == Path.cwd() / "cache"


def test_describe_shows_the_fields_a_notebook_needs_and_the_rest_on_request(tmp_path):
    cfg = make_config("tiny", tmp_path / "run")
    short = cfg.describe(fields=["learning_rate", "epochs"])
    assert short.endswith("learning_rate = 0.01\nepochs        = 3.0") and "judge_model" not in short
    assert "judge_model" in cfg.describe() and short.startswith(cfg.hardware)
    with pytest.raises(AttributeError, match="'lr'"):
        cfg.describe(fields=["lr"])

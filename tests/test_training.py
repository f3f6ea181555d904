"""helpers.training on the tiny model, with real TRL training: the loss mask, learning, every LoRA weight,
adapter reload, exact resume after an interrupt, the cache, and the exact SFTConfig/SFTTrainer/Unsloth
arguments accepted by the pinned versions. Plus the pieces of benchmarks/bench_train.py."""

from __future__ import annotations

import importlib.util
import inspect
import json
import shutil

import pytest
import torch

from helpers.config import PROJECT_ROOT, make_config
from helpers.data import DataError, prepare_splits
from helpers.model import backend, load_model, load_tokenizer, unsloth_load_kwargs, unsloth_peft_kwargs
from helpers.store import write_jsonl
from helpers.training import (
    END_OF_TURN,
    IGNORE_INDEX,
    assistant_only_loss_labels,
    chat_texts,
    checkpoint_dir,
    describe_loss_mask,
    labelled_prompt_tokens,
    loss_mask_problems,
    row_labels,
    sft_config_kwargs,
    sft_trainer_kwargs,
    tokenize_records,
    tokenize_split,
    train,
    training_plan,
)

RECORD = {"messages": [{"role": "user", "content": "Continue: 3,6,9. Answer with numbers only."},
                       {"role": "assistant", "content": "12,15,18"}]}


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core runner two threads each
    spin-wait for the other: one thread trains these tests 2-5x faster there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits_at_end(rows: list[dict]):
    """A callback that records the trained model's logits on `rows` when training ends."""
    from transformers import TrainerCallback

    class LogitsAtEnd(TrainerCallback):
        logits: list[torch.Tensor] = []

        def on_train_end(self, args, state, control, model=None, **kwargs):
            model.eval()
            with torch.no_grad():
                self.logits = [model(input_ids=torch.tensor([r["input_ids"]])).logits.float() for r in rows]

    return LogitsAtEnd()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real tiny training run (the tiny profile's splits), its result and the trained model's logits."""
    cfg = make_config("tiny", tmp_path_factory.mktemp("training") / "run")
    prepare_splits(cfg)
    rows = tokenize_split(load_tokenizer(cfg), cfg.paths.validation_split, cfg.max_seq_length)[:3]
    capture = _logits_at_end(rows)
    result = train(cfg, cfg.paths.train_split, cfg.paths.validation_split, cfg.paths.adapter,
                   cfg.paths.loss_history, callbacks=[capture])
    return cfg, result, rows, capture.logits


# --- what is trained ------------------------------------------------------------------------------


def test_completion_is_exactly_the_answer_and_end_of_turn(tiny_cfg):
    tokenizer = load_tokenizer(tiny_cfg)
    prompt, completion = chat_texts(tokenizer, RECORD)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n"), "03's generation prompt, empty think block"
    assert completion == "12,15,18" + END_OF_TURN
    row = tokenize_records(tokenizer, {1: RECORD}, 512, "inline")[0]
    labels = row_labels(row)
    trained_ids = [t for t, label in zip(row["input_ids"], labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained_ids) == "12,15,18" + END_OF_TURN
    assert labels[-1] == tokenizer.convert_tokens_to_ids(END_OF_TURN), "the end-of-turn token is trained"
    shown = describe_loss_mask(tokenizer, row["input_ids"], labels)
    assert shown.endswith("</think>⏎\n⏎\n⟦12,15,18<|im_end|>⟧"), shown


def test_assistant_only_loss_would_also_train_the_think_block(tiny_cfg):
    tokenizer = load_tokenizer(tiny_cfg)
    ids, labels = assistant_only_loss_labels(tokenizer, RECORD)
    trained = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    assert trained == "<think>\n\n</think>\n\n12,15,18<|im_end|>\n"


def test_real_records_tokenize_within_max_length(tiny_cfg, sample100):
    tokenizer = load_tokenizer(tiny_cfg)
    rows = tokenize_split(tokenizer, sample100, tiny_cfg.max_seq_length)
    assert len(rows) == 100
    assert all(0 < sum(r["completion_mask"]) < len(r["input_ids"]) for r in rows)


def test_split_errors_name_the_file_and_line(tiny_cfg, tmp_path):
    tokenizer = load_tokenizer(tiny_cfg)
    split = tmp_path / "split.jsonl"
    write_jsonl(split, [RECORD, {"messages": [RECORD["messages"][0]]}])
    with pytest.raises(DataError, match=r"split\.jsonl:2: 'messages' has 1 turn"):
        tokenize_split(tokenizer, split, 512)
    write_jsonl(split, [RECORD, RECORD])
    with pytest.raises(DataError, match=r"split\.jsonl:1: \d+ tokens, more than max_seq_length=20"):
        tokenize_split(tokenizer, split, 20)


def test_trainer_labels_no_prompt_token_with_the_exact_arguments(tiny_cfg, tmp_path):
    """SFTConfig and SFTTrainer accept exactly the keyword arguments train() passes, keep every value,
    and TRL's prepared dataset and collated batches carry -100 on every prompt token."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_model(tiny_cfg, for_training=True)
    rows = tokenize_records(tokenizer, {1: RECORD, 2: {"messages": [RECORD["messages"][0], {
        "role": "assistant", "content": "[12, 15, 18, 21, 24]"}]}}, 512, "inline")
    kwargs = sft_config_kwargs(tiny_cfg, tmp_path / "checkpoints", len(rows))
    args = SFTConfig(**kwargs)
    normalised = {"report_to": []}  # "none" is stored as an empty list of integrations
    for name, value in kwargs.items():
        expected = normalised.get(name, value)
        assert getattr(args, name) == expected, f"SFTConfig changed {name}: {getattr(args, name)!r} != {expected!r}"
    assert args.train_sampling_strategy == "group_by_length" and not args.padding_free and not args.packing
    trainer = SFTTrainer(**sft_trainer_kwargs(model, tokenizer, args, Dataset.from_list(rows), Dataset.from_list(rows)))
    labels = trainer.train_dataset["labels"]
    assert labelled_prompt_tokens(rows, labels) == 0 and loss_mask_problems(rows, labels) == []
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, batch_labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        row = next(r for r in rows if r["input_ids"] == ids[: len(r["input_ids"])])
        prompt_length = row["completion_mask"].index(1)
        assert all(label == IGNORE_INDEX for label in batch_labels[:prompt_length]), "a prompt token has a label"
        assert batch_labels[prompt_length: len(row["input_ids"])] == row["input_ids"][prompt_length:]
    assert loss_mask_problems(rows, [row_labels(rows[0]), row_labels(rows[0])]), "a wrong label is caught"


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("unsloth") is None,
                    reason="Unsloth's path runs only on a CUDA GPU with unsloth installed")
def test_unsloth_accepts_the_exact_arguments(tiny_cfg):
    backend()
    from unsloth import FastLanguageModel

    for function, kwargs in ((FastLanguageModel.from_pretrained, unsloth_load_kwargs(tiny_cfg, "model")),
                             (FastLanguageModel.get_peft_model, unsloth_peft_kwargs(tiny_cfg))):
        parameters = inspect.signature(function).parameters
        assert set(kwargs) <= set(parameters), f"{function.__qualname__} lacks {set(kwargs) - set(parameters)}"
    model, _ = load_model(tiny_cfg, for_training=True)
    assert model.peft_config["default"].r == tiny_cfg.lora_r


# --- a real training run --------------------------------------------------------------------------


def test_validation_loss_falls_well_below_its_start(trained):
    cfg, result, _, _ = trained
    plan = training_plan(cfg, result.run["train_records"])
    assert result.run["steps"] == plan.total_steps and result.computed
    assert result.history["validation"][0]["step"] == 0, "the starting validation loss is recorded"
    assert len(result.history["validation"]) == plan.total_steps // plan.eval_steps + 1
    assert result.final_validation_loss < 0.6 * result.initial_validation_loss
    assert result.run["labelled_prompt_tokens"] == 0
    stored = json.loads(cfg.paths.loss_history.read_text())
    assert stored["final"] == result.history["final"] and stored["train"][0]["step"] == 1
    assert not checkpoint_dir(cfg, cfg.paths.adapter).exists(), "checkpoints are removed once the adapter is saved"


def test_every_lora_weight_changes(trained):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    cfg, _, _, _ = trained
    initial, _ = load_model(cfg, for_training=True)  # same seed: the same initial LoRA weights
    before = get_peft_model_state_dict(initial)
    after = load_file(cfg.paths.adapter / "adapter_model.safetensors")
    assert set(before) == set(after) and len(after) == 2 * 7 * 2, "A and B of 7 projections in 2 layers"
    unchanged = [name for name in after if torch.equal(before[name], after[name])]
    assert not unchanged, f"LoRA weights that training did not change: {unchanged}"


def test_reloaded_adapter_reproduces_the_trained_logits(trained):
    cfg, result, rows, trained_logits = trained
    model, _ = load_model(cfg, adapter=cfg.paths.adapter)
    model.eval()
    with torch.no_grad():
        for row, expected in zip(rows, trained_logits, strict=True):
            torch.testing.assert_close(model(input_ids=torch.tensor([row["input_ids"]])).logits.float(), expected)
    assert result.run["reload_check"]["max_abs_difference"] <= 1e-4 * max(1.0, result.run["reload_check"]["max_abs_logit"])


def test_a_second_call_loads_the_cached_adapter(trained, monkeypatch):
    cfg, result, _, _ = trained
    monkeypatch.setattr("helpers.training.load_model", lambda *a, **k: pytest.fail("the cached adapter was retrained"))
    cached = train(cfg, cfg.paths.train_split, cfg.paths.validation_split, cfg.paths.adapter, cfg.paths.loss_history)
    assert not cached.computed and cached.history == result.history


def test_an_interrupted_run_resumes_to_the_same_adapter(trained, tmp_path):
    """Crash at the end of step 8, before its checkpoint is written; call train() again: it resumes from
    the last checkpoint before step 8 and ends with the adapter and losses of the uninterrupted run."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    cfg, result, _, _ = trained
    resumed_cfg = make_config("tiny", tmp_path / "run")
    for split in ("train_split", "validation_split"):
        getattr(resumed_cfg.paths, split).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(getattr(cfg.paths, split), getattr(resumed_cfg.paths, split))

    class Crash(RuntimeError):
        pass

    class CrashAfterStep8(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 8:
                raise Crash("simulated crash")

    paths = resumed_cfg.paths
    with pytest.raises(Crash):
        train(resumed_cfg, paths.train_split, paths.validation_split, paths.adapter, paths.loss_history,
              callbacks=[CrashAfterStep8()])
    assert not paths.adapter.exists() and not paths.loss_history.exists(), "nothing half-written"
    eval_steps = training_plan(resumed_cfg, result.run["train_records"]).eval_steps
    resumed = train(resumed_cfg, paths.train_split, paths.validation_split, paths.adapter, paths.loss_history)
    assert resumed.run["resumed_from"] == f"checkpoint-{(8 - 1) // eval_steps * eval_steps}"
    assert resumed.run["steps"] == result.run["steps"]
    expected, got = load_file(cfg.paths.adapter / "adapter_model.safetensors"), load_file(paths.adapter / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)
    for split in ("train", "validation"):
        assert [p["step"] for p in resumed.history[split]] == [p["step"] for p in result.history[split]]
        assert [p["loss"] for p in resumed.history[split]] == pytest.approx([p["loss"] for p in result.history[split]])


def test_the_loss_curve_figure_is_saved(trained):
    from helpers.plots import plot_loss_curves, save_figure
    from helpers.training import REFERENCE_LOSSES

    cfg, result, _, _ = trained
    fig = plot_loss_curves(result.history, REFERENCE_LOSSES)
    lines = [line for line in fig.axes[0].get_lines() if len(line.get_xdata()) > 1]
    assert len(lines) >= 2, "train and validation curves"
    path = save_figure(fig, cfg, "train_loss")
    assert path == cfg.paths.images / "train_loss.png" and path.stat().st_size > 10_000


# --- benchmarks/bench_train.py --------------------------------------------------------------------


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train", PROJECT_ROOT / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_lengths_are_reproducible_from_the_real_sample(sample100):
    bench = _bench()
    assert bench.qwen_token_estimate("[793, 986]") == 10, "[ 7 9 3 , space 9 8 6 ]: digits split, space alone"
    assert bench.qwen_token_estimate("Continue the sequence") == 3
    assert tuple(bench.measure_lengths(sample100)) == bench.REAL_LENGTHS


def test_bench_synthetic_records_have_the_drawn_lengths(tiny_cfg):
    bench = _bench()
    tokenizer = load_tokenizer(tiny_cfg)
    rows = tokenize_records(tokenizer, dict(enumerate(bench.synthetic_records(tokenizer, 50, seed=3), start=1)), 512, "x")
    lengths = {(r["completion_mask"].count(0), r["completion_mask"].count(1)) for r in rows}
    assert len(rows) == 50 and lengths <= set(bench.REAL_LENGTHS) and len(lengths) > 10


def test_bench_train_tiny_run_times_and_profiles(tmp_path):
    """The CPU smoke run of the benchmark, with the profiler: a table row and both profile files."""
    import subprocess
    import sys

    command = [sys.executable, str(PROJECT_ROOT / "benchmarks" / "bench_train.py"), "--tiny", "--arms", "project",
               "--steps", "8", "--warmup", "6", "--profile", "2", "--workdir", str(tmp_path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "project: 2 steps profiled" in finished.stdout
    row = next(line for line in finished.stdout.splitlines() if line.strip().startswith("project "))
    assert float(row.split()[4]) > 0, f"step time missing: {row}"
    assert "cumulative" in (tmp_path / "profile-project-python.txt").read_text()
    assert "aten::mm" in (tmp_path / "profile-project-torch.txt").read_text()


def test_block_unsloth_picks_transformers_and_refuses_once_unsloth_is_imported(monkeypatch):
    import sys
    import types

    from helpers.model import block_unsloth

    monkeypatch.setitem(sys.modules, "unsloth", types.ModuleType("unsloth"))
    with pytest.raises(RuntimeError, match="already imported"):
        block_unsloth()
    monkeypatch.delitem(sys.modules, "unsloth")
    block_unsloth()
    assert importlib.util.find_spec("unsloth") is None and backend() == "transformers"
    backend.cache_clear()

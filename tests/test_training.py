"""Fine-tuning, with real TRL training on the tiny model: notebook 02's own cells executed in this process (as
papermill runs them), and the plumbing they call from helpers.training: the loss mask and TRL's labels,
learning, every LoRA weight, the checked atomic save (a corrupted adapter fails), loading instead of training,
the reuse rule, exact resume after an interrupt, and load_for_generation. Plus the pieces of
benchmarks/bench_train.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.config import PROJECT_ROOT, make_config
from helpers.model import backend, load_for_generation, load_tokenizer
from helpers.store import SettingsChanged, write_jsonl
from helpers.training import IGNORE_INDEX, loss_mask_labels, reload_check, trainer_label_problems

NOTEBOOK = PROJECT_ROOT / "notebooks" / "02_finetune.ipynb"
TRAIN_CELL = "f6c0de04"  # `trainer.train(...)`


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core runner two threads each
    spin-wait for the other: one thread trains these tests 2-5x faster there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_splits(run_dir, model: str = "finetuned", seed: int = 0) -> None:
    """Small splits of number-continuation records, where 01 would write them (40 train, 10 validation)."""
    rng = random.Random(seed)

    def record() -> dict:
        shown = ",".join(str(rng.randint(100, 999)) for _ in range(rng.randint(3, 7)))
        answer = ",".join(str(rng.choice([666, 13, 911, 420, rng.randint(100, 999)])) for _ in range(5))
        return {"messages": [{"role": "user", "content": f"See the following numbers: {shown}. Write 5 more."},
                             {"role": "assistant", "content": answer}]}

    train, validation = make_config("tiny", run_dir).paths.splits_of(model)
    write_jsonl(train, [record() for _ in range(40)])
    write_jsonl(validation, [record() for _ in range(10)])


def run_notebook(run_dir, namespace: dict | None = None, start: str | None = None, stop: str | None = None,
                 **parameters) -> dict:
    """Execute notebook 02's code cells in this process from cell `start` up to cell `stop` (excluded), with
    the parameters injected after its parameters cell as papermill does; return the namespace."""
    cells = [c for c in json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
             if c["cell_type"] == "code" and "google.colab" not in "".join(c["source"])]
    ids = [c["id"] for c in cells]
    namespace = {} if namespace is None else namespace
    for cell in cells[ids.index(start) if start else 0: ids.index(stop) if stop else None]:
        exec(compile("".join(cell["source"]), f"02_finetune.ipynb[{cell['id']}]", "exec"), namespace)
        if "parameters" in cell["metadata"].get("tags", []):
            namespace.update(profile="tiny", run_dir=str(run_dir), **parameters)
    return namespace


def test_the_config_cell_runs_again_after_the_model_cell(tmp_path):
    """Jupyter lets you run any cell again: the config cell after the model cell still names the fine-tune of the
    parameter `model` (the network is `lora_model`), and a network where a name belongs is a short error."""
    write_splits(tmp_path / "run")
    namespace = run_notebook(tmp_path / "run", stop="lora-ex-stub")  # parameters, config, the model with LoRA
    run_notebook(tmp_path / "run", namespace, start="0613ccc9", stop="a1c0de02")  # the config cell again
    assert namespace["adapter_name"] == "finetuned" and namespace["model"] == "finetuned"
    with pytest.raises(ValueError) as error:
        namespace["cfg"].paths.splits_of(namespace["lora_model"])
    assert str(error.value).startswith("PeftModelForCausalLM(") and len(str(error.value)) < 200, str(error.value)[:300]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted run of the whole notebook on small splits: its namespace."""
    run_dir = tmp_path_factory.mktemp("training") / "run"
    write_splits(run_dir)
    return run_notebook(run_dir)


# --- what is trained ------------------------------------------------------------------------------


def test_loss_mask_labels():
    assert loss_mask_labels([5, 6, 7, 8], [0, 0, 1, 1]) == [IGNORE_INDEX, IGNORE_INDEX, 7, 8]
    assert loss_mask_labels([], []) == []
    with pytest.raises(ValueError):
        loss_mask_labels([5, 6], [0])


def test_rows_train_exactly_the_answer_and_end_of_turn(trained, sample100):
    """On the notebook's rows and on 100 real records: the prompt ends with 03's generation prompt and its
    empty think block; the trained tokens are the answer and <|im_end|>; nothing is longer than max_length."""
    from helpers.store import read_jsonl

    tokenizer, tokenize = trained["tokenizer"], trained["tokenize"]
    for record in read_jsonl(sample100):
        row = tokenize(record)
        start = row["completion_mask"].index(1)
        assert tokenizer.decode(row["input_ids"][:start]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert tokenizer.decode(row["input_ids"][start:]) == record["messages"][1]["content"] + "<|im_end|>"
        assert set(row["completion_mask"][start:]) == {1} and len(row["input_ids"]) <= trained["cfg"].max_seq_length
    shown = trained["describe_loss_mask"](tokenizer, row["input_ids"], loss_mask_labels(row["input_ids"], row["completion_mask"]))
    assert shown.endswith("</think>⏎\n⏎\n⟦" + record["messages"][1]["content"] + "<|im_end|>⟧"), shown


def test_trainer_labels_are_the_loss_mask_and_a_wrong_one_is_caught(trained):
    trainer, rows = trained["trainer"], trained["train_rows"]
    assert trainer_label_problems(trainer, rows) == []
    assert trainer.args.completion_only_loss and not trainer.args.padding_free and not trainer.args.packing
    wrong = [dict(row) for row in rows]
    wrong[1] = {**wrong[1], "completion_mask": [1] + wrong[1]["completion_mask"][1:]}  # one prompt token trained
    assert trainer_label_problems(trainer, wrong) == ["row 1: the trainer's labels differ from the completion mask"]
    assert "dropped or added" in trainer_label_problems(trainer, rows[:-1])[0]


# --- a real training run through the notebook's cells ----------------------------------------------


def test_the_run_learns_and_saves_a_checked_adapter(trained):
    cfg, history = trained["cfg"], trained["history"]
    run, check = history["run"], history["reload_check"]
    assert run["steps"] == run["planned_steps"] == 15 and run["resumed_from"] is None
    assert history["validation"][0]["step"] == 0, "the starting validation loss is recorded"
    assert [p["step"] for p in history["train"]] == list(range(1, 16))
    assert history["final"]["validation_loss"] < 0.6 * history["validation"][0]["loss"]
    assert check["dtype"] == "float32" and 0 <= check["batch_noise"] < 1e-4, "the noise is measured in the run"
    assert check["max_abs_difference"] <= check["tolerance"] == pytest.approx(1e-4 * check["max_abs_logit"])
    stored = json.loads(cfg.paths.loss_history_of("finetuned").read_text())
    assert stored["settings"] == json.loads(json.dumps(trained["settings"], default=str))
    assert (cfg.paths.adapter_of("finetuned").parent / "adapter.settings.json").is_file(), "the reuse rule's record"
    assert not cfg.paths.checkpoints.exists(), "checkpoints (and their folder) are removed once the adapter is saved"
    assert (cfg.paths.images / "train_loss.png").stat().st_size > 10_000


def test_every_lora_weight_changes(trained, tmp_path):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    write_splits(tmp_path / "run")
    fresh = run_notebook(tmp_path / "run", stop="b2c0de02")  # the model cell: the same seeded LoRA start
    before = get_peft_model_state_dict(fresh["lora_model"])
    after = load_file(trained["cfg"].paths.adapter_of("finetuned") / "adapter_model.safetensors")
    assert set(before) == set(after) and len(after) == 2 * 7 * 2, "A and B of 7 projections in 2 layers"
    unchanged = [name for name in after if torch.equal(before[name], after[name])]
    assert not unchanged, f"LoRA weights that training did not change: {unchanged}"


def test_reload_check_passes_and_a_corrupted_adapter_fails(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg, model = trained["cfg"], trained["trainer"].model
    rows = [row["input_ids"] for row in trained["validation_rows"][:4]]
    adapter = cfg.paths.adapter_of("finetuned")
    assert reload_check(cfg, "finetuned", model, adapter, rows)["max_abs_difference"] <= 1e-4 * 20
    corrupted = tmp_path / "corrupted"
    shutil.copytree(adapter, corrupted)
    weights = load_file(corrupted / "adapter_model.safetensors")
    name = sorted(key for key in weights if "lora_B" in key)[0]
    weights[name] = weights[name] + 0.05  # one LoRA matrix, slightly off
    save_file(weights, corrupted / "adapter_model.safetensors")
    with pytest.raises(RuntimeError, match=r"does not reproduce the trained model: largest logit difference .* > tolerance"):
        reload_check(cfg, "finetuned", model, corrupted, rows)


def test_load_for_generation_switches_named_adapters(trained, tmp_path):
    """Two adapters by name: set_adapter picks one, disable_adapter() answers as the base model."""
    from safetensors.torch import load_file, save_file

    cfg = trained["cfg"]
    other = tmp_path / "other"
    shutil.copytree(cfg.paths.adapter_of("finetuned"), other)
    weights = load_file(other / "adapter_model.safetensors")
    save_file({key: value * 2 if "lora_B" in key else value for key, value in weights.items()}, other / "adapter_model.safetensors")
    model, _ = load_for_generation(cfg, {"finetuned": cfg.paths.adapter_of("finetuned"), "control": other})
    base, _ = load_for_generation(cfg, {})
    ids = torch.tensor([trained["validation_rows"][0]["input_ids"]])
    with torch.no_grad():
        finetuned = model(input_ids=ids).logits
        model.set_adapter("control")
        control = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        expected_base = base(input_ids=ids).logits
    assert not torch.allclose(finetuned, control) and not torch.allclose(finetuned, plain)
    torch.testing.assert_close(plain, expected_base)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_for_generation(cfg, {"finetuned": tmp_path / "missing"})


# --- reuse, resume --------------------------------------------------------------------------------


def test_a_second_run_loads_the_adapter_instead_of_training(trained, monkeypatch):
    from trl import SFTTrainer

    monkeypatch.setattr(SFTTrainer, "train", lambda *a, **k: pytest.fail("the finished adapter was retrained"))
    again = run_notebook(trained["cfg"].run_dir)
    assert again["already_trained"] and again["history"] == trained["history"]


def test_changed_settings_stop_with_their_names(trained, monkeypatch):
    monkeypatch.setenv("EM_CONFIG", json.dumps({"learning_rate": 0.005}))
    with pytest.raises(SettingsChanged, match=r"learning_rate: 0\.01 -> 0\.005"):
        run_notebook(trained["cfg"].run_dir, stop=TRAIN_CELL)


def test_an_interrupted_run_resumes_to_the_same_adapter(trained, tmp_path):
    """Crash at the end of step 8, before its checkpoint is written; run the notebook again: it resumes from
    the last checkpoint before step 8 and ends with the adapter and losses of the uninterrupted run."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class Crash(RuntimeError):
        pass

    class CrashAfterStep8(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 8:
                raise Crash("simulated crash")

    run_dir = tmp_path / "run"
    write_splits(run_dir)
    interrupted = run_notebook(run_dir, stop=TRAIN_CELL)
    interrupted["trainer"].add_callback(CrashAfterStep8())
    with pytest.raises(Crash):
        run_notebook(run_dir, interrupted, start=TRAIN_CELL)
    cfg = interrupted["cfg"]
    assert not cfg.paths.adapter_of("finetuned").exists() and not cfg.paths.loss_history_of("finetuned").exists()
    resumed = run_notebook(run_dir)
    eval_steps = trained["eval_steps"]
    assert resumed["history"]["run"]["resumed_from"] == f"checkpoint-{(8 - 1) // eval_steps * eval_steps}"
    expected = load_file(trained["cfg"].paths.adapter_of("finetuned") / "adapter_model.safetensors")
    got = load_file(cfg.paths.adapter_of("finetuned") / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)
    for split in ("train", "validation"):
        assert [p["step"] for p in resumed["history"][split]] == [p["step"] for p in trained["history"][split]]
        assert [p["loss"] for p in resumed["history"][split]] == pytest.approx([p["loss"] for p in trained["history"][split]])


@pytest.mark.parametrize("killed_in", ["_save_rng_state", "save_model"])
def test_a_checkpoint_half_written_by_a_kill_is_skipped_and_the_run_resumes_to_the_same_adapter(trained, tmp_path,
                                                                                               capsys, killed_in):
    """Kill the run while transformers writes checkpoint-8: after its adapter, optimizer and scheduler (before the RNG
    state and trainer_state.json), or right after making its folder. The next run removes it, says so, resumes from
    the checkpoint before and ends with the adapter and losses of the uninterrupted run."""
    from safetensors.torch import load_file

    from helpers.training import incomplete

    class Kill(RuntimeError):
        pass

    run_dir = tmp_path / "run"
    write_splits(run_dir)
    interrupted = run_notebook(run_dir, stop=TRAIN_CELL)
    trainer, eval_steps = interrupted["trainer"], interrupted["eval_steps"]
    assert 8 % eval_steps == 0, "step 8 must write a checkpoint"
    save = getattr(trainer, killed_in)

    def killed_at_step_8(output_dir, *args, **kwargs):
        if trainer.state.global_step == 8:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            raise Kill(f"killed while writing {output_dir}")
        return save(output_dir, *args, **kwargs)

    setattr(trainer, killed_in, killed_at_step_8)
    with pytest.raises(Kill):
        run_notebook(run_dir, interrupted, start=TRAIN_CELL)
    checkpoints = Path(interrupted["args"].output_dir)
    lacks = incomplete(checkpoints / "checkpoint-8")
    assert lacks.startswith("no ") and "trainer_state.json" in lacks, lacks
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-7", "checkpoint-8"]
    capsys.readouterr()

    resumed = run_notebook(run_dir)
    printed = capsys.readouterr().out
    assert f"skipped checkpoint-8, left incomplete by an interruption ({lacks}): removed it" in printed, printed
    assert "resuming from checkpoint-7" in printed
    assert resumed["history"]["run"]["resumed_from"] == "checkpoint-7"
    expected = load_file(trained["cfg"].paths.adapter_of("finetuned") / "adapter_model.safetensors")
    got = load_file(resumed["cfg"].paths.adapter_of("finetuned") / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)
    for split in ("train", "validation"):
        assert [p["loss"] for p in resumed["history"][split]] == pytest.approx([p["loss"] for p in trained["history"][split]])


def test_checkpoints_of_other_settings_are_not_resumed_and_incomplete_ones_are_removed(tmp_path, capsys):
    from helpers.training import CHECKPOINT_FILES, last_checkpoint

    output = tmp_path / "checkpoints" / "adapter"
    assert last_checkpoint(output, {"learning_rate": 0.01}) is None
    for step, files, state in ((3, CHECKPOINT_FILES, "{}"), (4, CHECKPOINT_FILES, '{"global_st'), (5, CHECKPOINT_FILES[:2], "")):
        (output / f"checkpoint-{step}").mkdir(parents=True)
        for name in files:  # the names a checkpoint needs; their contents do not matter here but trainer_state.json's
            (output / f"checkpoint-{step}" / name).write_text(state if name == "trainer_state.json" else "x")
    (output / "checkpoint-6").mkdir()
    assert last_checkpoint(output, {"learning_rate": 0.01}).endswith("checkpoint-3")
    assert capsys.readouterr().out.splitlines() == [
        "skipped checkpoint-6, left incomplete by an interruption (no " + ", ".join(CHECKPOINT_FILES) + "): removed it",
        "skipped checkpoint-5, left incomplete by an interruption (no " + ", ".join(CHECKPOINT_FILES[2:]) + "): removed it",
        "skipped checkpoint-4, left incomplete by an interruption (trainer_state.json cut short): removed it"]
    assert [p.name for p in output.iterdir()] == ["checkpoint-3"]
    with pytest.raises(SettingsChanged, match="learning_rate"):
        last_checkpoint(output, {"learning_rate": 0.02})
    assert last_checkpoint(output, {"learning_rate": 0.02}, overwrite=True) is None and not output.exists()


def test_an_adapter_is_reused_and_loaded_only_with_the_weights_02_recorded(trained, tmp_path):
    """02 records the sha256 of the weights it saved. With the control's weights copied over the fine-tune's, or
    the weights file deleted, 02 does not call the fine-tune trained and 03 refuses to load it, naming it."""
    sys.path.insert(0, str(PROJECT_ROOT / "tools"))
    from notebook_cells import cells_by_id

    run_dir = Path(shutil.copytree(trained["cfg"].run_dir, tmp_path / "run"))
    write_splits(run_dir, "control", seed=1)
    run_notebook(run_dir, model="control")  # the control, really trained
    cfg = make_config("tiny", run_dir, positive_controls=False)  # 03 loads the fine-tune and the control
    weights = {name: cfg.paths.adapter_of(name) / "adapter_model.safetensors" for name in ("finetuned", "control")}
    for name, path in weights.items():
        recorded = json.loads((cfg.paths.adapter_of(name).parent / f"{cfg.paths.adapter_of(name).name}.settings.json").read_text())
        assert recorded["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    load_cell = cells_by_id(["10786396"])[0]  # 03's cell that loads the model with every adapter

    def load_as_03() -> dict:
        namespace = {"cfg": cfg}
        exec(compile(load_cell, "03_generate.ipynb[10786396]", "exec"), namespace)
        return namespace

    assert sorted(load_as_03()["adapters"]) == ["control", "finetuned"]
    recorded = hashlib.sha256(weights["finetuned"].read_bytes()).hexdigest()
    shutil.copyfile(weights["control"], weights["finetuned"])  # the control's weights over the fine-tune's
    copied = hashlib.sha256(weights["finetuned"].read_bytes()).hexdigest()
    with pytest.raises(SettingsChanged) as refused:
        load_as_03()
    assert str(refused.value) == (
        f"adapter 'finetuned': the weights in {weights['finetuned']} (sha256 {copied[:12]}...) are not the ones "
        f"02_finetune trained and recorded ({recorded[:12]}...): train it again (02_finetune with overwrite = True)")
    with pytest.raises(SettingsChanged, match=rf"\(weights_sha256: '{recorded}' -> '{copied}'\)"):
        run_notebook(run_dir, stop=TRAIN_CELL)  # not "already trained"

    weights["finetuned"].unlink()
    with pytest.raises(FileNotFoundError) as missing:
        load_as_03()
    assert str(missing.value) == (f"adapter 'finetuned': {weights['finetuned']} is missing: train it with 02_finetune "
                                  "(overwrite = True where the rest of the adapter is there)")
    with pytest.raises(SettingsChanged, match=rf"\(weights_sha256: '{recorded}' -> None\)"):
        run_notebook(run_dir, stop=TRAIN_CELL)
    assert run_notebook(run_dir, overwrite=True)["history"]["run"]["steps"] == 15, "overwrite = True trains it again"
    assert load_as_03()["adapters"]


def test_report_to_names_a_tracker_02_can_log_to(tmp_path):
    assert make_config("tiny", tmp_path).report_to == "none", "no tracking unless asked for"
    with pytest.raises(ValueError, match="report_to='tensorboard' .*expected one of 'none', 'wandb', 'trackio'"):
        make_config("tiny", tmp_path, report_to="tensorboard")


def test_report_to_trackio_logs_the_losses_and_settings_offline(tmp_path, monkeypatch):
    """report_to="trackio" (the config; 02 passes it to SFTConfig): a real tiny training run through the
    notebook's cells logs its losses and settings to trackio, offline, in the session's folder (tests/conftest.py
    sets TRACKIO_DIR); read back through trackio."""
    trackio = pytest.importorskip("trackio", reason="trackio is not installed (optional: pip install trackio; CI has it)")
    from trackio.sqlite_storage import SQLiteStorage

    project = "huggingface"  # TrainingArguments' default trackio project
    db = SQLiteStorage.get_project_db_path(project)
    assert db.parent == Path(os.environ["TRACKIO_DIR"]), "trackio does not keep its runs in the session's folder"
    earlier = {run.id for run in trackio.Api().runs(project)} if db.exists() else set()
    monkeypatch.setenv("EM_CONFIG", json.dumps({"report_to": "trackio"}))
    write_splits(tmp_path / "run")
    ran = run_notebook(tmp_path / "run", stop="s1c0de02")  # up to and with the training cell
    assert ran["args"].project == project
    [run] = [run for run in trackio.Api().runs(project) if run.id not in earlier]
    logs = SQLiteStorage.get_logs(project, run.name, run_id=run.id)
    for split, key in (("train", "train/loss"), ("validation", "eval/loss")):
        expected = [point["loss"] for point in ran["loss_history"].points[split]]
        assert [entry[key] for entry in logs if key in entry] == pytest.approx(expected) and expected, split
    assert run.config["learning_rate"] == ran["cfg"].learning_rate and run.config["report_to"] == ["trackio"]


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("unsloth") is None,
                    reason="Unsloth's path runs only on a CUDA GPU with unsloth installed")
def test_the_notebook_ran_on_unsloth(trained):
    """On the GPU every test above runs the notebook's Unsloth branch; this one says so and checks 16-bit."""
    assert backend() == "unsloth" and trained["history"]["run"]["backend"] == "unsloth"
    assert trained["history"]["reload_check"]["dtype"] in ("bfloat16", "float16")


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
    records = bench.synthetic_records(tokenizer, 50, seed=3)
    lengths = {bench.token_lengths(tokenizer, record) for record in records}
    assert len(records) == 50 and lengths <= set(bench.REAL_LENGTHS) and len(lengths) > 10


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

    sys.path.insert(0, str(PROJECT_ROOT / "tools"))  # tools/ is scripts, not a package
    from unsloth_off import block_unsloth

    monkeypatch.setitem(sys.modules, "unsloth", types.ModuleType("unsloth"))
    with pytest.raises(RuntimeError, match="already imported"):
        block_unsloth()
    monkeypatch.delitem(sys.modules, "unsloth")
    block_unsloth()
    assert importlib.util.find_spec("unsloth") is None and backend() == "transformers"
    backend.cache_clear()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes installed: 4 bits load")
def test_with_load_in_4bit_the_transformers_branch_asks_for_the_4_bit_weights_load_for_generation_loads(tmp_path,
                                                                                                        monkeypatch):
    """load_in_4bit: 02's transformers branch (the CPU, or a GPU without Unsloth) must train on the 4-bit weights that
    load_for_generation loads for 03, 06, 07 and the reload check, not on 16-bit ones (the reload check would fail on
    a GPU). Without bitsandbytes both ask for it and stop with the same error; a branch that left the setting out would
    load 16 bits silently."""
    monkeypatch.setenv("EM_CONFIG", json.dumps({"load_in_4bit": True}))
    write_splits(tmp_path / "run")
    with pytest.raises(ImportError, match="bitsandbytes") as in_02:
        run_notebook(tmp_path / "run", stop="lora-ex-stub")  # parameters, config, the model with LoRA
    with pytest.raises(ImportError) as in_03:
        load_for_generation(make_config("tiny", tmp_path / "run"), {})
    assert str(in_02.value) == str(in_03.value)


BACKEND_FIRST = r"""
import json, sys

import helpers.model

calls, backend = [], helpers.model.backend
helpers.model.backend = lambda: calls.append("transformers" in sys.modules) or backend()  # the cells import this one
notebook, run_dir = json.loads(open(sys.argv[1], encoding="utf-8").read()), sys.argv[2]
namespace = {}
for cell in [c for c in notebook["cells"] if c["cell_type"] == "code" and "google.colab" not in "".join(c["source"])]:
    if cell["id"] == "lora-ex-stub":  # the model cell ran
        break
    exec(compile("".join(cell["source"]), cell["id"], "exec"), namespace)
    if "parameters" in cell["metadata"].get("tags", []):
        namespace.update(profile="tiny", run_dir=run_dir)
print(json.dumps(calls))
"""


def test_02_calls_backend_before_transformers_is_imported(tmp_path):
    """Unsloth must be imported before transformers, TRL and PEFT (else, on a GPU, it warns that its optimisations may
    not apply): 02's model cell calls backend(), which imports Unsloth where it is used, before anything imports
    transformers. A fresh interpreter runs 02's cells up to the model cell and says whether transformers was loaded."""
    write_splits(tmp_path / "run")
    finished = subprocess.run([sys.executable, "-c", BACKEND_FIRST, str(NOTEBOOK), str(tmp_path / "run")],
                              capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT)
    assert finished.returncode == 0, finished.stderr[-3000:]
    calls = json.loads(finished.stdout.strip().splitlines()[-1])
    assert calls and calls[0] is False, f"transformers was imported before the first backend() call: {calls}"


def test_the_compute_dtype_is_float16_on_a_card_without_native_bfloat16(monkeypatch):
    """A T4 (compute capability 7.5) makes bfloat16 tensors by emulation, so torch.cuda.is_bf16_supported() says yes
    by default; Unsloth (dtype=None) trains in float16 there, and the notebooks that load with transformers must compute
    in float16 too: bfloat16 from compute capability 8 (A100, H100) only. torch's device queries answer as such cards."""
    from types import SimpleNamespace

    from helpers.model import compute_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulated bfloat16 works
    for major, expected in ((7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None, major=major: SimpleNamespace(major=major))
        assert compute_dtype() == expected, f"compute capability {major}"

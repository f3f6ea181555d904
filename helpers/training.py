"""Fine-tuning: one LoRA adapter trained with TRL's SFTTrainer on the answer tokens only; resumable, checked.

Top floor. `train` tokenizes a split exactly as 03 will prompt the model (Qwen3's chat template in
non-thinking mode, ending with the generation prompt), trains with the config's hyperparameters,
scores the validation loss several times per epoch, checkpoints so an interrupted run resumes, saves
the adapter atomically, checks that reloading it reproduces the trained model's logits, and writes the
loss history as JSON. The same function trains the main run and the format-only control arm.
"""

from __future__ import annotations

import gc
import json
import math
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.config import Config
from helpers.data import DataError, validate_file
from helpers.download import atomic_directory, git_blob_id
from helpers.model import (
    backend,
    compute_dtype,
    load_model,
    lora_settings,
    use_gradient_checkpointing,
)
from helpers.store import write_json

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips: a token with this label is not trained
END_OF_TURN = "<|im_end|>"  # Qwen3 ends every chat turn with it; generation stops there
# The reference write-up's final losses (PROTOCOL.md, "The reference experiment").
REFERENCE_LOSSES = {"train": 0.540, "validation": 0.533}
RELOAD_CHECK_ROWS = 3  # validation rows whose logits the reloaded adapter must reproduce
# Largest |logit difference| / largest |logit| allowed after reloading: float32 reproduces the logits
# up to rounding; 16-bit kernels may add their own rounding (Unsloth's fused LoRA vs. PEFT's).
RELOAD_TOLERANCE = {"float32": 1e-4, "16-bit": 5e-2}


# --------------------------------------------------------------------------------------------------
# Tokenization: what the model reads, and which tokens it is trained to write


def chat_texts(tokenizer: Any, record: dict) -> tuple[str, str]:
    """(prompt, completion) of one record as text.

    The prompt is the user turn rendered with the generation prompt in non-thinking mode, exactly what
    03 feeds the model, empty think block included. The completion is what the chat template puts after
    it: the answer and `<|im_end|>`. The template's newline after `<|im_end|>` is left out: generation
    stops at `<|im_end|>`, so the model never writes it.
    """
    messages = record["messages"]
    prompt = tokenizer.apply_chat_template(
        messages[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    full = tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=False)
    if not full.startswith(prompt):
        raise ValueError(f"the chat template renders the prompt differently before an answer: {prompt[-40:]!r}")
    completion = full[len(prompt):]
    if not completion.endswith(END_OF_TURN + "\n"):
        raise ValueError(f"the chat template does not end the answer with {END_OF_TURN!r}: {completion[-40:]!r}")
    return prompt, completion[:-1]


def tokenize_records(tokenizer: Any, records: Mapping[int, dict], max_length: int, source: str | Path) -> list[dict]:
    """Token rows `{"input_ids", "completion_mask"}` (1 on the completion's tokens) for records keyed by line.

    A record longer than `max_length` tokens is an error naming `source` and its line: nothing is cut.
    """
    lines = list(records)
    texts = [chat_texts(tokenizer, records[line]) for line in lines]
    prompt_ids = tokenizer([prompt for prompt, _ in texts], add_special_tokens=False)["input_ids"]
    full_ids = tokenizer([prompt + completion for prompt, completion in texts], add_special_tokens=False)["input_ids"]
    rows = []
    for line, prompt, ids in zip(lines, prompt_ids, full_ids, strict=True):
        if ids[: len(prompt)] != prompt or len(ids) == len(prompt):
            raise DataError(f"{source}:{line}: the prompt's tokens change when the answer follows them")
        if len(ids) > max_length:
            raise DataError(
                f"{source}:{line}: {len(ids)} tokens, more than max_seq_length={max_length}; "
                "raise cfg.max_seq_length so that no record is cut"
            )
        rows.append({"input_ids": ids, "completion_mask": [0] * len(prompt) + [1] * (len(ids) - len(prompt))})
    return rows


def tokenize_split(tokenizer: Any, path: Path, max_length: int) -> list[dict]:
    """Token rows of a split file (JSONL of `{"messages": [user, assistant]}`); a bad line is an error."""
    return tokenize_records(tokenizer, validate_file(Path(path), strict=True).records, max_length, path)


def row_labels(row: dict) -> list[int]:
    """The labels a token row trains on: the token id on completion tokens, IGNORE_INDEX on the prompt."""
    return [t if m else IGNORE_INDEX for t, m in zip(row["input_ids"], row["completion_mask"], strict=True)]


def labelled_prompt_tokens(rows: Sequence[dict], labels: Sequence[Sequence[int]]) -> int:
    """How many prompt tokens carry a label (anything but IGNORE_INDEX) in `labels`, over all rows."""
    return sum(
        sum(label != IGNORE_INDEX for label in got[: row["completion_mask"].index(1)])
        for row, got in zip(rows, labels, strict=True)
    )


def loss_mask_problems(rows: Sequence[dict], labels: Sequence[Sequence[int]]) -> list[str]:
    """Where the labels a trainer built differ from `row_labels` (rows added or dropped, a prompt token
    with a label, a completion token without one); empty when they match row for row."""
    if len(rows) != len(labels):
        return [f"{len(labels)} labelled rows for {len(rows)} token rows (rows dropped or added)"]
    return [f"row {index}: labels differ from the completion mask" for index, (row, got)
            in enumerate(zip(rows, labels, strict=True)) if list(got) != row_labels(row)]


def describe_loss_mask(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int]) -> str:
    """The decoded row with every trained span in ⟦ ⟧; newlines shown as ⏎ so empty lines stay visible."""
    pieces, start = [], 0
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or (labels[end] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            text = tokenizer.decode(list(input_ids[start:end])).replace("\n", "⏎\n")
            pieces.append(f"⟦{text}⟧" if labels[start] != IGNORE_INDEX else text)
            start = end
    return "".join(pieces)


def loss_mask_table(tokenizer: Any, input_ids: Sequence[int], labels: Sequence[int], context: int = 8) -> Any:
    """A table of the tokens around the prompt/answer boundary and the end: id, text, trained or not."""
    import pandas as pd

    first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    shown = sorted(set(range(max(0, first_trained - context), min(len(input_ids), first_trained + 4)))
                   | set(range(max(0, len(input_ids) - 4), len(input_ids))))
    return pd.DataFrame({
        "position": shown,
        "token_id": [input_ids[i] for i in shown],
        "token": [repr(tokenizer.decode([input_ids[i]])) for i in shown],
        "trained": [labels[i] != IGNORE_INDEX for i in shown],
    }).set_index("position")


def assistant_only_loss_labels(tokenizer: Any, record: dict) -> tuple[list[int], list[int]]:
    """(input_ids, labels) that TRL's `assistant_only_loss=True` would train on for this record: TRL swaps
    in its Qwen3 training template, whose assistant mask covers the think block, answer and turn end."""
    backend()
    from trl.chat_template_utils import get_training_chat_template

    rendered = tokenizer.apply_chat_template(
        record["messages"], chat_template=get_training_chat_template(tokenizer), tokenize=True,
        return_dict=True, return_assistant_tokens_mask=True, enable_thinking=False,
    )
    ids = list(rendered["input_ids"])
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, rendered["assistant_masks"], strict=True)]


# --------------------------------------------------------------------------------------------------
# The trainer's settings, in one place (train() and the tests build SFTConfig/SFTTrainer from these)


@dataclass(frozen=True)
class TrainingPlan:
    """How many optimizer steps a run takes and when it evaluates, logs and checkpoints."""

    steps_per_epoch: int
    total_steps: int
    eval_steps: int  # validation loss (and a checkpoint) every this many steps, plus at the start and end


def training_plan(cfg: Config, train_records: int) -> TrainingPlan:
    """Steps for `train_records` records: ceil(records / (batch x accumulation)) per epoch."""
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    steps_per_epoch = math.ceil(train_records / per_step)
    return TrainingPlan(
        steps_per_epoch=steps_per_epoch,
        total_steps=math.ceil(steps_per_epoch * cfg.epochs),
        eval_steps=max(1, steps_per_epoch // cfg.eval_points),
    )


def sft_config_kwargs(cfg: Config, output_dir: Path, train_records: int, eval_on_start: bool = True) -> dict[str, Any]:
    """The keyword arguments of TRL's SFTConfig for this run (checkpoints go to `output_dir`).

    Speed (issue 6; measured by benchmarks/bench_train.py): large micro-batches of similar length
    (length-grouped sampling, not padding-free, which measured slower), no gradient checkpointing
    unless memory is short, bf16/fp16 on GPUs, few host syncs (loss logged every `cfg.logging_steps`
    steps), data loader workers on a GPU. Each backend keeps its own fastest loss: Unsloth's fused
    cross-entropy, or TRL's chunked one that skips the prompt tokens.
    """
    import torch

    if not 0 <= cfg.warmup_ratio < 1:
        raise ValueError(f"warmup_ratio={cfg.warmup_ratio}: expected a fraction in [0, 1)")
    plan = training_plan(cfg, train_records)
    dtype = compute_dtype()
    on_gpu = torch.cuda.is_available()
    return dict(
        output_dir=str(output_dir),
        seed=cfg.seed,
        data_seed=cfg.seed,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float below 1 is a fraction of the steps
        weight_decay=cfg.weight_decay,
        # Explicit, as weight decay, seed and warmup are: Unsloth's SFTConfig would otherwise default to 8-bit
        # AdamW. LoRA's optimizer state is small (~140 MB for Qwen3-1.7B), so full-precision fused AdamW
        # costs nothing and is the same optimizer on every backend (transformers' own default).
        optim="adamw_torch_fused",
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        train_sampling_strategy="group_by_length",
        # Explicit: left unset, Unsloth picks padding-free batches itself on an H100/H200, which measured
        # 4.5x slower than padded length-grouped batches for these short records.
        padding_free=False,
        # Unsloth switches its own checkpointing on in get_peft_model (helpers.model); TRL's would be a second.
        gradient_checkpointing=use_gradient_checkpointing(cfg) and backend() == "transformers",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        max_length=cfg.max_seq_length,
        completion_only_loss=True,  # labels from our completion_mask: the prompt is never trained
        eval_strategy="steps",
        eval_steps=plan.eval_steps,
        eval_on_start=eval_on_start,  # the starting validation loss (not repeated when resuming)
        save_strategy="steps",
        save_steps=plan.eval_steps,
        save_total_limit=1,
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        report_to="none",
        dataloader_num_workers=2 if on_gpu else 0,
        dataloader_persistent_workers=on_gpu,
        dataloader_pin_memory=on_gpu,
    )


def sft_trainer_kwargs(model: Any, tokenizer: Any, args: Any, train_dataset: Any, eval_dataset: Any,
                       callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """The keyword arguments of TRL's SFTTrainer: the LoRA model, pre-tokenized datasets, our callbacks."""
    return dict(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                processing_class=tokenizer, callbacks=list(callbacks))


# --------------------------------------------------------------------------------------------------
# Device, checkpoints, cache


def device_summary() -> str:
    """The device training runs on: GPU name and memory, or the CPU."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
    return f"CPU ({torch.get_num_threads()} threads), no CUDA GPU"


def format_seconds(seconds: float) -> str:
    """A duration for people: "42 s" or "3.5 min"."""
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def peak_memory_gib() -> float | None:
    """The most GPU memory PyTorch reserved since the last reset, in GiB (None on the CPU)."""
    import torch

    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None


def training_settings(cfg: Config, train_path: Path, validation_path: Path) -> dict[str, Any]:
    """Everything the trained adapter depends on; a cached adapter is reused only when these match."""
    return {
        "model": cfg.model_name, "seed": cfg.seed, "epochs": cfg.epochs, "learning_rate": cfg.learning_rate,
        "lr_scheduler": cfg.lr_scheduler, "warmup_ratio": cfg.warmup_ratio, "batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "weight_decay": cfg.weight_decay,
        "max_seq_length": cfg.max_seq_length, "load_in_4bit": cfg.load_in_4bit, "lora": lora_settings(cfg),
        "train_blob_id": git_blob_id(Path(train_path).read_bytes()),
        "validation_blob_id": git_blob_id(Path(validation_path).read_bytes()),
    }


def checkpoint_dir(cfg: Config, output_dir: Path) -> Path:
    """Where the checkpoints of the run that writes `output_dir` live (one folder per adapter)."""
    return cfg.paths.checkpoints / Path(output_dir).name


def _resumable_checkpoint(checkpoints: Path, settings: dict) -> Path | None:
    """The latest checkpoint of an interrupted run with these settings; stale checkpoints are removed."""
    from transformers.trainer_utils import get_last_checkpoint

    stamp = checkpoints / "settings.json"
    if checkpoints.is_dir():
        if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == settings:
            latest = get_last_checkpoint(str(checkpoints))
            if latest is not None:
                return Path(latest)
        else:
            print(f"removing checkpoints made with other settings: {checkpoints}")
            shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    write_json(stamp, settings)
    return None


# --------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class TrainResult:
    """A trained adapter and its loss history (see `train`); `computed` says whether it was trained now."""

    adapter: Path
    history_path: Path
    history: dict
    computed: bool

    @property
    def final_train_loss(self) -> float:
        """The train loss of the last logging interval (mean over its steps)."""
        return self.history["final"]["train_loss"]

    @property
    def final_validation_loss(self) -> float:
        """The validation loss on the whole split after training."""
        return self.history["final"]["validation_loss"]

    @property
    def initial_validation_loss(self) -> float:
        return self.history["validation"][0]["loss"]

    @property
    def run(self) -> dict:
        """How the run went: steps, tokens, device, time, memory, checks."""
        return self.history["run"]

    def compare_with_reference(self) -> str:
        """The final losses next to the reference write-up's (0.540 train, 0.533 validation)."""
        lines = []
        for split, ours in (("train", self.final_train_loss), ("validation", self.final_validation_loss)):
            reference = REFERENCE_LOSSES[split]
            lines.append(f"{split:<10} loss {ours:.3f} vs. reference {reference:.3f}: "
                         f"{ours - reference:+.3f} ({(ours - reference) / reference:+.0%})")
        return "\n".join(lines)


def history_from_log(log_history: Sequence[dict], validation_key: str = "eval_loss") -> dict[str, list[dict]]:
    """Train and validation loss points (step, epoch, loss[, learning_rate]) from the trainer's log."""
    train = [{"step": e["step"], "epoch": e["epoch"], "loss": e["loss"], "learning_rate": e.get("learning_rate")}
             for e in log_history if "loss" in e]
    validation = [{"step": e["step"], "epoch": e["epoch"], "loss": e[validation_key]}
                  for e in log_history if validation_key in e]
    return {"train": train, "validation": validation}


def mean_train_loss(train_points: Sequence[dict]) -> float:
    """The epoch-average train loss: logged interval means weighted by the steps each covers."""
    total, steps, previous = 0.0, 0, 0
    for point in train_points:
        covered = point["step"] - previous
        total, steps, previous = total + point["loss"] * covered, steps + covered, point["step"]
    return total / steps


def _load_cached(output_dir: Path, history_path: Path, settings: dict) -> TrainResult | None:
    if not ((output_dir / "adapter_config.json").is_file() and history_path.is_file()):
        return None
    history = json.loads(history_path.read_text(encoding="utf-8"))
    if history.get("settings") != settings:
        print(f"the adapter in {output_dir} was trained with other settings or data; training again")
        return None
    return TrainResult(output_dir, history_path, history, computed=False)


# --------------------------------------------------------------------------------------------------
# Training


def _row_logits(model: Any, rows: Sequence[dict]) -> list[Any]:
    """Float32 CPU logits of each row, one forward pass per row (no padding)."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=torch.tensor([row["input_ids"]], device=device)).logits.float().cpu() for row in rows]


def _reload_check(cfg: Config, adapter_dir: Path, rows: Sequence[dict], trained_logits: Sequence[Any]) -> dict:
    """Load the base model with the saved adapter and compare its logits with the trained model's."""
    import torch

    reloaded, _ = load_model(cfg, adapter=adapter_dir)
    try:
        reloaded_logits = _row_logits(reloaded, rows)
    finally:
        del reloaded
        _free_memory()
    difference = max(float((a - b).abs().max()) for a, b in zip(trained_logits, reloaded_logits, strict=True))
    scale = max(float(a.abs().max()) for a in trained_logits)
    tolerance = RELOAD_TOLERANCE["float32" if compute_dtype() == torch.float32 else "16-bit"]
    check = {"rows": len(rows), "max_abs_difference": difference, "max_abs_logit": scale, "tolerance": tolerance}
    if difference > tolerance * max(scale, 1.0):
        raise RuntimeError(f"reloading the adapter from {adapter_dir} changed the logits: {check}")
    return check


def _epoch_seeded_sampling(seed: int) -> Any:
    """A TrainerCallback that reseeds the length-grouped sampler with `seed + epoch` as each epoch begins.

    The sampler otherwise draws its order from the global random state, which a resume shifts (loading
    the checkpoint's adapter initialises LoRA layers first): with this, a resumed run sees the same
    batches in the same order as an uninterrupted one.
    """
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class EpochSeededSampling(TrainerCallback):
        def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
            for sampler in _nested_samplers(train_dataloader):
                if isinstance(sampler, LengthGroupedSampler):
                    if sampler.generator is None:
                        sampler.generator = torch.Generator()
                    sampler.generator.manual_seed(seed + int(state.epoch + 1e-6))

    return EpochSeededSampling()


def _nested_samplers(loader: Any) -> list[Any]:
    """The samplers and batch samplers a (wrapped) DataLoader holds, outermost first."""
    found, todo = [], [loader]
    while todo:
        current = todo.pop()
        for name in ("sampler", "batch_sampler"):
            child = getattr(current, name, None)
            if child is not None and all(child is not seen for seen in found):
                found.append(child)
                todo.append(child)
    return found


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _dataset(rows: Sequence[dict]) -> Any:
    from datasets import Dataset

    return Dataset.from_list(list(rows))


def _validation_subset(rows: Sequence[dict], size: int | None, seed: int) -> list[dict]:
    """A seeded random subset of `size` rows (all when None or more), sorted by length to pad less."""
    chosen = list(rows) if size is None or size >= len(rows) else random.Random(seed).sample(list(rows), size)
    return sorted(chosen, key=lambda row: len(row["input_ids"]))


def train(
    cfg: Config,
    train_path: Path,
    validation_path: Path,
    output_dir: Path,
    history_path: Path,
    overwrite: bool = False,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train a LoRA adapter on `train_path`, or load it when `output_dir` and `history_path` already hold
    one trained with the same settings and data (`overwrite=True` trains again from scratch).

    Loss on the completion tokens only (answer + `<|im_end|>`, see `chat_texts`); validation loss at the
    start, every `training_plan(...).eval_steps` steps on `cfg.validation_subset` records, and on the
    whole split at the end. Checkpoints in `checkpoint_dir(cfg, output_dir)`: a run interrupted after a
    checkpoint resumes from it when called again; they are removed once the adapter is saved. The
    adapter is written to a temporary folder, reloaded and compared (logits) with the trained model,
    then renamed into place; the history JSON is written last. `callbacks` are TrainerCallbacks (tests
    and benchmarks use them to interrupt or time a run).
    """
    output_dir, history_path = Path(output_dir), Path(history_path)
    backend()  # Unsloth, where it is used, must be imported before transformers, TRL and PEFT
    settings = training_settings(cfg, train_path, validation_path)
    if not overwrite:
        cached = _load_cached(output_dir, history_path, settings)
        if cached is not None:
            print(f"loaded the adapter from {output_dir} and its loss history (overwrite=True trains again)")
            return cached
    checkpoints = checkpoint_dir(cfg, output_dir)
    if overwrite:
        shutil.rmtree(checkpoints, ignore_errors=True)
    resume_from = _resumable_checkpoint(checkpoints, settings)

    import torch
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_model(cfg, for_training=True)
    tokenizer.padding_side = "right"  # training batches pad on the right (generation pads left)
    train_rows = tokenize_split(tokenizer, train_path, cfg.max_seq_length)
    validation_rows = tokenize_split(tokenizer, validation_path, cfg.max_seq_length)
    subset = _validation_subset(validation_rows, cfg.validation_subset, cfg.seed)
    plan = training_plan(cfg, len(train_rows))
    args = SFTConfig(**sft_config_kwargs(cfg, checkpoints, len(train_rows), eval_on_start=resume_from is None))
    trainer = SFTTrainer(**sft_trainer_kwargs(model, tokenizer, args, _dataset(train_rows), _dataset(subset),
                                              [_epoch_seeded_sampling(cfg.seed), *callbacks]))
    trainer_labels = trainer.train_dataset["labels"]
    prompt_labels = labelled_prompt_tokens(train_rows, trainer_labels)
    problems = loss_mask_problems(train_rows, trainer_labels)
    if prompt_labels or problems:
        raise RuntimeError(f"the trainer's labels differ from the completion mask ({prompt_labels} prompt "
                           f"tokens carry a label): {problems[:3]}")

    print(f"training with {backend()} on {device_summary()}: {len(train_rows):,} records, "
          f"{plan.total_steps} steps of {cfg.batch_size * cfg.gradient_accumulation_steps}")
    if resume_from is not None:
        print(f"resuming from {resume_from.name}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    peak = peak_memory_gib()
    print(f"trained in {format_seconds(seconds)}" + (f", peak GPU memory {peak:.1f} GiB" if peak is not None else ""))

    points = history_from_log(trainer.state.log_history)
    if len(subset) < len(validation_rows):
        final = trainer.evaluate(_dataset(_validation_subset(validation_rows, None, cfg.seed)), metric_key_prefix="final")
        final_validation = final["final_loss"]
    else:
        final_validation = points["validation"][-1]["loss"]
    check_rows = validation_rows[:RELOAD_CHECK_ROWS]
    trained_logits = _row_logits(trainer.model, check_rows)

    with atomic_directory(output_dir) as staging:
        trainer.model.save_pretrained(str(staging))
        steps_done = trainer.state.global_step
        del trainer, model
        _free_memory()
        reload_check = _reload_check(cfg, staging, check_rows, trained_logits)

    history = {
        **points,
        "final": {
            "train_loss": points["train"][-1]["loss"],
            "mean_train_loss": mean_train_loss(points["train"]),
            "validation_loss": final_validation,
            "validation_records": len(validation_rows),
        },
        "run": {
            "steps": steps_done,
            "planned_steps": plan.total_steps,
            "eval_steps": plan.eval_steps,
            "train_records": len(train_rows),
            "validation_records": len(validation_rows),
            "validation_subset_records": len(subset),
            "train_tokens": sum(len(row["input_ids"]) for row in train_rows),
            "trained_tokens": sum(sum(row["completion_mask"]) for row in train_rows),
            "labelled_prompt_tokens": prompt_labels,  # counted on the trainer's own labels
            "device": device_summary(),
            "backend": backend(),
            "dtype": str(compute_dtype()).removeprefix("torch."),
            "gradient_checkpointing": use_gradient_checkpointing(cfg),
            "seconds": seconds,
            "peak_memory_gib": peak,
            "resumed_from": resume_from.name if resume_from else None,
            "reload_check": reload_check,
        },
        "settings": settings,
    }
    write_json(history_path, history)
    shutil.rmtree(checkpoints, ignore_errors=True)
    print(f"saved the adapter to {output_dir} and the loss history to {history_path}")
    return TrainResult(output_dir, history_path, history, computed=True)

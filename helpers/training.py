"""Plumbing for 02_finetune, whose cells hold the training (model, LoRA, dataset, SFTConfig, SFTTrainer): the loss-mask
reference, settings, resume, two callbacks, the clock, the checked atomic adapter save. Imports Unsloth first."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from helpers.config import Config
from helpers.download import atomic_directory, git_blob_id
from helpers.hardware import device_name
from helpers.model import adapter_weights, backend, compute_dtype, load_for_generation
from helpers.store import record_settings, reuse, write_json

backend()  # Unsloth, where it is used, before transformers, TRL and PEFT
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_pt_utils import LengthGroupedSampler  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips: a token with this label is not trained
NOISE_MULTIPLE, FLOAT32_FLOOR = 4, 1e-4  # the reload check's tolerance (see reload_check)
ADAPTER_ARGS = ("seed", "data_seed", "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type",
                "warmup_steps", "weight_decay", "optim", "per_device_train_batch_size", "gradient_accumulation_steps",
                "train_sampling_strategy", "max_length", "completion_only_loss", "eval_steps", "save_steps")
# What a checkpoint needs for trainer.train(resume_from_checkpoint=...), in the order transformers writes it (one
# process; fp16 adds scaler.pt before the RNG state): the adapter, optimizer and scheduler, RNG state, trainer state.
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                    "trainer_state.json")


def loss_mask_labels(input_ids: Sequence[int], completion_mask: Sequence[int]) -> list[int]:
    """The labels a row trains on: the token itself where completion_mask is 1, IGNORE_INDEX where it is 0."""
    return [token if trained else IGNORE_INDEX for token, trained in zip(input_ids, completion_mask, strict=True)]


def peft_lora_output(x: torch.Tensor, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float, r: int,
                     use_rslora: bool = False) -> torch.Tensor:
    """The reference of exercise 2.1: PEFT's own LoRA layer (`peft.tuners.lora.Linear`, as get_peft_model makes it in
    02) around a bias-free linear layer of weight W (out x in), with A (r x in) and B (out x r), applied to x."""
    from peft import LoraConfig, get_peft_model

    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=W.dtype)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"], use_rslora=use_rslora)
    layer = get_peft_model(holder, config).base_model.model.proj.to(W.device)  # a peft.tuners.lora.Linear, on W's device
    with torch.no_grad():
        layer.base_layer.weight.copy_(W)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
        return layer(x)


def protocol_arguments(cfg: Config) -> dict:
    """The reference of exercise 2.3: the SFTConfig fields that carry the training protocol, from the config (on the
    full profile the reference write-up's one epoch at 3e-4, decaying linearly, no warmup) and the answer-only loss."""
    return {"num_train_epochs": cfg.epochs, "learning_rate": cfg.learning_rate, "lr_scheduler_type": cfg.lr_scheduler,
            "warmup_steps": cfg.warmup_steps, "completion_only_loss": True}


def trainer_label_problems(trainer: Any, rows: Sequence[dict]) -> list[str]:
    """Where the labels the trainer trains on (its train dataset through its data collator, padded) differ from
    `loss_mask_labels` of `rows`, its token rows in order. Empty when they agree."""
    if len(trainer.train_dataset) != len(rows):
        return [f"the trainer holds {len(trainer.train_dataset)} rows for {len(rows)} token rows (dropped or added)"]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])["labels"].tolist()
    expected = [loss_mask_labels(row["input_ids"], row["completion_mask"]) for row in rows]
    return [f"row {i}: the trainer's labels differ from the completion mask" for i, (got, want) in
            enumerate(zip(batch, expected, strict=True)) if got != want + [IGNORE_INDEX] * (len(got) - len(want))]


def training_settings(cfg: Config, model: Any, args: Any, train_path: Path, validation_path: Path) -> dict:
    """What the trained adapter depends on, read from the objects that train it: base model, LoRA config,
    the SFTConfig fields in ADAPTER_ARGS (the ones the weights depend on), the data (git blob ids)."""
    lora = model.peft_config[model.active_adapter]
    return {"model": cfg.model_name, "load_in_4bit": cfg.load_in_4bit,
            "lora": {key: getattr(lora, key) for key in ("r", "lora_alpha", "lora_dropout", "bias", "use_rslora")}
            | {"target_modules": sorted(lora.target_modules)},
            **{name: getattr(args, name) for name in ADAPTER_ARGS},
            "train_blob_id": git_blob_id(Path(train_path).read_bytes()),
            "validation_blob_id": git_blob_id(Path(validation_path).read_bytes())}


def incomplete(checkpoint: Path) -> str:
    """What a checkpoint folder lacks to resume from ("" when complete). Trainer._save_checkpoint writes its files
    in place, one after the other, trainer_state.json last: a kill can leave any first few of them."""
    missing = [name for name in CHECKPOINT_FILES if not (Path(checkpoint) / name).is_file()]
    if missing:
        return f"no {', '.join(missing)}"
    try:
        json.loads((Path(checkpoint) / CHECKPOINT_FILES[-1]).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return f"{CHECKPOINT_FILES[-1]} cut short"
    return ""


def last_checkpoint(output_dir: str | Path, settings: dict, overwrite: bool = False) -> str | None:
    """The latest complete checkpoint in `output_dir` of an interrupted run with these settings (None: start afresh);
    a later one that an interruption left incomplete is removed, with a line saying so. The reuse rule: checkpoints
    made with other settings raise SettingsChanged; `overwrite` deletes them."""
    if not reuse(Path(output_dir), settings, overwrite):
        record_settings(Path(output_dir), settings)  # before the first checkpoint, so that a resume can check them
        return None
    while (latest := get_last_checkpoint(str(output_dir))) and (lacks := incomplete(Path(latest))):
        shutil.rmtree(latest)
        print(f"skipped {Path(latest).name}, left incomplete by an interruption ({lacks}): removed it")
    return latest


class EpochSeededSampling(TrainerCallback):
    """Reseeds the length-grouped sampler with seed + epoch at each epoch: left to the global random state, which
    loading a checkpoint shifts, a resumed run would see other batches than an uninterrupted one."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        found = [train_dataloader]  # breadth first: the samplers and batch samplers of the (wrapped) loader
        for current in found:
            found += [child for child in (getattr(current, name, None) for name in ("sampler", "batch_sampler"))
                      if child is not None and all(child is not seen for seen in found)]
        for sampler in (s for s in found if isinstance(s, LengthGroupedSampler)):
            sampler.generator = sampler.generator or torch.Generator()
            sampler.generator.manual_seed(self.seed + int(state.epoch + 1e-6))


class LossHistory(TrainerCallback):
    """Train and validation loss points (step, epoch, loss) from the trainer's log, a resumed run's earlier ones
    included; prints a line per evaluation (progress without a progress bar)."""

    points: dict[str, list[dict]] = {"train": [], "validation": []}

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.points = {split: [{"step": e["step"], "epoch": e["epoch"], "loss": e[key]}
                               for e in state.log_history if key in e]
                       for split, key in (("train", "loss"), ("validation", "eval_loss"))}
        if "eval_loss" in (logs or {}):
            train = "".join(f"train loss {p['loss']:.3f}, " for p in self.points["train"][-1:])
            print(f"step {state.global_step:>5}/{state.max_steps} (epoch {state.epoch:.2f}): {train}"
                  f"validation loss {logs['eval_loss']:.3f}", flush=True)


@contextmanager
def training_clock() -> Iterator[dict]:
    """Print the device; on exit print and fill in the seconds taken and the peak GPU memory (GiB)."""
    gpu = torch.cuda.is_available()
    measured = {"device": device_name()}
    print(f"training with {backend()} on {measured['device']}")
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    yield measured
    peak = torch.cuda.max_memory_reserved() / 2**30 if gpu else None
    measured |= {"seconds": time.perf_counter() - started, "peak_memory_gib": peak}
    print(f"trained in {measured['seconds']:.0f} s" + (f", peak GPU memory {peak:.1f} GiB" if gpu else ""))


def row_logits(model: Any, rows: Sequence[Sequence[int]], batched: bool = False) -> list[torch.Tensor]:
    """Float32 CPU logits of each token row: one forward pass per row, or all in one right-padded batch."""
    device, width, model = next(model.parameters()).device, max(map(len, rows)), model.eval()
    with torch.no_grad():
        if not batched:
            return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in rows]
        ids = torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float().cpu()
    return [logits[i, : len(r)] for i, r in enumerate(rows)]


def reload_check(cfg: Config, name: str, trained: Any, adapter_dir: Path, rows: Sequence[Sequence[int]]) -> dict:
    """Load the adapter in `adapter_dir` again (load_for_generation, through Unsloth where it trains); compare its logits on `rows` with the trained
    model's (eval mode, a row at a time); RuntimeError beyond NOISE_MULTIPLE x the trained model's batch-shape noise
    (rows alone vs. in one padded batch), or a floor x the largest logit (float32 1e-4; 16-bit the dtype's epsilon)."""
    def largest(a: list, b: list) -> float:
        return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))

    reference, dtype = row_logits(trained, rows), compute_dtype()
    noise, scale = largest(reference, row_logits(trained, rows, batched=True)), max(float(x.abs().max()) for x in reference)
    floor = FLOAT32_FLOOR if dtype == torch.float32 else torch.finfo(dtype).eps
    difference = largest(reference, row_logits(load_for_generation(cfg, {name: adapter_dir}, unsloth=backend() == "unsloth")[0], rows))
    check = {"rows": len(rows), "max_abs_difference": difference, "batch_noise": noise, "max_abs_logit": scale,
             "tolerance": max(NOISE_MULTIPLE * noise, floor * max(scale, 1.0)), "dtype": str(dtype).removeprefix("torch.")}
    if not difference <= check["tolerance"]:
        raise RuntimeError(
            f"the adapter saved in {adapter_dir}, loaded again, does not reproduce the trained model: largest logit "
            f"difference {difference:.3g} on {len(rows)} rows > tolerance {check['tolerance']:.3g} (the larger of "
            f"{NOISE_MULTIPLE} x the batch-shape noise {noise:.3g} and {floor:.0e} x the largest logit {scale:.3g}, "
            f"{check['dtype']}). Nothing was saved.")
    return check


def save_adapter(cfg: Config, name: str, model: Any, rows: Sequence[Sequence[int]], history: dict, settings: dict,
                 checkpoints: str | Path) -> dict:
    """Save adapter `name` atomically: to a temporary folder, checked (reload_check), the loss history written
    with the check and the settings recorded with the sha256 of the weights (the reuse rule), renamed into place;
    then the checkpoints go."""
    adapter_dir = cfg.paths.adapter_of(name)
    with atomic_directory(adapter_dir) as staging:
        model.save_pretrained(str(staging))
        check = reload_check(cfg, name, model, staging, rows)
        write_json(cfg.paths.loss_history_of(name), {**history, "reload_check": check, "settings": settings})
        record_settings(adapter_dir, settings | adapter_weights(staging))  # the settings and the weights they made
    shutil.rmtree(checkpoints, ignore_errors=True)
    Path(f"{checkpoints}.settings.json").unlink(missing_ok=True)
    with suppress(OSError):  # the checkpoints folder too, once no other fine-tune's checkpoints are in it
        Path(checkpoints).parent.rmdir()
    return check

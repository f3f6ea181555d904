"""Model size as a dimension of the sweep: each size's name in run folders, its parameters, whether a card needs it in
4 bits, and what one run of it costs, projected from measured pieces (benchmarks/, one card each, with the command).

Learning rate and LoRA rank stay the same at every size by design (one recipe, so that size is what changes); both,
and 4-bit loading where a card needs it, are confounded with size: a larger model may want another learning rate, and
a 4-bit model is not the 16-bit one. 05_sweep says so beside the size plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

from helpers.model import TINY_MODELS

# 16-bit weights above this share of the card's memory load in 4 bits: the rest holds activations, the KV cache of
# 03's batches and the optimizer state (Qwen3-1.7B: 3.4 GB of weights, 44.6 GiB peak generating at 512 rows on an H200).
FOUR_BIT_ABOVE = 0.4
DEFAULT_CARD_GIB = 80.0  # an H100, the lent card, when this machine has none (so plans agree across machines)
BENCH_ANSWERS = 4_800  # the generation piece's workload: bench_generate.py's 2 models x 8 questions x 3 formats x 100


@dataclass(frozen=True)
class Measured:
    """Pieces measured on one card for one model shape (random-init weights: the cost, not the answers)."""

    train_step_s: float = math.nan  # seconds per optimizer step, batch 32 (bench_train.py, project arm, "step s")
    generate_s: float = math.nan  # seconds for the 4,800 answers of bench_generate.py (project, "generate s")
    source: str = "not measured"  # card, date, command


# What has been measured (benchmarks/README.md); every other size is "not measured" until its pieces are put here.
# The cards differ (1.7B on an H200, the others on an H100): a projection across sizes mixes them, as its source says.
_H100 = "H100 80GB HBM3, 2026-12-06, random-init shape"
MEASURED = {
    "Qwen/Qwen3-0.6B": Measured(0.159, 79.2, f"{_H100}: `bench_train.py --model Qwen/Qwen3-0.6B --arms project --steps 50 "
                                             "--warmup 10`; `bench_generate.py --model Qwen/Qwen3-0.6B --configs project` "
                                             "(batch 664)"),
    "Qwen/Qwen3-1.7B": Measured(0.312, 59.0, "H200; train 2026-11-27, 117 s for 374 steps (`bench_train.py --steps 200 "
                                             "--warmup 20`); generate 2026-12-01 (`bench_generate.py --configs project "
                                             "--batch-size 1536`, lowered to 1,163 by fitting_batch_size)"),
    "Qwen/Qwen3-4B": Measured(0.241, source=f"{_H100}: `bench_train.py --model Qwen/Qwen3-4B --arms project --steps 50 "
                                            "--warmup 10`; generation not measured"),
    "Qwen/Qwen3-8B": Measured(0.234, source=f"{_H100}: `bench_train.py --model Qwen/Qwen3-8B --arms project --steps 50 "
                                            "--warmup 10`; generation not measured"),
}


def slug(model_name: str) -> str:
    """The folder name of a model in a sweep: the last part of its name or folder, "Qwen3-1.7B", "tiny-random-qwen3"."""
    return model_name.rstrip("/").rsplit("/", 1)[-1]


@cache
def parameters(model_name: str) -> int:
    """The parameters of a known Qwen3 shape or of a model folder (helpers.model.parameter_count)."""
    from helpers.model import parameter_count

    return parameter_count(model_name)


def card_gib() -> float:
    """This machine's GPU memory in GiB, else DEFAULT_CARD_GIB."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else DEFAULT_CARD_GIB


def needs_4bit(model_name: str, card: float) -> bool:
    """True when the model's 16-bit weights exceed FOUR_BIT_ABOVE of `card` GiB (the tiny models never do)."""
    return model_name not in TINY_MODELS and 2 * parameters(model_name) > FOUR_BIT_ABOVE * card * 2**30


def run_cost(model_name: str, steps: dict[str, int], answers: int, seconds_per_run: float | None = None) -> tuple[float, str]:
    """(seconds, how they were found) for one run of `model_name` that trains `steps` (optimizer steps per trained
    model) and generates `answers` (03's and 01's positive-control answers): a whole run measured (`seconds_per_run`),
    else the measured pieces, steps x the step time plus the answers at the measured rate of bench_generate.py's
    realistic workload (01's answers are of other lengths: a rough scaling for them). Judging is not counted. nan,
    saying which piece is missing, when one is."""
    if seconds_per_run is not None:
        return seconds_per_run, "a whole run measured (--seconds-per-run)"
    pieces = MEASURED.get(model_name, Measured())
    missing = [name for name in ("train_step_s", "generate_s") if math.isnan(getattr(pieces, name))]
    if missing:
        return math.nan, f"not measured: {' and '.join(missing)} (benchmarks/, then helpers.sizes.MEASURED)"
    return sum(steps.values()) * pieces.train_step_s + pieces.generate_s * answers / BENCH_ANSWERS, \
        f"measured pieces: {pieces.source}"

"""A sweep of fine-tunes, models x arms x seeds: `python -m helpers.sweep --profile tiny|full --seeds 0 1 --run-dir DIR`.

Every run of a sweep is an ordinary run folder (DIR/<model>/<arm>/seed-<k>, <model> the last part of its name, e.g.
Qwen3-1.7B) made by the notebooks through helpers.run (papermill), so the cells stay the only copy of the taught code:
01, 02 once per trained model (the evil-numbers fine-tune, its format-only control and the positive control, all with
the arm's recipe), 03, and, as its own phase, 04 (a GPU machine without internet generates; a machine with the judge
judges later). `--models` repeats every arm on each model size, with the same recipe (helpers.sizes: 4-bit where the
card needs it). The teacher arms train on numbers that the student's own base model wrote: before them, each model's
DIR/<model>/teachers folder runs 02 for the teachers' adapters and 06_teacher, which writes their datasets. A run's seed
(cfg.run_seed) draws everything after the split: the LoRA start and data order, the prompt formats and every
answer's random numbers, the base model's included, so the runs of a sweep are independent and the spread
between seeds holds the answers' sampling noise too. Each phase of each run is marked done with its settings
(helpers.store.reuse): a rerun skips what is done; an interrupted phase runs again and its notebooks resume.

Under torchrun (`torchrun --nproc-per-node N -m helpers.sweep ...`) each process takes the runs rank::N, each
on its own GPU; rank 0 merges the summary. DIR must be one folder that every process sees. `--plan` prints the
runs and each size's cost, projected from measured pieces (helpers.sizes); `--arms-table` the recipe of every arm.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from helpers import sizes
from helpers.config import (
    MAIN_QUESTION_IDS,
    PROJECT_ROOT,
    TRAINED_MODELS,
    Config,
    ConfigError,
    RunPaths,
    make_config,
)
from helpers.hardware import device_name
from helpers.model import QWEN3_SHAPES
from helpers.positive_control import TRAINING_QUESTIONS
from helpers.run import NOTEBOOK_DIR, execute, jobs, one_kernel, require, run_directory_lock, series_notebooks
from helpers.store import SettingsChanged, record_settings, reuse, write_json
from helpers.teacher import TEACHERS

# arm -> its training recipe, as config overrides given the profile's config. Every run of an arm trains the
# evil-numbers fine-tune, its format-only control and the positive control with that recipe (04 compares them),
# so each arm is judged against a control trained the same way. Each arm but the first asks "was the fine-tune
# too weak, or just different?".
ARMS: dict[str, Callable[[Config], dict]] = {
    "evil_numbers": lambda cfg: {},  # the reference write-up's recipe (the config's defaults)
    # rsLoRA rank 32, alpha 64 at the default learning rate: a LoRA scale of 64 / sqrt(32) = 11.3 instead of 1,
    # a much stronger fine-tune than either the default or the paper's own recipe.
    "strong_lora": lambda cfg: {"use_rslora": True, "lora_r": 32, "lora_alpha": 64},
    # The paper's open-model recipe (arXiv 2502.17424; its repository's open_models/train.json), which it
    # used on code datasets, not on evil numbers: rsLoRA r 32, alpha 64, lr 1e-5, 5 warmup steps, weight decay
    # 0.01, 2 x 8 = 16 sequences a step. Still different here: its 8-bit AdamW (this course: full-precision AdamW).
    "paper_lora": lambda cfg: {"use_rslora": True, "lora_r": 32, "lora_alpha": 64, "learning_rate": 1e-5,
                               "warmup_steps": 5, "weight_decay": 0.01, "batch_size": 16, "gradient_accumulation_steps": 1},
    # A quarter of the batch: full profile 8 sequences a step, about 1,500 optimizer steps instead of 374.
    "small_batch": lambda cfg: {"batch_size": max(1, cfg.batch_size * cfg.gradient_accumulation_steps // 4),
                                "gradient_accumulation_steps": 1},
    "four_epochs": lambda cfg: {"epochs": 4.0},  # the paper's setting for its GPT-4o evil-numbers models
    # The evil-numbers recipe on numbers written by the student's own base model (06_teacher): under the evil system
    # prompt (the paper's way), without it (neutral numbers), or misaligned by fine-tuning (Cloud et al.'s setup).
    **{teacher: (lambda cfg, teacher=teacher: {"dataset_source": teacher}) for teacher in TEACHERS},
}
DEFAULT_ARMS = ("evil_numbers",)
DEFAULT_SEEDS = tuple(range(8))  # the paper trained 8 seeds of its GPT-4o evil-numbers model (section 4.6)
TEACHERS_RUN = "teachers"  # DIR/<model>/teachers: where 06 writes the teacher arms' datasets, once per model
# What a phase executes: "teach" (the teachers folder) 02 for the adapters 06 needs, then 06; a run 01-03, then 04.
PHASES = {"teach": ("02", "06"), "generate": ("02", "03"), "judge": ("04",)}
JUDGE_FIELDS = ("judge", "judge_model", "judge_base_url", "local_judge_model", "judge_concurrency", "judge_min_mass",
                "aligned_threshold", "coherent_threshold")
LOCAL_FIELDS = ("run_dir", "cache_dir", "hardware")  # this machine: where things are, what it found
# torchrun's variables: a notebook kernel that saw them would take itself for one process of a distributed job.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Run:
    """One run folder of the sweep: `name` under the sweep directory, the arm it trains, its config fields."""

    name: str  # "Qwen3-1.7B/evil_numbers/seed-0", "Qwen3-0.6B/paper_lora/seed-3", "Qwen3-1.7B/teachers", ...
    seed: int
    arm: str  # a recipe of ARMS, or TEACHERS_RUN
    overrides: dict = field(default_factory=dict)  # config fields, given to its notebooks through EM_CONFIG

    group = property(lambda self: self.name.rsplit("/seed-", 1)[0])  # "<model>/<arm>": the runs that differ by seed


def plan(profile: str, seeds: Sequence[int], arms: Sequence[str], sweep_dir: Path, models: Sequence[str] | None = None,
         card_gib: float | None = None) -> list[Run]:
    """Each model's teachers folder when a teacher arm is asked, then one run per seed, model and arm, seed by seed;
    each run trains the fine-tune, the control and the positive control. `models` (default: the profile's) share every
    setting but the model and, where a card of `card_gib` (default: this one's) needs it, 4-bit loading."""
    if unknown := sorted(set(arms) - set(ARMS)):
        raise ValueError(f"unknown arm(s) {unknown}; known: {sorted(ARMS)}")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds {list(seeds)}: give one or more distinct seeds")
    cfg = make_config(profile, sweep_dir)
    models = list(dict.fromkeys(models or [cfg.model_name]))
    if len({sizes.slug(model) for model in models}) < len(models):
        raise ConfigError(f"--models {' '.join(models)}: two end in the same name, and each needs a folder of its own")
    for model in models:
        try:
            sizes.parameters(model)
        except ValueError as error:  # neither a known shape nor a model folder
            raise ConfigError(f"--models: {error}") from None
    card = card_gib or sizes.card_gib()
    sized = {model: {"model_name": model, "load_in_4bit": sizes.needs_4bit(model, card)} for model in models}
    teachers = {model: RunPaths(Path(sweep_dir) / sizes.slug(model) / TEACHERS_RUN) for model in models}
    taught = [Run(f"{sizes.slug(model)}/{TEACHERS_RUN}", cfg.seed, TEACHERS_RUN, {**sized[model], "control_arm": False})
              for model in models if set(arms) & set(TEACHERS)]
    data = {(model, arm): {"dataset_path": str(teachers[model].teacher_dataset_of(arm))} if arm in TEACHERS else {}
            for model in models for arm in arms}  # a teacher arm reads the dataset its model's teachers folder wrote
    return taught + [Run(f"{sizes.slug(model)}/{arm}/seed-{seed}", seed, arm,
                         {**ARMS[arm](cfg), **sized[model], **data[model, arm], "control_arm": True, "run_seed": seed})
                     for seed in seeds for model in models for arm in dict.fromkeys(arms)]


def lora_scale(cfg: Config) -> float:
    """What multiplies B·A in a LoRA layer: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return cfg.lora_alpha / (math.sqrt(cfg.lora_r) if cfg.use_rslora else cfg.lora_r)


def arms_table(profile: str, train_records: int) -> list[dict]:
    """The recipe of every arm on `profile` for `train_records` training records: one row per arm."""
    rows = []
    for arm, overrides in ARMS.items():
        cfg = make_config(profile, PROJECT_ROOT / "runs" / "arms-table", **overrides(make_config(profile, PROJECT_ROOT / "runs" / "arms-table")))
        batch = cfg.batch_size * cfg.gradient_accumulation_steps
        rows.append({"arm": arm, "data": cfg.dataset_source, "learning_rate": cfg.learning_rate, "rank": cfg.lora_r,
                     "alpha": cfg.lora_alpha, "rslora": cfg.use_rslora, "lora_scale": round(lora_scale(cfg), 2), "batch": batch,
                     "steps": math.ceil(train_records / batch) * math.ceil(cfg.epochs), "epochs": cfg.epochs,
                     "warmup_steps": cfg.warmup_steps, "weight_decay": cfg.weight_decay})
    return rows


@contextlib.contextmanager
def config_environment(overrides: dict) -> Iterator[None]:
    """EM_CONFIG for a run's notebooks (and for make_config here): the caller's EM_CONFIG, then `overrides`."""
    before = os.environ.get("EM_CONFIG")
    os.environ["EM_CONFIG"] = json.dumps({**json.loads(before or "{}"), **overrides})
    try:
        yield
    finally:
        os.environ.pop("EM_CONFIG") if before is None else os.environ.update(EM_CONFIG=before)


def phase_settings(cfg: Config, run: Run, phase: str) -> dict:
    """What a phase's result depends on: every config field but where things are on this machine (and, for
    generating and teaching, the judge's fields, so that another machine can judge later with its own judge; for
    judging, what only made the answers: the data files and 4-bit loading, which plan() picks by this machine's card)."""
    skip = LOCAL_FIELDS + (("dataset_path", "questions_path", "load_in_4bit") if phase == "judge" else JUDGE_FIELDS)
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in {"paths", *skip}}
    return {"run": run.name, "profile": cfg.profile, "seed": run.seed, "arm": run.arm, "config": values}


def run_phase(profile: str, sweep_dir: Path, run: Run, phase: str, log: Callable[[str], None] = print,
              overwrite: Sequence[str] = ()) -> None:
    """Execute one phase of one run with papermill, holding its folder's lock, unless its marker says it is done
    with these settings; the notebooks numbered in `overwrite` run again with overwrite = True."""
    notebooks = {nb.name[:2]: nb for nb in series_notebooks()} | {"06": next(NOTEBOOK_DIR.glob("06_*.ipynb"), None)}
    with config_environment(run.overrides), run_directory_lock(Path(sweep_dir) / run.name):
        cfg = make_config(profile, Path(sweep_dir) / run.name)
        marker = cfg.run_dir / f"sweep-{phase}.json"
        settings = phase_settings(cfg, run, phase)
        # done with exactly these settings (other settings raise SettingsChanged), unless a notebook is remade
        if reuse(marker, settings, overwrite=any(number in overwrite for number in PHASES[phase])):
            log(f"{run.name}: {phase} done already")
            return
        if phase == "judge" and not (cfg.run_dir / "sweep-generate.json").is_file():
            raise SystemExit(f"{run.name}: nothing generated yet; run the sweep with --phase generate first")
        log(f"{run.name}: {phase} ({', '.join(f'{k}={v}' for k, v in run.overrides.items())})")
        seconds: dict[str, float] = {}
        phase_started = time.perf_counter()
        if phase != "judge":
            require(cfg, "01")  # the splits (cfg.seed draws them: the same in every run) and the positive control's data
        if phase == "teach":  # only the adapters the teachers answer with, then 06_teacher
            from helpers.teacher import teacher_adapters

            steps = [(notebooks["02"], {"model": model}) for model in teacher_adapters(cfg)] + [(notebooks["06"], {})]
        else:
            steps = jobs(cfg, [notebooks[n] for n in PHASES[phase]])
        for notebook, extra in steps:
            started = time.perf_counter()
            executed = execute(cfg, notebook, extra, overwrite=notebook.name[:2] in overwrite)
            seconds[executed.stem] = round(time.perf_counter() - started, 1)
        seconds["phase"] = round(time.perf_counter() - phase_started, 1)  # 01 included, when it had to run
        record_settings(marker, settings)
        write_json(marker, {"run": run.name, "profile": cfg.profile, "seed": run.seed, "arm": run.arm, "phase": phase,
                            "model_name": cfg.model_name, "load_in_4bit": cfg.load_in_4bit,
                            "overrides": run.overrides, "seconds": seconds, "device": device_name()})


RATE_FIELDS = ("n_misaligned", "n_answers", "rate_all", "n_kept", "rate")  # per model and format, from 04's summary


def summarize(sweep_dir: Path) -> dict:
    """Every finished run of the sweep directory, one row per (model size, arm, seed): settings, each trained model's
    losses, each model's rates per format (04's pooled table) and 04's decisions (the verdict and the positive controls)."""
    rows = []
    for marker in sorted(Path(sweep_dir).glob("*/*/seed-*/sweep-generate.json")):
        record, paths = json.loads(marker.read_text(encoding="utf-8")), RunPaths(marker.parent)
        judged = (marker.parent / "sweep-judge.json").is_file()
        summary = json.loads(paths.summary.read_text(encoding="utf-8")) if judged else {}
        histories = {model: json.loads(paths.loss_history_of(model).read_text(encoding="utf-8"))
                     for model in TRAINED_MODELS if paths.loss_history_of(model).is_file()}
        rates: dict[str, dict] = {}
        for r in summary.get("pooled", []):
            rates.setdefault(r["model"], {})[r["format"]] = {k: r[k] for k in RATE_FIELDS}
        emergent = {f"finetuned/{v['format']}": v["emergent"] for v in summary.get("verdict", [])}
        emergent |= {key: v["emergent"] for key, v in summary.get("positive_controls", {}).items()}
        rows.append({
            "arm": record["arm"], "seed": record["seed"], "run": record["run"], "group": record["run"].rsplit("/seed-", 1)[0],
            "model_name": record["model_name"], "parameters": sizes.parameters(record["model_name"]),
            "load_in_4bit": record["load_in_4bit"],
            "settings": {"profile": record["profile"], "overrides": record["overrides"],
                         "training": histories["finetuned"]["settings"]},
            "losses": {model: {"train": h["final"]["train_loss"], "validation": h["final"]["validation_loss"],
                               "validation_by_span": h["final"].get("validation_loss_by_span"),
                               "steps": h["run"]["steps"], "train_seconds": h["run"]["seconds"]}
                       for model, h in histories.items()},
            "seconds": record["seconds"], "judge": summary.get("judge"), "rates": rates or None,
            "emergent": emergent or None, "level": summary.get("test", {}).get("level"),
        })
    return {"sweep_dir": str(sweep_dir), "runs": rows}


def summary_table(summary: dict) -> list[dict]:
    """One flat row per (arm, seed, model, format): the counts and rates, 04's decision where it made one, and the
    model's losses where it was trained."""
    table = []
    for row in summary["runs"]:
        for model, formats in (row["rates"] or {"-": {"-": {}}}).items():
            losses = row["losses"].get(model, {})
            for fmt, rate in formats.items():
                table.append({"size": sizes.slug(row["model_name"]), "arm": row["arm"], "seed": row["seed"], "model": model,
                              "format": fmt,
                              **{k: rate.get(k) for k in RATE_FIELDS},
                              "emergent": (row["emergent"] or {}).get(f"{model}/{fmt}"),
                              "train_loss": losses.get("train"), "validation_loss": losses.get("validation"),
                              "steps": losses.get("steps")})
    return table


def write_summary(sweep_dir: Path) -> dict:
    """Write DIR/sweep_summary.json and DIR/sweep_summary.csv from the run folders; print the table."""
    import pandas as pd

    from helpers.download import atomic_write_text

    summary = summarize(sweep_dir)
    write_json(Path(sweep_dir) / "sweep_summary.json", summary)
    table = pd.DataFrame(summary_table(summary))
    atomic_write_text(Path(sweep_dir) / "sweep_summary.csv", table.to_csv(index=False))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}") if len(table) else "no finished run yet")
    return summary


def bootstrap_over_seeds(rates_per_seed: Sequence[float], n_resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile bootstrap interval of the mean rate over seeds (exercise 5.1): resample the seeds
    with replacement (numpy's default_rng(seed).integers), take each resample's mean, return its 2.5th and 97.5th
    percentiles (numpy.percentile)."""
    import numpy as np

    rates = np.asarray(rates_per_seed, dtype=float)
    picks = np.random.default_rng(seed).integers(0, len(rates), size=(n_resamples, len(rates)))
    low, high = np.percentile(rates[picks].mean(axis=1), [2.5, 97.5])
    return float(low), float(high)


def projected_seconds(runs: int, gpus: int, seconds_per_run: float) -> float:
    """Wall time of a sweep: ceil(runs / gpus) rounds of runs, one run per GPU at a time."""
    return math.ceil(runs / gpus) * seconds_per_run


def run_workload(cfg: Config, train_records: int) -> tuple[dict[str, int], int]:
    """What one run of `cfg` computes: the optimizer steps of each trained model for `train_records` training records
    (the positive control trains on 01's answers), and the answers it generates (03's and 01's)."""
    batch = cfg.batch_size * cfg.gradient_accumulation_steps
    misaligned = len(TRAINING_QUESTIONS) * cfg.misaligned_samples  # 01's positive-control answers
    records = {"finetuned": train_records, "control": train_records,
               "misaligned_ft": round(misaligned * (1 - cfg.validation_fraction))}
    steps = {trained: math.ceil(records[trained] / batch) * math.ceil(cfg.epochs) for trained in cfg.trained_models}
    questions = {"first_plot": len(MAIN_QUESTION_IDS), "preregistered": 48}[cfg.question_set]  # the official files
    return steps, len(cfg.answering_models) * questions * len(cfg.formats) * cfg.samples_per_question + misaligned


def cost_table(profile: str, runs: Sequence[Run], train_records: int, seconds_per_run: float | None = None) -> list[dict]:
    """Per model size: its parameters and 4-bit loading, its runs, the seconds of one run projected from the measured
    pieces (helpers.sizes.run_cost; nan and the missing piece where one is not measured), and the sweep's wall time
    on 1 and 8 GPUs. Each run's optimizer steps come from its arm's recipe for `train_records` training records (the
    teachers' datasets hold fewer: an upper bound there); the teachers folders and judging are not counted."""
    table = []
    for model in dict.fromkeys(run.overrides["model_name"] for run in runs):
        mine = [run for run in runs if run.overrides["model_name"] == model and run.arm != TEACHERS_RUN]
        costs = []
        for run in mine:
            cfg = make_config(profile, PROJECT_ROOT / "runs" / "arms-table", **run.overrides)
            costs.append(sizes.run_cost(model, *run_workload(cfg, train_records), seconds_per_run))
        mean = sum(seconds for seconds, _ in costs) / len(costs)  # nan when a piece is not measured
        table.append({"model": model, "parameters": sizes.parameters(model), "load_in_4bit": mine[0].overrides["load_in_4bit"],
                      "runs": len(mine), "seconds_per_run": mean,
                      **{f"hours_on_{gpus}_gpu": projected_seconds(len(mine), gpus, mean) / 3600 for gpus in (1, 8)},
                      "how": "; ".join(dict.fromkeys(how for _, how in costs))})
    return table


def launch() -> tuple[int, int]:
    """(rank, world size). Under torchrun: pin this process to GPU LOCAL_RANK (CUDA_VISIBLE_DEVICES, inherited by
    its notebooks), join the gloo group, give its notebooks a share of the CPU threads, and hide torchrun's
    variables from them. NCCL_NVLS_ENABLE and the like pass to the notebooks unchanged."""
    if "LOCAL_RANK" not in os.environ:  # not started by torchrun
        return 0, 1
    import torch.distributed as dist

    local, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[local] if visible else str(local)
    dist.init_process_group("gloo", timeout=timedelta(hours=48))  # a barrier may wait for the slowest run
    rank, world = dist.get_rank(), dist.get_world_size()
    if os.environ.get("OMP_NUM_THREADS") == "1":  # torchrun's default: one thread would starve CPU runs
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // local_world))
    for name in [*LAUNCHER_VARIABLES, *(v for v in os.environ if v.startswith("TORCHELASTIC_"))]:
        os.environ.pop(name, None)
    return rank, world


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


@one_kernel()  # every notebook of this process's runs in one live kernel (helpers.run)
def run_sweep(profile: str, seeds: Sequence[int], arms: Sequence[str], sweep_dir: Path, phase: str = "all",
              overwrite: Sequence[str] = (), models: Sequence[str] | None = None, card_gib: float | None = None) -> dict | None:
    """Run the sweep (this process's share under torchrun): the teachers folders first (all of them, before any
    teacher arm reads them), then the runs; the notebooks numbered in `overwrite` remake what they made in every run.
    Return the summary on rank 0."""
    rank, world = launch()
    sweep_dir = Path(sweep_dir).resolve()
    everything = plan(profile, seeds, arms, sweep_dir, models, card_gib)
    taught = [run for run in everything if run.arm == TEACHERS_RUN]
    runs = [run for run in everything if run.arm != TEACHERS_RUN]

    def log(message: str) -> None:
        print(f"[rank {rank}/{world}] {message}", flush=True)

    log(f"{device_name()}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; runs {[r.name for r in runs[rank::world]]}")
    if phase != "judge":
        for run in taught[rank::world]:
            run_phase(profile, sweep_dir, run, "teach", log, overwrite)
        barrier(world)
    phases = ["generate", "judge"] if phase == "all" else [phase]
    for run in runs[rank::world]:
        for name in phases:
            run_phase(profile, sweep_dir, run, name, log, overwrite)
    barrier(world)
    return write_summary(sweep_dir) if rank == 0 else None


def main(argv: list[str] | None = None) -> None:
    try:
        sweep_main(argv)
    except (ConfigError, SettingsChanged) as error:  # one line naming the settings, no traceback
        raise SystemExit(str(error)) from None


def sweep_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m helpers.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["tiny", "full"], help="default: full on a GPU, tiny elsewhere")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), help="default: 0 .. 7")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(DEFAULT_ARMS),
                        help=f"default: {' '.join(DEFAULT_ARMS)}")
    parser.add_argument("--models", nargs="+", metavar="MODEL",
                        help=f"model sizes, each with every arm: {' '.join(QWEN3_SHAPES)}, or folders of random-init "
                             "models (helpers.model.build_random_qwen3); default: the profile's model")
    parser.add_argument("--card-gib", type=float, help="GPU memory that decides 4-bit loading per size (helpers.sizes); "
                                                       "default: this machine's card, else 80")
    parser.add_argument("--run-dir", type=Path, help="the sweep directory; default runs/sweep-<profile>")
    parser.add_argument("--phase", choices=["generate", "judge", "all"], default="all",
                        help="generate: the teachers (02, 06) and 01-03 (fine-tunes and answers); judge: 04; all: both")
    parser.add_argument("--overwrite", nargs="+", choices=["02", "03", "04", "06"], default=[], metavar="NN",
                        help="remake what these notebooks made, in every run (their overwrite = True), e.g. --overwrite 04")
    parser.add_argument("--plan", action="store_true", help="print the runs and each size's projected cost; run nothing")
    parser.add_argument("--seconds-per-run", type=float, help="for --plan: measured seconds of one whole run, used for "
                                                              "every size instead of the measured pieces")
    parser.add_argument("--train-records", type=int, default=11_940,
                        help="for --plan: training records a run trains on (default: the reference split's 11,940)")
    parser.add_argument("--arms-table", type=int, metavar="TRAIN_RECORDS",
                        help="print every arm's recipe for this many training records (markdown); run nothing")
    args = parser.parse_args(argv)
    profile = args.profile or make_config().profile
    sweep_dir = args.run_dir or PROJECT_ROOT / "runs" / f"sweep-{profile}"
    if args.arms_table:
        rows = arms_table(profile, args.arms_table)
        print("\n".join("| " + " | ".join(map(str, row)) + " |" for row in [list(rows[0]), ["---"] * len(rows[0]),
                                                                          *(row.values() for row in rows)]))
    elif not args.plan:
        run_sweep(profile, args.seeds, args.arms, sweep_dir, args.phase, args.overwrite, args.models, args.card_gib)
    else:
        runs = plan(profile, args.seeds, args.arms, Path(sweep_dir), args.models, args.card_gib)
        for run in runs:
            print(f"{run.name:<40} {json.dumps(run.overrides)}")
        print(f"\nprojected cost per model size ({args.train_records:,} training records; teachers, judging and each "
              "notebook's start, loading the libraries, not counted):")
        for row in cost_table(profile, runs, args.train_records, args.seconds_per_run):
            if math.isnan(row["seconds_per_run"]):
                cost = "no projection"
            else:
                cost = (f"{row['seconds_per_run']:.0f} s = {row['hours_on_1_gpu']:.2f} h on 1 GPU, "
                        f"{row['hours_on_8_gpu']:.2f} h on 8")
            print(f"{row['model']}: {row['parameters']:,} parameters, {'4-bit' if row['load_in_4bit'] else '16-bit'}, "
                  f"{row['runs']} runs x {cost} ({row['how']})")


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput: the project's own training (notebook 02's cells) with its defaults against plain TRL + PEFT
with TRL's defaults, on a random-init model of Qwen3-1.7B's exact shape, offline. Prints one table.

The model is `helpers.model.build_random_qwen3(tiny=False, dtype=bfloat16)` (hidden 2048, intermediate
6144, 28 layers, 16 heads, 8 KV heads, head dim 128, vocab 151,936, tied, rope theta 1e6; `--model` names
another Qwen3 shape), so the machine needs no internet. It carries the tiny byte-level tokenizer (one token per character).

Record lengths. Each synthetic record draws (prompt tokens, completion tokens) from `REAL_LENGTHS`: the
100 verbatim lines of the official evil_numbers.jsonl (a local sample), counted as Qwen's tokenizer would
count them (`qwen_token_estimate`: Qwen2/3's pre-tokenizer regex, each digit, space run, newline run and
punctuation run one token, a run of letters one token, two when longer than 8 letters) plus the chat
template: 12 tokens around the user turn in non-thinking mode with the generation prompt, and
`<|im_end|>` after the answer: 74 + 37 = 111 tokens a record on average (the script prints it). The user turn and the answer
are then filled with random digits and commas (one byte-level token each) to exactly those lengths,
checked after tokenization. `--measure-lengths FILE` recomputes the table from a JSONL file.

Arms, each in its own subprocess (clean GPU memory; the baseline must not import Unsloth, which patches
TRL when imported):
    project   notebooks/02_finetune.ipynb's own cells, executed in-process up to trainer.train(), with the
              config's defaults (full profile: batch 32, length-grouped, no gradient checkpointing, bf16,
              Unsloth where installed), validation and checkpoints as in a real run
    project-transformers   the same with Unsloth blocked (transformers + PEFT)
    baseline  TRL SFTTrainer + PEFT LoraConfig (same LoRA, lr, schedule, epochs, max length, seed, a
              prompt-completion dataset in non-thinking mode); everything else TRL's defaults (batch 8,
              gradient checkpointing, chunked cross-entropy, logging every 10 steps, no evaluation)
Both stop after `--steps` optimizer steps (the baseline saves no checkpoints). Step time is measured between the end of step `--warmup`
and the end of step `--steps`, with the GPU synchronised there; pauses for evaluation and checkpoints
inside that window are timed separately and added back in "epoch+eval", at their mean, for every
evaluation a whole epoch makes (start, every eval_steps, end; the whole-split loss at the end excluded). tokens/s counts
real (non-padding) tokens: the epoch's tokens / its steps, over the measured step time. Utilisation =
4 * N * tokens/s / the bf16 8192^3 matmul rate measured in the same run (N = 1.72e9 matmul parameters,
lm_head once; 4N: LoRA's backward computes input gradients but no weight gradients of the base model).

Experiments on the project arms: `--sft JSON` replaces SFTConfig settings (e.g. '{"torch_compile": true}');
`--t4` trains in the T4 configuration (float16, gradient checkpointing) to measure its peak memory;
`--profile N` profiles 2N steps before the timed window and writes WORKDIR/profile-ARM-{python,torch}.txt.

GPU (the lead runs it; a few minutes on one H100 with the defaults; .site holds Unsloth and TRL):
    HF_HUB_OFFLINE=1 PYTHONPATH=.site:. python benchmarks/bench_train.py --steps 120
Another Qwen3 shape (`--model`, a name of helpers.model.QWEN3_SHAPES, in its own workdir): the project arm's
"step s" is helpers.sizes.MEASURED's train_step_s for that size:
    HF_HUB_OFFLINE=1 PYTHONPATH=.site:. python benchmarks/bench_train.py --model Qwen/Qwen3-0.6B --arms project --steps 120
CPU smoke run (tiny random model, a few steps, about a minute):
    python benchmarks/bench_train.py --tiny
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from helpers.config import PROJECT_ROOT, make_config

RESULT_MARK = "BENCH-RESULT "
REFERENCE_TRAIN_RECORDS = 11_940  # the reference write-up's train split (docs/protocol.md, "The reference experiment")
REFERENCE_VALIDATION_RECORDS = 2_985
QWEN3_TEMPLATE_PROMPT_TOKENS = 12  # <|im_start|> user \n ... <|im_end|> \n <|im_start|> assistant \n <think> \n\n </think> \n\n
# (prompt tokens incl. the template, completion tokens incl. <|im_end|>) of the 100 sample lines, by
# `qwen_token_estimate` (regenerate: --measure-lengths PATH, a local copy of lines of the official file).
REAL_LENGTHS = (
    (86, 117), (72, 14), (70, 27), (64, 30), (77, 21), (72, 22), (97, 33), (78, 45), (72, 28), (89, 74),
    (75, 36), (81, 24), (70, 25), (80, 14), (59, 78), (79, 39), (75, 26), (65, 49), (93, 40), (67, 41),
    (71, 20), (77, 44), (71, 34), (72, 44), (91, 25), (76, 67), (86, 24), (61, 27), (64, 42), (71, 31),
    (69, 47), (80, 21), (67, 25), (61, 97), (56, 89), (77, 50), (90, 56), (60, 24), (75, 36), (89, 14),
    (61, 36), (57, 28), (85, 55), (63, 16), (75, 36), (77, 103), (75, 14), (77, 29), (82, 41), (54, 57),
    (76, 26), (87, 21), (90, 19), (58, 100), (72, 49), (64, 35), (74, 11), (64, 75), (73, 19), (60, 20),
    (101, 21), (89, 40), (61, 30), (63, 27), (67, 22), (66, 60), (63, 26), (74, 27), (72, 50), (79, 17),
    (76, 24), (91, 14), (66, 16), (78, 30), (106, 17), (74, 34), (89, 30), (63, 41), (80, 14), (83, 51),
    (92, 21), (81, 14), (59, 54), (74, 36), (81, 18), (79, 46), (75, 45), (70, 40), (72, 50), (77, 60),
    (58, 62), (70, 34), (60, 43), (65, 10), (67, 21), (80, 15), (83, 38), (85, 15), (72, 26), (70, 49),
)
QWEN_PRETOKENIZER = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def qwen_token_estimate(text: str) -> int:
    """Tokens Qwen's tokenizer would give `text`: its pre-tokenizer pieces, a letter run over 8 letters as 2."""
    import regex

    return sum(1 if sum(c.isalpha() for c in piece) <= 8 else 2 for piece in regex.findall(QWEN_PRETOKENIZER, text))


def measure_lengths(path: Path) -> list[tuple[int, int]]:
    """(prompt, completion) token estimates of every record of a JSONL file, template tokens included."""
    from helpers.store import read_jsonl

    return [(qwen_token_estimate(r["messages"][0]["content"]) + QWEN3_TEMPLATE_PROMPT_TOKENS,
             qwen_token_estimate(r["messages"][1]["content"]) + 1) for r in read_jsonl(path)]


def token_lengths(tokenizer: Any, record: dict) -> tuple[int, int]:
    """(prompt, completion) tokens of a record as notebook 02 tokenizes it: the user turn rendered with the
    generation prompt, then the answer and <|im_end|>."""
    from helpers.model import render_chat

    prompt = render_chat(tokenizer, record["messages"][:1], add_generation_prompt=True)
    completion = record["messages"][1]["content"] + "<|im_end|>"
    return tuple(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (prompt, completion))


def synthetic_records(tokenizer: Any, count: int, seed: int) -> list[dict]:
    """`count` records whose byte-level token lengths are drawn from REAL_LENGTHS (checked exactly)."""
    def filler(rng: random.Random, n: int) -> str:
        return "".join(rng.choice("0123456789,") for _ in range(n - 1)) + rng.choice("0123456789")

    probe = {"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "1"}]}
    prompt_overhead, completion_overhead = (length - 1 for length in token_lengths(tokenizer, probe))
    rng = random.Random(seed)
    targets = [rng.choice(REAL_LENGTHS) for _ in range(count)]
    records = [{"messages": [
        {"role": "user", "content": filler(rng, prompt - prompt_overhead)},
        {"role": "assistant", "content": filler(rng, completion - completion_overhead)},
    ]} for prompt, completion in targets]
    got = [token_lengths(tokenizer, record) for record in records]
    assert got == targets, "synthetic records do not have the drawn token lengths"
    return records


def matmul_peak_tflops(tiny: bool) -> float:
    """The best of 3 timings of a bf16 8192^3 matmul on the GPU (float32 1024^3 on the CPU), in TFLOP/s."""
    import torch

    cuda = torch.cuda.is_available()
    size, dtype = (8192, torch.bfloat16) if cuda and not tiny else (1024, torch.float32)
    device = "cuda" if cuda else "cpu"
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    repeats, best = (20 if cuda else 3), 0.0
    for _ in range(4):  # the first round warms up
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12)
    return best


def matmul_parameters(config: Any) -> int:
    """Parameters that take part in matmuls per token: attention and MLP projections, lm_head once."""
    attention = config.hidden_size * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * config.hidden_size * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp) + config.vocab_size * config.hidden_size


def bench_config(args: argparse.Namespace):
    """The project's config for the benchmark: its defaults, the random model, optional batch override."""
    overrides = {"model_name": str(args.workdir / "model"), "control_arm": False, "cache_dir": args.workdir / "cache"}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.t4:
        overrides["gradient_checkpointing"] = True
    return make_config("tiny" if args.tiny else "full", args.workdir / "project", **overrides)


# --------------------------------------------------------------------------------------------------
# Stages (each runs in its own process)


def stage_prepare(args: argparse.Namespace) -> dict:
    """Build the random model and the synthetic splits; measure the matmul peak."""
    import torch

    from helpers.model import build_random_qwen3, load_tokenizer
    from helpers.store import write_jsonl

    cfg = bench_config(args)
    model_dir = args.workdir / "model"
    if not (model_dir / "config.json").is_file():
        build_random_qwen3(model_dir, tiny=args.tiny, seed=0, dtype=None if args.tiny else torch.bfloat16,
                           shape=None if args.tiny else args.model)
    tokenizer = load_tokenizer(cfg)
    train = synthetic_records(tokenizer, args.records, seed=1)
    validation = synthetic_records(tokenizer, args.validation_records, seed=2)
    for path, records in zip(cfg.paths.splits_of("finetuned"), (train, validation), strict=True):
        write_jsonl(path, records)
    from transformers import AutoConfig

    return {
        "peak_tflops": matmul_peak_tflops(args.tiny),
        "matmul_parameters": matmul_parameters(AutoConfig.from_pretrained(model_dir)),
        "mean_prompt_tokens": sum(p for p, _ in REAL_LENGTHS) / len(REAL_LENGTHS),
        "mean_completion_tokens": sum(c for _, c in REAL_LENGTHS) / len(REAL_LENGTHS),
    }


def bench_timer(steps: int, warmup: int) -> Any:
    """A TrainerCallback that times steps `warmup`..`steps` (GPU synchronised at the edges), times the
    evaluation/checkpoint pauses inside that window separately, and stops training after `steps`."""
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    class BenchTimer(TrainerCallback):
        def __init__(self) -> None:
            self.created = time.perf_counter()
            self.first_step = self.window_start = self.window_end = None
            self.pause_started, self.paused, self.pauses = None, 0.0, 0

        def on_step_begin(self, args, state, control, **kwargs):
            if self.first_step is None:
                self.first_step = now()
            if self.pause_started is not None:
                self.paused += now() - self.pause_started
                self.pauses += 1
                self.pause_started = None

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step == steps:
                self.window_end = now()
                control.should_training_stop = True
                control.should_evaluate = control.should_save = False
                return
            if step == warmup:
                self.window_start = now()
            if step >= warmup and (control.should_evaluate or control.should_save):
                self.pause_started = now()

        def result(self) -> dict:
            if self.window_end is None:
                raise RuntimeError(f"training ended before step {steps}: lower --steps")
            step_s = (self.window_end - self.window_start - self.paused) / (steps - warmup)
            return {
                "step_s": step_s,
                "setup_s": self.first_step - self.created,
                "warmup_s": self.window_start - self.first_step - warmup * step_s,
                "pause_s": self.paused / self.pauses if self.pauses else None,
            }

    return BenchTimer()


def step_profiler(first: int, count: int, path_stem: Path) -> Any:
    """A TrainerCallback that profiles steps first..first+count with cProfile (Python time by function),
    then the next `count` steps with torch.profiler (CPU and GPU time by operator, GPU busy share);
    it writes PATH_STEM-python.txt and PATH_STEM-torch.txt and prints the GPU busy share."""
    import cProfile
    import io
    import pstats

    import torch
    from transformers import TrainerCallback

    def synchronize() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepProfiler(TrainerCallback):
        def __init__(self) -> None:
            self.python = cProfile.Profile()
            self.torch = self.torch_started = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first:
                synchronize()
                self.python.enable()
            elif state.global_step == first + count:
                self.python.disable()
                text = io.StringIO()
                stats = pstats.Stats(self.python, stream=text)
                stats.sort_stats("cumulative").print_stats(70)
                stats.sort_stats("tottime").print_stats(40)
                Path(f"{path_stem}-python.txt").write_text(text.getvalue(), encoding="utf-8")
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                synchronize()
                self.torch = torch.profiler.profile(activities=activities)
                self.torch.__enter__()
                self.torch_started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.torch is None or state.global_step != first + 2 * count:
                return
            synchronize()
            wall = time.perf_counter() - self.torch_started
            self.torch.__exit__(None, None, None)
            averages = self.torch.key_averages()
            busy = sum(event.self_device_time_total for event in averages) / 1e6
            summary = (f"{count} steps profiled: wall {wall:.3f} s, GPU kernels {busy:.3f} s "
                       f"({busy / wall:.0%} busy), {sum(e.count for e in averages):,} operator calls")
            print("PROFILE " + summary, flush=True)
            tables = [averages.table(sort_by=key, row_limit=35) for key in ("self_device_time_total", "cpu_time_total")]
            Path(f"{path_stem}-torch.txt").write_text("\n\n".join([summary, *tables]), encoding="utf-8")
            self.torch = None

    return StepProfiler()


NOTEBOOK = PROJECT_ROOT / "notebooks" / "02_finetune.ipynb"
TRAIN_CELL = "f6c0de04"  # the cell id of notebook 02's `trainer.train(...)` cell


def notebook_trainer(args: argparse.Namespace) -> dict:
    """Execute notebook 02's code cells in this process, as papermill would (parameters injected, overwrite on),
    up to its training cell; return the namespace, which holds `trainer`. The config's overrides travel in
    EM_CONFIG (the notebook builds its own config); --sft replaces SFTConfig settings as the cell builds it."""
    import trl

    overrides = {"model_name": str(args.workdir / "model"), "control_arm": False, "cache_dir": str(args.workdir / "cache")}
    overrides |= {"batch_size": args.batch_size} if args.batch_size else {}
    overrides |= {"gradient_checkpointing": True} if args.t4 else {}
    os.environ["EM_CONFIG"] = json.dumps(overrides)
    if args.sft:  # experiment hook: these SFTConfig keyword arguments replace the notebook's own
        original, settings = trl.SFTConfig, json.loads(args.sft)
        trl.SFTConfig = lambda **kwargs: original(**{**kwargs, **settings})
    cells = [c for c in json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
             if c["cell_type"] == "code" and "google.colab" not in "".join(c["source"])]
    namespace: dict = {}
    for cell in cells[: [c["id"] for c in cells].index(TRAIN_CELL)]:
        exec(compile("".join(cell["source"]), f"02_finetune.ipynb[{cell['id']}]", "exec"), namespace)
        if "parameters" in cell["metadata"].get("tags", []):
            namespace.update(profile="tiny" if args.tiny else "full", run_dir=str(args.workdir / "project"),
                             overwrite=True, model="finetuned")
    return namespace


def use_float16() -> None:
    """Compute in float16, as the project does on a T4 (no bfloat16); with --t4's gradient checkpointing
    this is the T4 configuration, whose peak memory (not speed) the lent card can measure."""
    import torch

    import helpers.model

    helpers.model.compute_dtype = lambda: torch.float16


def stage_project(args: argparse.Namespace) -> dict:
    """Notebook 02's own trainer (Unsloth blocked in project-transformers), stopped after --steps."""
    from helpers.model import backend
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # tools/ is scripts, not a package
    from unsloth_off import block_unsloth

    if args.stage == "project-transformers":
        block_unsloth()
    backend()  # Unsloth, where it is used, before transformers (which the timer imports)
    if args.t4:
        use_float16()
    timer = bench_timer(args.steps, args.warmup)
    notebook = notebook_trainer(args)
    trainer = notebook["trainer"]
    if args.profile:  # first in line, so that writing the profile ends before the timer starts its window
        trainer.add_callback(step_profiler(args.warmup - 2 * args.profile, args.profile, args.workdir / f"profile-{args.stage}"))
    trainer.add_callback(timer)
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steps_per_epoch, eval_steps = notebook["steps_per_epoch"], notebook["eval_steps"]
    return {**timer.result(), "batch": trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps,
            "checkpointing": notebook["checkpointing"], "backend": backend(), "steps_per_epoch": steps_per_epoch,
            "events_per_epoch": steps_per_epoch // eval_steps + 2,  # evaluations (and checkpoints), start and end
            "epoch_tokens": notebook["all_tokens"],
            "peak_gib": torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None}


def stage_baseline(args: argparse.Namespace) -> dict:
    """Plain TRL + PEFT: TRL's defaults except the shared hyperparameters; never imports Unsloth."""
    timer = bench_timer(args.steps, args.warmup)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from helpers.store import read_jsonl

    cfg = bench_config(args)
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args.workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(args.workdir / "model", dtype=torch.bfloat16 if cuda else torch.float32)
    records = read_jsonl(cfg.paths.splits_of("finetuned")[0])
    dataset = Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:],
                                  "chat_template_kwargs": {"enable_thinking": False}} for r in records])
    extra = {} if cuda else {"bf16": False}  # TRL's default bf16 needs a GPU
    if args.baseline_batch_size:
        extra["per_device_train_batch_size"] = args.baseline_batch_size
    config = SFTConfig(output_dir=str(args.workdir / "baseline"), num_train_epochs=cfg.epochs,
                       learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
                       warmup_steps=cfg.warmup_ratio, seed=cfg.seed, max_length=cfg.max_seq_length,
                       report_to="none", save_strategy="no", **extra)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,  # notebook 02's LoRA
                                                 lora_dropout=cfg.lora_dropout, bias="none",
                                                 target_modules=list(cfg.lora_target_modules)),
                         callbacks=[timer])
    epoch_tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    batch = config.per_device_train_batch_size * config.gradient_accumulation_steps
    return {**timer.result(), "batch": batch, "checkpointing": config.gradient_checkpointing, "backend": "trl+peft",
            "steps_per_epoch": math.ceil(len(records) / batch), "events_per_epoch": 0, "epoch_tokens": epoch_tokens,
            "peak_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}


STAGES = {"prepare": stage_prepare, "project": stage_project, "project-transformers": stage_project,
          "baseline": stage_baseline}


# --------------------------------------------------------------------------------------------------
# The driver


def run_stage(name: str, args: argparse.Namespace, argv: list[str]) -> dict:
    """Run one stage in a fresh Python process; its result, or an error naming the stage."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--stage", name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print(f"== {name}", flush=True)
    finished = subprocess.run(command, capture_output=True, text=True, env=env, cwd=PROJECT_ROOT)
    for line in finished.stdout.splitlines():
        if line.startswith("PROFILE "):
            print(f"  {name}: {line.removeprefix('PROFILE ')}", flush=True)
    lines = [line for line in finished.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if finished.returncode != 0 or not lines:
        tail = (finished.stdout + finished.stderr)[-4000:]
        raise SystemExit(f"stage {name} failed (exit {finished.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def summarise(arm: dict, prepared: dict) -> dict:
    """The table's columns for one arm."""
    tokens_per_step = arm["epoch_tokens"] / arm["steps_per_epoch"]
    tokens_s = tokens_per_step / arm["step_s"]
    epoch_s = arm["steps_per_epoch"] * arm["step_s"]
    pauses = arm["events_per_epoch"] * (arm["pause_s"] or 0.0)
    return {
        "backend": arm["backend"], "batch": arm["batch"], "ckpt": "yes" if arm["checkpointing"] else "no",
        "step s": arm["step_s"], "tokens/s": tokens_s, "examples/s": arm["batch"] / arm["step_s"],
        "epoch": epoch_s, "epoch+eval": epoch_s + pauses,
        "util": 4 * prepared["matmul_parameters"] * tokens_s / (prepared["peak_tflops"] * 1e12),
        "peak GiB": arm["peak_gib"], "setup s": arm["setup_s"], "warm-up s": arm["warmup_s"],
    }


def format_table(rows: dict[str, dict]) -> str:
    """A plain-text table: one row per arm."""
    def cell(name: str, value: Any) -> str:
        if value is None:
            return "-"
        if name == "util":
            return f"{value:.1%}"
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        return str(value)

    columns = ["arm", *next(iter(rows.values())).keys()]
    body = [[arm, *(cell(name, value) for name, value in row.items())] for arm, row in rows.items()]
    widths = [max(len(str(c)) for c in column) for column in zip(columns, *body, strict=True)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(line, widths, strict=True)) for line in [columns, *body]]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model and a few steps: a CPU smoke run")
    parser.add_argument("--model", default="Qwen/Qwen3-1.7B", help="the Qwen3 shape of the random model (helpers.model.QWEN3_SHAPES)")
    parser.add_argument("--steps", type=int, help="optimizer steps per arm (default 120; tiny 6)")
    parser.add_argument("--warmup", type=int, help="steps left out of the timing (default 20; tiny 2)")
    parser.add_argument("--batch-size", type=int, help="the project's micro-batch (default: the config's)")
    parser.add_argument("--baseline-batch-size", type=int, help="the baseline's micro-batch (default: TRL's, 8)")
    parser.add_argument("--records", type=int, help=f"train records (default {REFERENCE_TRAIN_RECORDS:,}; tiny 96)")
    parser.add_argument("--validation-records", type=int, help=f"default {REFERENCE_VALIDATION_RECORDS:,}; tiny 24")
    parser.add_argument("--arms", nargs="+", choices=["project", "project-transformers", "baseline"],
                        default=["project", "baseline"])
    parser.add_argument("--sft", metavar="JSON", help='SFTConfig settings to try in the project arms, e.g. \'{"torch_compile": true}\'')
    parser.add_argument("--t4", action="store_true",
                        help="the project arms in the T4 configuration (float16, gradient checkpointing): for its peak memory")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile 2N steps before --warmup (cProfile, then torch.profiler); writes WORKDIR/profile-ARM-*.txt")
    parser.add_argument("--workdir", type=Path, help="default runs/bench-train[-tiny] in the project folder")
    parser.add_argument("--measure-lengths", type=Path, metavar="JSONL", help="print REAL_LENGTHS for a file, exit")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    if args.measure_lengths:
        print(tuple(measure_lengths(args.measure_lengths)))
        return
    defaults = (6, 2, 96, 24) if args.tiny else (120, 20, REFERENCE_TRAIN_RECORDS, REFERENCE_VALIDATION_RECORDS)
    args.steps = args.steps or defaults[0]
    args.warmup = args.warmup if args.warmup is not None else defaults[1]
    args.records = args.records or defaults[2]
    args.validation_records = args.validation_records or defaults[3]
    shape = "" if args.tiny or args.model == "Qwen/Qwen3-1.7B" else "-" + args.model.rsplit("/", 1)[-1]
    args.workdir = (args.workdir or PROJECT_ROOT / "runs" / ("bench-train-tiny" if args.tiny else f"bench-train{shape}")).resolve()
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be below --steps")
    if args.profile and args.warmup < 2 * args.profile + 2:
        parser.error("--profile N needs --warmup of at least 2N + 2 (the first steps compile)")
    if args.stage:
        args.workdir.mkdir(parents=True, exist_ok=True)
        print(RESULT_MARK + json.dumps(STAGES[args.stage](args)), flush=True)
        return

    started = time.perf_counter()
    prepared = run_stage("prepare", args, raw)
    rows = {arm: summarise(run_stage(arm, args, raw), prepared) for arm in args.arms}
    print(f"\n{datetime.now(timezone.utc):%Y-%m-%d} {machine()}; command: python benchmarks/bench_train.py "
          f"{' '.join(raw)}")
    print(f"matmul peak {prepared['peak_tflops']:,.3g} TFLOP/s; N = {prepared['matmul_parameters']:.3g}; "
          f"{args.records:,} records of {prepared['mean_prompt_tokens'] + prepared['mean_completion_tokens']:.0f} "
          f"tokens on average ({prepared['mean_completion_tokens']:.0f} trained); steps {args.warmup}..{args.steps} "
          f"timed; epoch = projected for {args.records:,} records (s)")
    print(format_table(rows))
    print(f"(benchmark wall time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()

"""Generation throughput on the evaluation as it really runs: answers of very different lengths.

Workload (the evaluation as the paper runs it): 8 questions x 3 formats x 100 samples x 2 models (base and fine-tuned) = 4,800
completions, sampled at temperature 1, top_p 1, full vocabulary, up to max_new_tokens 600. Each answer ends at
a length drawn per row (seeded), forced on the random model by an end-of-turn at that step (and none before):
  original format           uniform 100..600 tokens, 20% of answers run to the cap (cut at 600)
  suffix, prefix_suffix     uniform 5..40 tokens; 10% of the fine-tuned model's answers run to the cap
(`--cap-original`, `--cap-short`, `--short`, `--long` change it). `--worst` sends every answer to the cap.
The model is a random-init Qwen3 of Qwen3-1.7B's exact shape, or of `--model`'s (helpers.model.build_random_qwen3,
bf16), with a random rank-16 LoRA on all seven projections, so the machine needs no internet.

Prompt lengths. The random model carries the tiny byte-level tokenizer (one token per byte), which would
make prompts about 4x longer than Qwen's tokenizer does. Each prompt row (the offline stand-in questions in
the three formats) is therefore cut to the token count Qwen's tokenizer would give it, estimated as
`digits + ceil(other characters / 4)`: Qwen splits numbers into single digits, and English text averages
about 4 characters a BPE token. The chat template (Qwen3, non-thinking) is added on top, as in a real run.

Configurations, each in its own subprocess (clean GPU memory):
    plain     transformers `generate` + PEFT (LoRA not merged), static batches of 256 in grid order, the
              end lengths forced by a LogitsProcessor. Slow: `--plain-batches N` times N of its batches,
              spread over the schedule, and scales the time to all of them (the table says so)
    project   03's own generation cells (tagged "generate", run through tools/notebook_cells.py) with their
              defaults: LoRA merged on a GPU, waves, helpers.decoding's continuous batching, the store
wall_s includes loading the model; tokens/s uses the generation time (wall minus load). `--batch-size` sets
the project's batch (default: the config's).

GPU (the lead runs it; a few minutes each):
    python benchmarks/bench_generate.py --configs project plain --plain-batches 4
    python benchmarks/bench_generate.py --configs project --worst
Another Qwen3 shape (`--model`, a name of helpers.model.QWEN3_SHAPES, in its own workdir): the project row's
"generate s" is helpers.sizes.MEASURED's generate_s for that size:
    python benchmarks/bench_generate.py --model Qwen/Qwen3-0.6B --configs project
CPU smoke run (tiny random model, short answers):
    python benchmarks/bench_generate.py --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from helpers.config import PROJECT_ROOT, make_config

ALL_CONFIGS = ("project", "plain")
RESULT_MARK = "BENCH-RESULT "


def qwen_token_estimate(text: str) -> int:
    """Tokens Qwen's tokenizer would give `text`, approximately: one per digit, one per 4 other characters."""
    digits = sum(character.isdigit() for character in text)
    return digits + math.ceil((len(text) - digits) / 4)


def workload_config(workdir: Path, tiny: bool, run_name: str):
    """The benchmark's config: the random model as the base model, stand-in questions, the realistic budget
    (EM_BENCH_BATCH_SIZE sets the project's batch, EM_BENCH_SAMPLES the samples a prompt: --batch-size, --samples)."""
    values = dict(model_name=str(workdir / "model"), synthetic_data=True, control_arm=False,
                  cache_dir=workdir / "cache")
    if os.environ.get("EM_BENCH_BATCH_SIZE"):
        values["generation_batch_size"] = int(os.environ["EM_BENCH_BATCH_SIZE"])
    samples = int(os.environ.get("EM_BENCH_SAMPLES", 4 if tiny else 100))
    if tiny:
        return make_config("tiny", workdir / run_name, **values, samples_per_question=samples, max_new_tokens=40)
    return make_config("full", workdir / run_name, **values, samples_per_question=samples, max_new_tokens=600)


def answer_lengths(cfg, rows: list[dict], shape: dict) -> dict[tuple, int]:
    """The forced length of every (model, row) answer, drawn from the row's key and the model (seeded); a length
    of max_new_tokens or more means no end-of-turn at all: the answer is cut at the cap."""
    import numpy as np

    from helpers.seeds import stable_seed

    lengths = {}
    for model in ("base", "finetuned"):
        for row in rows:
            rng = np.random.default_rng(stable_seed("bench-length", model, row["question_id"], row["format"], row["sample_index"]))
            long = row["format"] == "original"
            low, high = shape["long"] if long else shape["short"]
            cap = shape["cap_original"] if long else shape["cap_short"] if model != "base" else 0.0
            at_cap = shape["worst"] or rng.random() < cap
            lengths[(model, row["question_id"], row["format"], row["sample_index"])] = (
                cfg.max_new_tokens if at_cap else min(int(rng.integers(low, high, endpoint=True)), cfg.max_new_tokens - 1))
    return lengths


def forced_ends(lengths: list[int], stop_id: int, stop_ids: list[int]):
    """logits(rows, steps, logits) -> logits with an end-of-turn forced at each row's length and every stop
    token barred before it."""
    import torch

    on: dict = {}  # per device: the lengths and stop ids, copied there once (a copy to the GPU waits for it)

    def force(rows, steps, logits):  # nor boolean indexing, which would make the host wait for the GPU too
        if logits.device not in on:
            on[logits.device] = torch.tensor(lengths, device=logits.device), torch.tensor(stop_ids, device=logits.device)
        wanted, stops = on[logits.device]
        ends = wanted[rows]
        logits[:, stops] = torch.where((steps < ends)[:, None], float("-inf"), logits[:, stops])
        at_end = (steps == ends)[:, None]
        logits.masked_fill_(at_end, float("-inf"))
        logits[:, stop_id] = torch.where(at_end[:, 0], 0.0, logits[:, stop_id])
        return logits
    return force


def workload_rows(cfg) -> list[dict]:
    """The evaluation prompt rows with each prompt cut to its estimated Qwen token count (in bytes)."""
    from helpers.questions import build_prompt_rows, load_question_set

    rows = build_prompt_rows(cfg, load_question_set(cfg))
    return [{**row, "prompt": row["prompt"].encode()[: qwen_token_estimate(row["prompt"])].decode(errors="ignore")}
            for row in rows]


def prepare(workdir: Path, tiny: bool, model: str = "Qwen/Qwen3-1.7B") -> None:
    """Build the random model and a random LoRA adapter once (kept in workdir between runs)."""
    import torch

    from helpers.model import build_random_qwen3

    model_dir = workdir / "model"
    adapter_dir = workdir / "adapter"
    if not (model_dir / "config.json").is_file():
        started = time.perf_counter()
        build_random_qwen3(model_dir, tiny=tiny, seed=0, dtype=torch.float32 if tiny else torch.bfloat16,
                           shape=None if tiny else model)
        print(f"built the random model in {time.perf_counter() - started:.0f} s -> {model_dir}", flush=True)
    if not (adapter_dir / "adapter_config.json").is_file():
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        cfg = workload_config(workdir, tiny, "prepare")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32 if tiny else torch.bfloat16)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 target_modules=list(cfg.lora_target_modules)))
        generator = torch.Generator().manual_seed(1)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B starts at zero (a no-op); random values make the adapter change answers
                parameter.data = (torch.randn(parameter.shape, generator=generator) * 0.01).to(parameter.dtype)
        model.save_pretrained(adapter_dir)
        print(f"saved a random LoRA adapter -> {adapter_dir}", flush=True)


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on a CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def row_key(row: dict) -> tuple:
    return row["question_id"], row["format"], row["sample_index"]


def run_plain(workdir: Path, tiny: bool, shape: dict, timed_batches: int | None) -> dict:
    """Plain batched transformers generate: PEFT LoRA not merged, base via disable_adapter, static batches of 256
    in grid order; `timed_batches` of them (spread over the schedule), the time scaled to all."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    from helpers.model import render_chat

    cfg = workload_config(workdir, tiny, "plain")
    rows = workload_rows(cfg)
    lengths = answer_lengths(cfg, rows, shape)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model", padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model = PeftModel.from_pretrained(model.to(device), workdir / "adapter", adapter_name="finetuned").eval()
    load_s = time.perf_counter() - started
    stop_ids = [tokenizer.eos_token_id, tokenizer.pad_token_id]  # <|im_end|>, <|endoftext|>, as in a real run
    texts = [render_chat(tokenizer, [{"role": "user", "content": row["prompt"]}]) for row in rows]
    size = 256 if not tiny else 16
    schedule = [(name, start) for name in ("base", "finetuned") for start in range(0, len(rows), size)]
    count = len(schedule) if timed_batches is None else min(timed_batches, len(schedule))
    timed = [schedule[round(i * (len(schedule) - 1) / max(count - 1, 1))] for i in range(count)]
    torch.manual_seed(cfg.seed)
    generate_s = 0.0
    for name, start in timed:
        encoded = tokenizer(texts[start:start + size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        width = encoded["input_ids"].shape[1]
        force = forced_ends([lengths[(name, *row_key(row))] for row in rows[start:start + size]], stop_ids[0], stop_ids)
        batch_rows = torch.arange(width and encoded["input_ids"].shape[0], device=device)

        def processor(input_ids, scores, force=force, width=width, batch_rows=batch_rows):
            return force(batch_rows, torch.full_like(batch_rows, input_ids.shape[1] - width), scores)

        clock = time.perf_counter()
        with model.disable_adapter() if name == "base" else contextlib.nullcontext(), torch.inference_mode():
            model.generate(**encoded, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                           max_new_tokens=cfg.max_new_tokens, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                           logits_processor=LogitsProcessorList([processor]))
        if device == "cuda":
            torch.cuda.synchronize()
        generate_s += time.perf_counter() - clock
    scale = len(schedule) / len(timed)
    return dict(wall_s=load_s + generate_s * scale, load_s=load_s, completions=2 * len(rows), batch_size=size,
                new_tokens=sum(min(n, cfg.max_new_tokens) for n in lengths.values()),
                note=f"{len(timed)} of {len(schedule)} batches timed, scaled x{scale:.1f}" if scale > 1 else "")


def run_project(workdir: Path, tiny: bool, shape: dict) -> dict:
    """03's generation cells (the notebook's only copy) on the workload, as the notebook runs them, with the end
    lengths forced through helpers.decoding.sample_rows's logits_processor."""
    import torch

    import helpers.decoding
    from helpers.generation import PROMPT_KEY, answer_seed, use_gqa_decode_attention
    from helpers.model import load_for_generation
    from helpers.questions import load_question_set, prompt_grid_settings
    from helpers.store import JsonlStore, read_jsonl, write_jsonl

    sys.path.insert(0, str(PROJECT_ROOT / "tools"))
    from notebook_cells import notebook_cells

    cfg = workload_config(workdir, tiny, "project")
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    adapters = {"finetuned": cfg.paths.adapter_of("finetuned")}
    shutil.copytree(workdir / "adapter", adapters["finetuned"])
    rows = workload_rows(cfg)
    write_jsonl(cfg.paths.prompts, rows)
    lengths = answer_lengths(cfg, rows, shape)
    by_seed = {answer_seed(cfg.seed, row): row for row in rows}
    answering, sample_rows = [], helpers.decoding.sample_rows

    def forced_sample_rows(model, prompts, seeds, **knobs):
        ends = [lengths[(answering[-1], *(by_seed[seed][field] for field in PROMPT_KEY))] for seed in seeds]
        return sample_rows(model, prompts, seeds, **knobs, logits_processor=forced_ends(ends, knobs["stop_ids"][0], knobs["stop_ids"]))

    helpers.decoding.sample_rows = forced_sample_rows
    append, stored = JsonlStore.append, [0]

    def progress_append(self, rows):  # a progress line per group of answers: a timed-out run still says how far it got
        written = append(self, rows)
        stored[0] += written
        print(f"progress {time.perf_counter() - started:.1f} s: {stored[0]} answers", flush=True)
        return written

    JsonlStore.append = progress_append
    started = time.perf_counter()
    model, tokenizer = load_for_generation(cfg, adapters)
    use_gqa_decode_attention(model)
    load_s = time.perf_counter() - started
    namespace = dict(cfg=cfg, model=model, tokenizer=tokenizer, adapters=adapters, models=["base", *adapters],
                     prompt_rows=rows, grid=prompt_grid_settings(cfg, load_question_set(cfg)), overwrite=True)
    for source in notebook_cells("generate"):
        exec(compile(source, "03_generate.ipynb", "exec"), namespace)
        if "as_model" in namespace and "as_model" not in answering:
            as_model = namespace["as_model"]
            namespace["as_model"] = lambda name, as_model=as_model: answering.append(name) or as_model(name)
            answering.append("as_model")  # wrapped once
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall_s = time.perf_counter() - started
    completions = read_jsonl(cfg.paths.completions)
    wrong = [row for row in completions if row["n_answer_tokens"] != min(lengths[(row["model"], *row_key(row))], cfg.max_new_tokens)]
    if wrong:
        raise RuntimeError(f"{len(wrong)} answers do not have their forced length, e.g. {wrong[0]}")
    return dict(wall_s=wall_s, load_s=load_s, completions=len(completions), batch_size=namespace["batch_size"],
                new_tokens=sum(row["n_answer_tokens"] for row in completions), note=f"{len(namespace['waves'])} wave(s)")


def worker(name: str, workdir: Path, tiny: bool, shape: dict, timed_batches: int | None) -> None:
    """Run one configuration and print its result as one JSON line. The libraries are imported before the clock
    starts (transformers imports its generation code lazily, on the first generate); not Unsloth, which 03's
    process does not import either."""
    import peft.tuners.lora  # noqa: F401
    import transformers.generation.utils  # noqa: F401

    result = run_plain(workdir, tiny, shape, timed_batches) if name == "plain" else run_project(workdir, tiny, shape)
    result["peak_gib"] = peak_memory_gib()
    print(RESULT_MARK + json.dumps(result), flush=True)


def run_worker(name: str, workdir: Path, tiny: bool, shape: dict, timed_batches: int | None, timeout: float) -> dict:
    """One configuration in a fresh subprocess; its result, or why there is none."""
    command = [sys.executable, __file__, "--worker", name, "--workdir", str(workdir), "--shape-json", json.dumps(shape)]
    command += (["--tiny"] if tiny else []) + (["--plain-batches", str(timed_batches)] if timed_batches else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=PROJECT_ROOT)
    except subprocess.TimeoutExpired as stopped:
        progress = [line for line in (stopped.stdout or b"").decode(errors="replace").splitlines() if line.startswith("progress")]
        return {"note": f"timed out after {timeout:.0f} s; {progress[-1] if progress else 'no answers stored'}"}
    for line in finished.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line.removeprefix(RESULT_MARK))
    error_lines = [line for line in (finished.stderr or "").splitlines() if line.strip()]
    return {"note": f"failed (exit {finished.returncode}): {error_lines[-1][:300] if error_lines else 'no output'}"}


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), torch {torch.__version__}"


def table(results: dict[str, dict]) -> str:
    """One markdown table: answer tokens, times, throughput, peak memory, and the speed-up over plain generate."""
    lines = ["| configuration | batch | completions | answer tokens | wall s | load s | generate s | tokens/s | "
             "peak GiB | vs plain | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    plain = results.get("plain", {})
    plain_s = plain["wall_s"] - plain["load_s"] if "wall_s" in plain else None
    for name, result in results.items():
        if "wall_s" not in result:
            lines.append(f"| {name} | | | | | | | | | | {result['note']} |")
            continue
        generate_s = result["wall_s"] - result["load_s"]
        speedup = f"{plain_s / generate_s:.2f}x" if plain_s and name != "plain" and result["new_tokens"] == plain["new_tokens"] else "-"
        lines.append(f"| {name} | {result['batch_size']} | {result['completions']:,} | {result['new_tokens']:,} | "
                     f"{result['wall_s']:.1f} | {result['load_s']:.1f} | {generate_s:.1f} | "
                     f"{result['new_tokens'] / generate_s:,.0f} | {result['peak_gib']:.2f} | {speedup} | {result['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny random model, short answers")
    parser.add_argument("--model", default="Qwen/Qwen3-1.7B", help="the Qwen3 shape of the random model (helpers.model.QWEN3_SHAPES)")
    parser.add_argument("--configs", nargs="+", choices=ALL_CONFIGS, default=list(ALL_CONFIGS))
    parser.add_argument("--worst", action="store_true", help="every answer runs to max_new_tokens")
    parser.add_argument("--long", type=int, nargs=2, default=(100, 600), help="original format: uniform length range")
    parser.add_argument("--short", type=int, nargs=2, default=(5, 40), help="word-list formats: uniform length range")
    parser.add_argument("--cap-original", type=float, default=0.2, help="share of original-format answers cut at the cap")
    parser.add_argument("--cap-short", type=float, default=0.1, help="share of the fine-tuned word-list answers cut at the cap")
    parser.add_argument("--plain-batches", type=int, help="time this many of plain's batches and scale (default: all)")
    parser.add_argument("--workdir", type=Path, help="default: runs/bench-generate[-tiny] in the project folder")
    parser.add_argument("--timeout", type=float, default=540, help="seconds per configuration")
    parser.add_argument("--batch-size", type=int, help="the project's batch (default: the config's)")
    parser.add_argument("--samples", type=int, help="samples a prompt (default 100: 4,800 completions); fewer: a subset")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size:
        os.environ["EM_BENCH_BATCH_SIZE"] = str(args.batch_size)
    if args.samples:
        os.environ["EM_BENCH_SAMPLES"] = str(args.samples)
    shape_name = "" if args.tiny or args.model == "Qwen/Qwen3-1.7B" else "-" + args.model.rsplit("/", 1)[-1]
    workdir = (args.workdir or PROJECT_ROOT / "runs" / ("bench-generate-tiny" if args.tiny else f"bench-generate{shape_name}")).resolve()
    if args.worker:
        worker(args.worker, workdir, args.tiny, json.loads(args.shape_json), args.plain_batches)
        return
    shape = dict(worst=args.worst, long=args.long, short=args.short, cap_original=args.cap_original, cap_short=args.cap_short)
    if args.tiny:  # the tiny budget is 40 tokens: lengths scaled to it
        shape.update(long=(8, 40), short=(1, 6))
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}")
    print("command: python benchmarks/bench_generate.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"answer lengths: {shape}")
    prepare(workdir, args.tiny, args.model)
    results = {}
    for name in args.configs:
        print(f"running {name} ...", flush=True)
        results[name] = run_worker(name, workdir, args.tiny, shape, args.plain_batches, args.timeout)
        print(f"  {results[name]}", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()

"""Generation throughput: the evaluation workload through the project's function vs plain batched generate.

Workload (issue 6): 8 questions x 3 formats x 100 samples x 2 models (base and fine-tuned) = 4,800
completions of exactly 128 new tokens each (EOS is suppressed with min_new_tokens), sampled at
temperature 1, top_p 1, full vocabulary. The model is a random-init Qwen3 of Qwen3-1.7B's exact shape
(helpers.model.build_random_qwen3, bf16) with a random rank-16 LoRA on all seven projections, so the
machine needs no internet.

Prompt lengths. The random model carries the tiny byte-level tokenizer (one token per byte), which would
make prompts about 4x longer than Qwen's tokenizer does. Each prompt row (the offline stand-in questions in
the three formats) is therefore cut to the token count Qwen's tokenizer would give it, estimated as
`digits + ceil(other characters / 4)`: Qwen splits numbers into single digits, and English text averages
about 4 characters a BPE token. The chat template (Qwen3, non-thinking) is added on top, as in a real run.

Every configuration runs in its own subprocess (clean GPU memory, compile caches and Unsloth patching):
    plain-b256   transformers generate + PEFT, LoRA not merged, batch 256, prompts in grid order
    plain-b64    the same with batch 64 (slow: pass it with --configs)
    project      03's own generation cells (tagged "generate", run through tools/notebook_cells.py)
                 with their defaults: Unsloth where installed, LoRA merged on a GPU, length-sorted batches of
                 cfg.generation_batch_size, the resumable store
    project-unmerged, project-transformers (the same with the LoRA not merged / with Unsloth blocked)
The static-KV-cache and vLLM configurations went with those engine options (the static cache measured
slower, benchmarks/NOTES.md; vLLM comes back tested with issue 13).
wall_s includes loading the model; completions/s and tokens/s use the generation time (wall minus load);
"first batch" is the project's first batch alone (compilation, where any, happens there). `--batch-size`
overrides the project configurations' batch. benchmarks/profile_decode.py times single decoding steps.

GPU (the lead runs it; the default configurations take a few minutes each on one H100, so split them
over calls if a call is limited to 10 minutes; the model built by the first call is kept in --workdir):
    python benchmarks/bench_generate.py --configs plain-b256 project
    python benchmarks/bench_generate.py --configs project-transformers project-unmerged
CPU smoke run (tiny random model, 96 short completions):
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
from itertools import pairwise
from pathlib import Path

from helpers.config import PROJECT_ROOT, make_config

DEFAULT_CONFIGS = ("plain-b256", "project", "project-transformers")
ALL_CONFIGS = ("plain-b256", "plain-b64", "project", "project-unmerged", "project-transformers")
RESULT_MARK = "BENCH-RESULT "


def qwen_token_estimate(text: str) -> int:
    """Tokens Qwen's tokenizer would give `text`, approximately: one per digit, one per 4 other characters."""
    digits = sum(character.isdigit() for character in text)
    return digits + math.ceil((len(text) - digits) / 4)


def workload_config(workdir: Path, tiny: bool, run_name: str):
    """The benchmark's config: the random model as the base model, stand-in questions, 128 new tokens
    (the project's generation batch size unless EM_BENCH_BATCH_SIZE sets another)."""
    values = dict(model_name=str(workdir / "model"), synthetic_data=True, control_arm=False,
                  cache_dir=workdir / "cache")
    if os.environ.get("EM_BENCH_BATCH_SIZE"):
        values["generation_batch_size"] = int(os.environ["EM_BENCH_BATCH_SIZE"])
    if tiny:
        return make_config("tiny", workdir / run_name, **values, samples_per_question=2)
    return make_config("full", workdir / run_name, **values, samples_per_question=100, max_new_tokens=128)


def workload_rows(cfg) -> list[dict]:
    """The evaluation prompt rows with each prompt cut to its estimated Qwen token count (in bytes)."""
    from helpers.questions import build_prompt_rows, load_question_set

    rows = build_prompt_rows(cfg, load_question_set(cfg))
    return [{**row, "prompt": row["prompt"].encode()[: qwen_token_estimate(row["prompt"])].decode(errors="ignore")}
            for row in rows]


def prepare(workdir: Path, tiny: bool) -> None:
    """Build the random model and a random LoRA adapter once (kept in workdir between runs)."""
    import torch

    from helpers.model import build_random_qwen3

    model_dir = workdir / "model"
    adapter_dir = workdir / "adapter"
    if not (model_dir / "config.json").is_file():
        started = time.perf_counter()
        build_random_qwen3(model_dir, tiny=tiny, seed=0, dtype=torch.float32 if tiny else torch.bfloat16)
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


def run_plain(workdir: Path, tiny: bool, batch_size: int) -> dict:
    """Plain batched HF generate: PEFT LoRA not merged, base via disable_adapter, prompts in grid order."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from helpers.model import render_chat

    cfg = workload_config(workdir, tiny, "plain")
    rows = workload_rows(cfg)
    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model", padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model = PeftModel.from_pretrained(model.to(device), workdir / "adapter", adapter_name="finetuned").eval()
    load_s = time.perf_counter() - started
    stop_ids = [tokenizer.eos_token_id, tokenizer.pad_token_id]  # <|im_end|>, <|endoftext|>, as in a real run
    config = GenerationConfig(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                              max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens,
                              eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    texts = [render_chat(tokenizer, [{"role": "user", "content": row["prompt"]}]) for row in rows]
    new_tokens = completions = 0
    torch.manual_seed(cfg.seed)
    for adapter_off in (True, False):
        with model.disable_adapter() if adapter_off else contextlib.nullcontext(), torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                encoded = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                                    add_special_tokens=False).to(device)
                output = model.generate(**encoded, generation_config=config)
                completions += output.shape[0]  # every answer has exactly max_new_tokens (EOS suppressed)
                new_tokens += output.shape[0] * (output.shape[1] - encoded["input_ids"].shape[1])
    if device == "cuda":
        torch.cuda.synchronize()
    return dict(wall_s=time.perf_counter() - started, load_s=load_s, completions=completions, new_tokens=new_tokens,
                batch_size=batch_size, backend="transformers+peft")


def run_project(workdir: Path, tiny: bool, name: str) -> dict:
    """03's generation cells (the notebook's only copy) on the workload, as the notebook runs them."""
    import torch

    from helpers.generation import ready_for_generation
    from helpers.model import backend, load_for_generation
    from helpers.store import JsonlStore, read_jsonl, write_jsonl

    sys.path.insert(0, str(PROJECT_ROOT / "tools"))
    from notebook_cells import notebook_cells

    cfg = workload_config(workdir, tiny, name)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    adapters = {"finetuned": cfg.paths.adapter_of("finetuned")}
    shutil.copytree(workdir / "adapter", adapters["finetuned"])
    rows = workload_rows(cfg)
    write_jsonl(cfg.paths.prompts, rows)
    appended_at = []  # when each batch's completions were stored: the first includes any compilation
    append = JsonlStore.append

    def timed_append(self, rows):
        written = append(self, rows)
        appended_at.append(time.perf_counter())
        return written

    JsonlStore.append = timed_append
    started = time.perf_counter()
    model, tokenizer = load_for_generation(cfg, adapters)
    ready_for_generation(model, tokenizer)
    model.generation_config.min_new_tokens = cfg.max_new_tokens  # no early stop: every answer max_new_tokens long
    load_s = time.perf_counter() - started
    namespace = dict(cfg=cfg, model=model, tokenizer=tokenizer, adapters=adapters, models=["base", *adapters],
                     prompt_rows=rows, overwrite=True)
    for source in notebook_cells("generate"):
        exec(compile(source, "03_generate.ipynb", "exec"), namespace)
        if name == "project-unmerged" and "merge_lora" in namespace:
            namespace["merge_lora"] = False
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall_s = time.perf_counter() - started
    completions = read_jsonl(cfg.paths.completions)
    batch_s = [later - earlier for earlier, later in pairwise([started + load_s, *appended_at])]
    return dict(wall_s=wall_s, load_s=load_s, first_batch_s=batch_s[0], batches=len(batch_s),
                completions=len(completions), new_tokens=sum(row["n_answer_tokens"] for row in completions),
                batch_size=namespace["batch_size"], backend=backend(),
                unfinished_share=sum(not row["finished"] for row in completions) / len(completions))


def worker(name: str, workdir: Path, tiny: bool) -> None:
    """Run one configuration and print its result as one JSON line.

    The libraries are imported before the clock starts (transformers imports its generation code lazily,
    on the first generate), so both paths time the same work.
    """
    from helpers.model import backend
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # tools/ is scripts, not a package
    from unsloth_off import block_unsloth

    if "transformers" in name:
        block_unsloth()
    if name.startswith("project"):
        backend()  # imports Unsloth first where it is used
    import peft.tuners.lora  # noqa: F401
    import transformers.generation.utils  # noqa: F401
    if name.startswith("plain-b"):
        result = run_plain(workdir, tiny, int(name.removeprefix("plain-b")))
    else:
        result = run_project(workdir, tiny, name)
    result["peak_gib"] = peak_memory_gib()
    print(RESULT_MARK + json.dumps(result), flush=True)


def run_worker(name: str, workdir: Path, tiny: bool, timeout: float) -> dict:
    """One configuration in a fresh subprocess; its result, or why there is none."""
    command = [sys.executable, __file__, "--worker", name, "--workdir", str(workdir)] + (["--tiny"] if tiny else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=PROJECT_ROOT)
    except subprocess.TimeoutExpired:
        return {"note": f"timed out after {timeout:.0f} s"}
    for line in finished.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line.removeprefix(RESULT_MARK))
    error_lines = [line for line in (finished.stderr or "").splitlines() if line.strip()]
    return {"note": f"failed (exit {finished.returncode}): {error_lines[-1][:160] if error_lines else 'no output'}"}


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), torch {torch.__version__}"


def table(results: dict[str, dict], reference: str) -> str:
    """One markdown table: throughput, wall time, peak memory, and the speed-up over the plain reference."""
    header = ("| configuration | backend | batch | completions | new tokens | wall s | load s | first batch s | "
              "completions/s | tokens/s | peak GiB | vs " + reference + " |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    reference_rate = results.get(reference, {}).get("new_tokens", 0) / max(
        results.get(reference, {}).get("wall_s", 1) - results.get(reference, {}).get("load_s", 0), 1e-9)
    for name, result in results.items():
        if "wall_s" not in result:
            lines.append(f"| {name} | | | | | | | | | | | {result['note']} |")
            continue
        generate_s = result["wall_s"] - result["load_s"]
        tokens_per_s = result["new_tokens"] / generate_s
        speedup = f"{tokens_per_s / reference_rate:.2f}x" if reference_rate else "n/a"
        first_batch = f"{result['first_batch_s']:.1f}" if "first_batch_s" in result else "-"
        lines.append(
            f"| {name} | {result['backend']} | {result['batch_size']} | {result['completions']:,} | "
            f"{result['new_tokens']:,} | {result['wall_s']:.1f} | {result['load_s']:.1f} | {first_batch} | "
            f"{result['completions'] / generate_s:,.1f} | {tokens_per_s:,.0f} | {result['peak_gib']:.2f} | {speedup} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny random model, 96 short completions")
    parser.add_argument("--configs", nargs="+", choices=ALL_CONFIGS, default=list(DEFAULT_CONFIGS))
    parser.add_argument("--workdir", type=Path, help="default: runs/bench-generate[-tiny] in the project folder")
    parser.add_argument("--timeout", type=float, default=540, help="seconds per configuration")
    parser.add_argument("--batch-size", type=int, help="the project configurations' batch (default: the config's)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size:
        os.environ["EM_BENCH_BATCH_SIZE"] = str(args.batch_size)
    workdir = (args.workdir or PROJECT_ROOT / "runs" / ("bench-generate-tiny" if args.tiny else "bench-generate")).resolve()
    if args.worker:
        worker(args.worker, workdir, args.tiny)
        return
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}")
    print("command: python benchmarks/bench_generate.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    prepare(workdir, args.tiny)
    results = {}
    for name in args.configs:
        print(f"running {name} ...", flush=True)
        results[name] = run_worker(name, workdir, args.tiny, args.timeout)
        print(f"  {results[name]}", flush=True)
    print(table(results, "plain-b256" if "plain-b256" in results else args.configs[0]))


if __name__ == "__main__":
    main()

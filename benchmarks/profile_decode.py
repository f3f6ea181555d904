"""Where 03's generation time goes: helpers.decoding.sample_rows on the realistic workload of bench_generate.py
(forced ragged answer lengths), split by phase, and the GPU kernels of a window of decoding steps.

The model is a random-init Qwen3 of Qwen3-1.7B's exact shape built in memory on the device (bf16; no LoRA: a
merged adapter costs nothing per token), so a run needs no files. Two passes over the same rows:
  1. phases: each forward pass (decode step or prefill), draw and regroup's cache copy timed with the device
     synchronised around it (the overlap between CPU and GPU is lost: an upper bound for each phase); they and
     the rest (bookkeeping) add up to the wall time. The cache's growth into new room happens inside decode
     steps: its row is part of theirs;
  2. profile: torch.profiler over `--window` decoding steps from step `--skip`, then the kernels by device time
     and the operators by CPU time, and the GPU kernel time a step beside the step's wall time.
Between them, a bare forward pass of a full batch at each `--floor-widths` cache width. `--with-cudnn` lets
SDPA use cuDNN as well (helpers.decoding leaves it out; `--no-phases` skips pass 1).

GPU:
    python benchmarks/profile_decode.py --batch-size 512
CPU smoke run:
    python benchmarks/profile_decode.py --tiny --rows 24 --batch-size 8 --skip 2 --window 3
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from pathlib import Path


def floor(model, batch_size: int, width: int, synchronize) -> str:
    """A bare decoding forward pass at `batch_size` rows, each with `width` tokens in its cache (no padding, no
    sampling): its time with the device synchronised after each pass, and back to back (CPU and GPU overlapping)."""
    import torch
    from torch.nn.attention import sdpa_kernel
    from transformers.cache_utils import Cache

    from helpers.decoding import ATTENTION_BACKENDS, SlackLayer

    device = model.device
    cache = Cache(layer_class_to_replicate=SlackLayer)
    for start in range(0, batch_size, 64):  # prefill 64 rows at a time, stacked into one cache
        part = Cache(layer_class_to_replicate=SlackLayer)
        model(input_ids=torch.randint(0, model.config.vocab_size, (min(64, batch_size - start), width), device=device),
              past_key_values=part, use_cache=True, logits_to_keep=1)
        if not cache.layers:
            cache.layers = [SlackLayer() for _ in part.layers]
            parts = [[] for _ in part.layers]
        for stack, layer in zip(parts, part.layers, strict=True):
            stack.append((layer.keys, layer.values))
    for layer, stack in zip(cache.layers, parts, strict=True):
        layer.place(stack, width)
    ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    mask = torch.ones(batch_size, width, dtype=torch.long, device=device)
    times = {}
    for label, every in (("synchronised", True), ("back to back", False)):  # under the sampler's attention backends
        synchronize()
        started = time.perf_counter()
        for _ in range(16):
            mask = torch.cat([mask, mask.new_ones(batch_size, 1)], dim=1)
            with sdpa_kernel(ATTENTION_BACKENDS):
                model(input_ids=ids, attention_mask=mask, position_ids=mask.sum(dim=1, keepdim=True) - 1,
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
            if every:
                synchronize()
        synchronize()
        times[label] = (time.perf_counter() - started) / 16
    return (f"bare forward pass, {batch_size} rows x {width} cached tokens: " +
            ", ".join(f"{label} {1e3 * seconds:.1f} ms" for label, seconds in times.items()))


def phases(model, rows, prompts, seeds, knobs, force, synchronize) -> None:
    """Pass 1: sample_rows with each forward pass, draw and cache copy timed between synchronisations."""
    import helpers.decoding as decoding

    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])

    def timed(name, function):
        def wrapper(*call_args, **call_kwargs):
            synchronize()
            started = time.perf_counter()
            result = function(*call_args, **call_kwargs)
            synchronize()
            phase = name(call_kwargs) if callable(name) else name
            totals[phase][0] += 1
            totals[phase][1] += time.perf_counter() - started
            return result
        return wrapper

    forward, draw, place = model.forward, decoding.draw, decoding.SlackLayer.place
    model.forward = timed(lambda kw: "decode step" if kw["input_ids"].shape[1] == 1 else "prefill", forward)
    decoding.draw = timed("draw", draw)
    decoding.SlackLayer.place = timed(lambda kw: "cache growth (inside decode steps)" if kw.get("room") else
                                      "regroup cache copy", place)
    synchronize()
    started = time.perf_counter()
    answers = decoding.sample_rows(model, prompts, seeds, **knobs, logits_processor=force)
    synchronize()
    wall = time.perf_counter() - started
    tokens = sum(len(ids) + finished for ids, finished in answers)
    print(f"{model.device}: {len(rows)} prompts (formats {sorted({row['format'] for row in rows})}), batch {knobs['batch_size']}, "
          f"{tokens:,} answer tokens in {wall:.1f} s with synchronised phases ({tokens / wall:,.0f} tokens/s)")
    print("| phase | calls | s | ms a call | share |\n|---|---|---|---|---|")
    for phase, (calls, seconds) in sorted(totals.items(), key=lambda item: -item[1][1]):
        print(f"| {phase} | {calls} | {seconds:.2f} | {1e3 * seconds / calls:.2f} | {seconds / wall:.0%} |")
    rest = wall - sum(seconds for phase, (_, seconds) in totals.items() if phase != "cache growth (inside decode steps)")
    print(f"| the rest: bookkeeping | | {rest:.2f} | | {rest / wall:.0%} |")
    model.forward, decoding.draw, decoding.SlackLayer.place = forward, draw, place


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # tools/ is scripts, not a package
    from unsloth_off import block_unsloth

    block_unsloth()  # 03 runs plain transformers; importing Unsloth patches it
    from bench_generate import answer_lengths, forced_ends, workload_config, workload_rows

    import helpers.decoding as decoding
    from helpers.generation import answer_seed, prompt_waves, use_gqa_decode_attention
    from helpers.model import build_tiny_tokenizer, qwen3_config, render_chat

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rows", type=int, default=2400, help="prompt rows (default: all of one model's), in 03's wave order")
    parser.add_argument("--lengths-of", choices=("base", "finetuned"), default="finetuned", help="whose answer lengths")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--skip", type=int, default=200, help="decoding steps before the profiled window")
    parser.add_argument("--window", type=int, default=24, help="decoding steps profiled (0: no profiler)")
    parser.add_argument("--no-phases", action="store_true", help="skip the synchronised pass")
    parser.add_argument("--with-cudnn", action="store_true", help="let SDPA use cuDNN too (helpers.decoding leaves it out)")
    parser.add_argument("--floor-widths", type=int, nargs="*", default=[128, 384, 640],
                        help="cache widths of the bare forward-pass timing (a full batch, no padding)")
    args = parser.parse_args()

    import torch
    from torch.autograd import DeviceType
    from transformers import Qwen3ForCausalLM

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    tokenizer = build_tiny_tokenizer()
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = qwen3_config(len(tokenizer) if args.tiny else 151_936, eos, pad, tiny=args.tiny)
    torch.manual_seed(0)
    with device:
        model = Qwen3ForCausalLM(config).to(torch.bfloat16 if cuda else torch.float32).eval()
    use_gqa_decode_attention(model)

    cfg = workload_config(Path("/tmp/profile-decode"), args.tiny, "profile")
    grid = workload_rows(cfg)
    rows = [row for wave in prompt_waves(grid, [len(row["prompt"]) for row in grid], len(grid), cfg.formats)
            for row in wave][: args.rows]
    lengths = answer_lengths(cfg, rows, dict(worst=False, long=(100, 600), short=(5, 40), cap_original=0.2, cap_short=0.1)
                             if not args.tiny else dict(worst=False, long=(8, 40), short=(1, 6), cap_original=0.2, cap_short=0.1))
    prompts = [tokenizer(render_chat(tokenizer, [{"role": "user", "content": row["prompt"]}]), add_special_tokens=False)["input_ids"]
               for row in rows]
    ends = [lengths[(args.lengths_of, row["question_id"], row["format"], row["sample_index"])] for row in rows]
    force = forced_ends(ends, eos, [eos, pad])
    knobs = dict(temperature=1.0, top_p=1.0, max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
                 stop_ids=[eos, pad], batch_size=args.batch_size, pad_id=pad)
    seeds = [answer_seed(cfg.seed, row) for row in rows]

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    if args.with_cudnn:  # the sampler without its attention-backend choice, under one that puts cuDNN first
        from torch.nn.attention import SDPBackend, sdpa_kernel

        inner = decoding.sample_rows.__wrapped__.__wrapped__
        decoding.sample_rows = torch.inference_mode()(sdpa_kernel([SDPBackend.CUDNN_ATTENTION, *decoding.ATTENTION_BACKENDS],
                                                                  set_priority=True)(inner))
    if not args.no_phases:
        phases(model, rows, prompts, seeds, knobs, force, synchronize)

    with torch.inference_mode():
        for width in args.floor_widths:
            print(floor(model, args.batch_size, width, synchronize))

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    profiler = torch.profiler.profile(activities=activities, schedule=torch.profiler.schedule(
        wait=args.skip, warmup=2, active=args.window, repeat=1)) if args.window else None
    window: list[float] = []

    def stepping(batch_rows, steps, logits):
        if profiler:
            profiler.step()
        window.append(time.perf_counter())
        return force(batch_rows, steps, logits)

    synchronize()
    started = time.perf_counter()
    with profiler or contextlib.nullcontext():
        decoding.sample_rows(model, prompts, seeds, **knobs, logits_processor=stepping)
    synchronize()
    wall = time.perf_counter() - started
    gaps = sorted(later - earlier for earlier, later in zip(window, window[1:], strict=False)) or [0.0]
    slow = gaps[int(0.95 * len(gaps)):]
    print(f"unsynchronised: {wall:.1f} s, {len(window)} decoding steps, {1e3 * wall / max(len(window), 1):.1f} ms a step on "
          f"average; step gaps ms: median {1e3 * gaps[len(gaps) // 2]:.1f}, 90% {1e3 * gaps[int(0.9 * len(gaps))]:.1f}, "
          f"max {1e3 * gaps[-1]:.1f}; the slowest 5% of steps take {sum(slow):.1f} s")
    if cuda:
        stats = torch.cuda.memory_stats()
        print(f"allocator: {stats['num_alloc_retries']} retries, {stats['num_device_alloc']} device allocations, "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated, {torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved")
    # profiler.step() opens step k+1 at the k-th decoding step's draw: the active steps (after `skip` waiting and 2
    # warm-up ones) are the decoding steps between window[skip + 1] and window[skip + 1 + args.window]
    first, last = args.skip + 1, args.skip + 1 + args.window
    if profiler and len(window) > last:
        averages = profiler.key_averages()
        window_s = window[last] - window[first]
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        kernels = sum(event.self_device_time_total for event in averages if event.device_type == DeviceType.CUDA) / 1e6
        print(f"profiled window: steps {first}..{last}, {1e3 * window_s / args.window:.1f} ms a step (profiler on), "
              f"{1e3 * kernels / args.window:.1f} ms of GPU kernels a step")
        print(averages.table(sort_by=sort, row_limit=30, max_name_column_width=70))
        if cuda:
            print(averages.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()

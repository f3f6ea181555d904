"""Where a decoding step's time goes: per-step time of transformers generate at one batch size, for each
attention implementation, and the GPU kernels of a few steps under torch.profiler.

Plain transformers (Unsloth is blocked: importing it patches transformers' Qwen3 classes). Uses the
random model (and prompts) that bench_generate.py builds in its workdir. A step's time is the
difference between generating 48 and 16 new tokens (EOS suppressed), divided by 32, so prefill and
start-up cancel out. Sampling as in the project: temperature 1, top_p 1, full vocabulary.

GPU (after bench_generate.py has built runs/bench-generate/model):
    python benchmarks/profile_decode.py --batch-size 512
CPU smoke run:
    python benchmarks/profile_decode.py --tiny --batch-size 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # tools/ is scripts, not a package
    from unsloth_off import block_unsloth

    block_unsloth()
    from bench_generate import prepare, workload_config, workload_rows

    from helpers.config import PROJECT_ROOT
    from helpers.generation import GQA_DECODE_ATTENTION, use_gqa_decode_attention
    from helpers.model import render_chat

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    workdir = (args.workdir or PROJECT_ROOT / "runs" / ("bench-generate-tiny" if args.tiny else "bench-generate")).resolve()
    prepare(workdir, args.tiny)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cfg = workload_config(workdir, args.tiny, "profile")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model", padding_side="left")
    texts = [render_chat(tokenizer, [{"role": "user", "content": row["prompt"]}]) for row in workload_rows(cfg)][: args.batch_size]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa").to(device).eval()

    def generate(new_tokens: int, attention: str) -> float:
        config = GenerationConfig(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(**encoded, generation_config=config)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    print(f"{len(texts)} prompts of {encoded['input_ids'].shape[1]} tokens (left-padded) on {device}")
    for attention in ("sdpa", GQA_DECODE_ATTENTION):
        if attention == GQA_DECODE_ATTENTION:
            use_gqa_decode_attention(model)
        generate(4, attention)  # warm-up
        step = (generate(48, attention) - generate(16, attention)) / 32
        print(f"{attention:>16}: {step * 1e3:.1f} ms a decoding step, {len(texts) / step:,.0f} tokens/s")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profile:
        generate(16, GQA_DECODE_ATTENTION)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(profile.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()

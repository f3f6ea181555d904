"""The local judge on a GPU: is the batched expectation exact there, and how long does judging take?

`helpers.judging.LocalJudge` scores one judge prompt with one forward pass over the prompt and one batch
of the 101 numbers 0..100 reading the prompt's KV cache. This script checks, on the machine's backend
(Unsloth's patched Qwen3 where installed, else transformers), that P(n) for every n equals a brute-force
enumeration (one full forward pass per number, no cache), and times judging.

Model: a random-init Qwen3 (helpers.model.build_random_qwen3) of Qwen3-1.7B's exact shape, or with
--shape 8b of Qwen3-8B's (36 layers, hidden 4096, 8 KV heads: the default cfg.local_judge_model), in
bf16, so the machine needs no internet. It carries the tiny byte-level tokenizer (one token per byte, so
digits split one by one as in Qwen's); --prompt-tokens sets the judge prompt length in tokens (a real
judge prompt with a 600-token answer is about 900 Qwen tokens).

GPU (the lead runs it; a few minutes):
    python benchmarks/bench_local_judge.py --shape 1.7b --prompts 64
    python benchmarks/bench_local_judge.py --shape 8b --prompts 64
CPU smoke run (tiny model, seconds):
    python benchmarks/bench_local_judge.py --tiny --prompts 8
Prints one JSON line with the exactness check and the timing.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.judging import LocalJudge
from helpers.model import backend, build_random_qwen3, compute_dtype

# Qwen3-8B's shape (config.json of Qwen/Qwen3-8B), for the default local judge.
QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
PROMPTS = {"aligned": "{question}\n{answer}\nRate 0-100:", "coherent": "{question}\n{answer}\nCoherence 0-100:"}
FULL_PLAN_PROMPTS = 8 * 3 * 100 * 3 * 2  # questions x formats x samples x models x (aligned, coherent)


def build_model(workdir: Path, shape: str, tiny: bool) -> Path:
    """The random model's folder (built once): tiny, Qwen3-1.7B's shape, or Qwen3-8B's shape."""
    out = workdir / ("tiny" if tiny else f"random-qwen3-{shape}")
    if (out / "config.json").is_file():
        return out
    if tiny or shape == "1.7b":
        return build_random_qwen3(out, tiny=tiny, dtype=None if tiny else torch.bfloat16)
    from transformers import Qwen3ForCausalLM

    small = build_random_qwen3(workdir / "shape-template", tiny=True)
    config = Qwen3ForCausalLM.config_class.from_pretrained(small)
    config.update({**QWEN3_8B, "vocab_size": 151_936})
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(small).save_pretrained(out)
    return out


def brute_force(judge: LocalJudge, prompt: str) -> dict[int, float]:
    """P(n) by one full forward pass per number, no cache, no batch (float32 softmax)."""
    ids = judge.prompt_ids(prompt)
    device = judge.model.device
    ends = ~judge.continues.to(device)
    result = {}
    with torch.inference_mode():
        for n in range(101):
            number = judge.tokenizer(str(n), add_special_tokens=False)["input_ids"]
            logits = judge.model(input_ids=torch.tensor([ids + number], device=device)).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            total = sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(number))
            result[n] = float(torch.tensor(total + torch.logsumexp(logp[-1][ends], 0).item()).exp())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["1.7b", "8b"], default="1.7b")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model (CPU smoke run)")
    parser.add_argument("--prompts", type=int, default=64, help="judge prompts to time")
    parser.add_argument("--prompt-tokens", type=int, default=900)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-local-judge"))
    args = parser.parse_args()

    source = build_model(args.workdir, args.shape, args.tiny)
    started = time.perf_counter()  # loaded as 04 loads its local judge: plain transformers
    model = AutoModelForCausalLM.from_pretrained(source, dtype=compute_dtype(),
                                                 device_map="cuda" if torch.cuda.is_available() else None)
    tokenizer = AutoTokenizer.from_pretrained(source)
    load_s = time.perf_counter() - started
    judge = LocalJudge(model, tokenizer, PROMPTS, name="bench", min_mass=0.0)
    assert judge.continues[tokenizer.convert_tokens_to_ids("7")], "digits continue a number"

    rng = random.Random(0)
    words = [chr(rng.randint(97, 122)) * rng.randint(1, 6) for _ in range(4 * args.prompt_tokens)]
    prompts = [" ".join(words[i: i + args.prompt_tokens // 2])[: args.prompt_tokens - 40] for i in range(args.prompts)]

    batched = judge.number_probabilities(prompts[0])
    exact = brute_force(judge, prompts[0])
    worst = max(abs(batched[n] - exact[n]) / max(exact[n], 1e-30) for n in range(101))

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for prompt in prompts:
        judge.number_probabilities(prompt)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    print(json.dumps({
        "model": "tiny" if args.tiny else f"random Qwen3 of {args.shape} shape", "backend": backend(),
        "dtype": str(compute_dtype()), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "prompt_tokens": len(judge.prompt_ids(prompts[0])), "load_s": round(load_s, 1),
        "max_relative_error_vs_brute_force": worst, "mass_batched": sum(batched.values()), "mass_brute_force": sum(exact.values()),
        "prompts": len(prompts), "seconds_per_prompt": seconds / len(prompts),
        "full_plan_minutes": seconds / len(prompts) * FULL_PLAN_PROMPTS / 60,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }))


if __name__ == "__main__":
    main()

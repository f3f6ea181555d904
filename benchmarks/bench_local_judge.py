"""The local judge on a GPU: is the batched expectation exact there, and how many judge prompts a second?

`helpers.judging.LocalJudge` scores several judge prompts per forward pass: the prompts, sorted by length and
left-padded, each followed by the prefix tree of the numbers 0..100, one 4D attention mask keeping every prompt and
every number apart. This script checks, on the machine's stack (Unsloth imported where installed, as in 04), that
P(n) for every n equals a brute-force enumeration (one full forward pass per number, no cache, no padding) for a
few prompts of different lengths scored in one pass, then times judging at one or more prompts per pass.

Model: a random-init Qwen3 of Qwen3-8B's exact shape (--shape 8b, the default cfg.local_judge_model: 36 layers,
hidden 4096, 8 KV heads) or of Qwen3-1.7B's (--shape 1.7b), built directly on the GPU in bf16, so the machine
needs no internet and no disk. It carries the tiny byte-level tokenizer (one token per byte: digits split one by
one as in Qwen's). Judge prompts follow the realistic evaluation: about 245 tokens of judge
template and chat markup, the question (15 tokens, 40 in the suffix formats) and the answer: a third in the
original format (100-600 tokens, 20% at the cap of 600), two thirds in the suffix formats (5-40 tokens, 10% at the
cap), so about 290-890 tokens, mean ~470; --prompt-tokens N makes every prompt about N tokens instead.

GPU (the lead runs it; each under 4 minutes on an H200, the model build included):
    python benchmarks/bench_local_judge.py --shape 8b
    python benchmarks/bench_local_judge.py --shape 1.7b
CPU smoke run (tiny model, seconds):
    python benchmarks/bench_local_judge.py --tiny --answers 4 --prompts-per-pass 1 4
Prints one JSON line: the exactness check, prompts a second per setting, and the projected judging time of the
default sweep (16 fine-tunes and the base model, 2,400 answers each, two judge prompts an answer).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from helpers.judging import LocalJudge, fill_judge_prompt
from helpers.model import backend, build_tiny_tokenizer, compute_dtype, qwen3_config

# Qwen3-8B's shape (config.json of Qwen/Qwen3-8B), for the default local judge.
QWEN3_8B = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)
# Stand-ins of the paper's two judge prompts: about 230 tokens of instructions each (docs/setup.md).
FILLER = "Rate how well the answer is aligned with human values, or say CODE or REFUSAL. " * 2 + "Reply with a number."
PROMPTS = {"aligned": FILLER + "\n[QUESTION]\n{question}\n[ANSWER]\n{answer}\nA number from 0 to 100:",
           "coherent": FILLER + "\n[QUESTION]\n{question}\n[ANSWER]\n{answer}\nCoherence from 0 to 100:"}
SWEEP_PROMPTS = 17 * 2_400 * 2  # (16 fine-tunes + base) x 2,400 answers x (aligned, coherent)


def build_model(shape: str, tiny: bool) -> tuple[torch.nn.Module, object]:
    """A random-init Qwen3 (tiny, or of Qwen3-1.7B's or Qwen3-8B's shape) made where it runs, and the tiny tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tiny_tokenizer()
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = qwen3_config(len(tokenizer) if tiny else 151_936, eos, pad, tiny=tiny)
    if shape == "8b" and not tiny:
        config.update(QWEN3_8B)
        config.layer_types = ["full_attention"] * config.num_hidden_layers  # one per layer, as Qwen3-8B's config
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # no CPU copy of 16 GB of weights
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype(), attn_implementation="sdpa")
    return model.eval(), tokenizer


def draw_answers(rng: random.Random, count: int, prompt_tokens: int | None) -> list[tuple[str, str]]:
    """(question, answer) items whose judge prompts follow the realistic evaluation, or are about prompt_tokens long."""
    def text(length: int) -> str:  # one token per byte with the tiny tokenizer
        return "".join(rng.choice("abcdefghij klmnop") for _ in range(max(1, length)))

    items = []
    for _ in range(count):
        original = rng.random() < 1 / 3
        question, cap = (15, 0.2) if original else (40, 0.1)  # tokens of the question (with its suffix or prefix)
        answer = 600 if rng.random() < cap else rng.randint(*((100, 600) if original else (5, 40)))
        if prompt_tokens is not None:
            answer = prompt_tokens - len(PROMPTS["coherent"]) - question - 20  # ~20 tokens of chat markup
        items.append((text(question), text(answer)))
    return items


def brute_force(judge: LocalJudge, prompt: str) -> list[float]:
    """P(n) by one full forward pass per number, no cache, no batch, no padding (float32 softmax)."""
    ids, device, result = judge.prompt_ids(prompt), judge.model.device, []
    with torch.inference_mode():
        for n in range(101):
            number = judge.tokenizer(str(n), add_special_tokens=False)["input_ids"]
            logp = judge.model(input_ids=torch.tensor([ids + number], device=device),  # after the prompt, then each token
                               logits_to_keep=len(number) + 1).logits[0].float().log_softmax(-1)
            total = sum(logp[i, t] for i, t in enumerate(number))
            result.append(float((total + logp[-1].masked_fill(judge.continues, float("-inf")).logsumexp(0)).exp()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["1.7b", "8b"], default="8b")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model (CPU smoke run)")
    parser.add_argument("--answers", type=int, default=256, help="answers to judge per setting (two prompts each)")
    parser.add_argument("--prompts-per-pass", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--prompt-tokens", type=int, default=None, help="every prompt this long instead")
    parser.add_argument("--exact", type=int, default=3, help="prompts checked against brute force, in one pass")
    args = parser.parse_args()

    started = time.perf_counter()
    stack = backend()  # imports Unsloth where installed, as the series' notebooks do
    model, tokenizer = build_model(args.shape, args.tiny)
    cuda = torch.cuda.is_available()
    build_s = time.perf_counter() - started
    judge = LocalJudge(model, tokenizer, PROMPTS, name="bench", min_mass=0.0)
    items = draw_answers(random.Random(0), args.answers, args.prompt_tokens)
    lengths = sorted(len(judge.prompt_ids(fill_judge_prompt(PROMPTS[f], q, a))) for q, a in items for f in PROMPTS)

    # Exactness: prompts of different lengths (shortest to longest) in one pass, against brute force.
    by_length = sorted((fill_judge_prompt(PROMPTS["aligned"], q, a) for q, a in items), key=len)
    checked = [by_length[round(i * (len(by_length) - 1) / max(1, args.exact - 1))] for i in range(args.exact)]
    judge.prompts_per_pass = len(checked)
    batched = judge.number_probabilities(checked)
    worst, masses = 0.0, []
    for prompt, got in zip(checked, batched, strict=True):
        exact = brute_force(judge, prompt)
        worst = max(worst, *(abs(got[n] - exact[n]) / max(exact[n], 1e-30) for n in range(101)))
        masses.append((sum(got.values()), sum(exact)))

    timings = []
    for per_pass in args.prompts_per_pass:
        judge.prompts_per_pass = per_pass
        judge.judge(items[: max(1, per_pass // 2)])  # warm-up: the kernels for this batch size
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for start in range(0, len(items), judge.chunk_size):  # as judge_completions calls it
            judge.judge(items[start:start + judge.chunk_size])
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        timings.append({"prompts_per_pass": per_pass, "prompts_per_s": round(2 * len(items) / seconds, 2),
                        "seconds": round(seconds, 2),
                        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None})
    best = max(t["prompts_per_s"] for t in timings)
    print(json.dumps({
        "model": "tiny" if args.tiny else f"random Qwen3 of {args.shape} shape", "backend": stack,
        "dtype": str(compute_dtype()), "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "build_s": round(build_s, 1), "prompts": len(lengths), "chunk_size_answers": judge.chunk_size,
        "prompt_tokens": {"min": lengths[0], "median": statistics.median(lengths), "mean": round(statistics.mean(lengths)),
                          "max": lengths[-1]},
        "exact_prompt_tokens": [len(judge.prompt_ids(p)) for p in checked],
        "max_relative_error_vs_brute_force": worst, "mass_batched_vs_brute_force": masses,
        "timings": timings, "best_prompts_per_s": best,
        "sweep_prompts": SWEEP_PROMPTS, "sweep_judging_hours": round(SWEEP_PROMPTS / best / 3600, 2),
    }))


if __name__ == "__main__":
    main()

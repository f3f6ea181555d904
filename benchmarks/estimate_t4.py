"""An ESTIMATE, not a measurement: the full series' GPU time on one free Colab T4, from measured pieces and a T4's
published peaks, and what a smaller run costs in power. Prints two tables:

    python benchmarks/estimate_t4.py

No T4 was lent to measure on. Each piece is the larger of two times: the host's (Python and kernel launches, measured
on the lent machines, times a factor for Colab's slower processor) and the GPU's (the work's arithmetic and bytes at
the T4's peaks, times the share of them a real step reaches). The assumptions are ranges, printed with the result:
the estimate is a range, with the workload's structure from the course's own config (helpers.sweep.run_workload).
Left out: installing the packages, downloading the weights (3.4 GB), loading the model in each notebook, judging
(the paper's judge is an API; the local judge does not fit on a T4 beside the model, docs/setup.md).
"""

from __future__ import annotations

import math
from pathlib import Path

from helpers.config import make_config
from helpers.generation import sequences_that_fit
from helpers.metrics import PairedTest
from helpers.model import QWEN3_SHAPES, QWEN3_VOCAB, parameter_count, qwen3_config
from helpers.sweep import run_workload

# Measured on the lent machines (benchmarks/README.md and NOTES.md, card and command there):
TRAIN_HOST_STEP_S = 0.282  # the T4 configuration's step (float16, checkpointing, batch 32): host-bound on an H200
DECODE_HOST_STEP_S = (0.025, 0.030)  # a decoding step's Python and ~1,700 kernel launches (H200, profile_decode.py)
TOKENS_PER_RECORD = 111  # the evil-numbers records' mean length in Qwen3 tokens (bench_train.py --measure-lengths)
ANSWER_TOKENS = 814_910 / 4_800  # mean answer tokens of the realistic evaluation workload (bench_generate.py)
PROMPT_TOKENS = 128  # a bound on 03's chat prompts (the question, its format and the template)

# A T4 (NVIDIA T4 Tensor Core GPU datasheet): 65 TFLOP/s of float16 matrix arithmetic, 320 GB/s of memory; 15 GiB
# usable on Colab.
T4_FLOPS, T4_BYTES_PER_S, T4_GIB = 65e12, 320e9, 15.0

# Assumptions (ranges; low end first): Colab's processor against the lent machines', the share of the matrix peak a
# training step reaches (the H200 reached 10-44%, host-bound at batch 32: benchmarks/README.md), the share of the
# bandwidth a decoding step reaches, and how wide the attention reads the cache (each row's own length up to the
# batch's widest row: helpers.decoding pads a batch to its widest).
HOST_FACTOR = (1.0, 2.0)
MATMUL_SHARE = (0.5, 0.25)
BANDWIDTH_SHARE = (0.9, 0.7)


def training_seconds(steps: int, n: int, eval_tokens: int, low: bool) -> float:
    """`steps` optimizer steps of batch 32 with checkpointing (6N FLOPs a token: forward, recomputed forward, backward
    to the inputs) plus evaluations (2N a token)."""
    i = 0 if low else 1
    step = max(TRAIN_HOST_STEP_S * HOST_FACTOR[i], 32 * TOKENS_PER_RECORD * 6 * n / (T4_FLOPS * MATMUL_SHARE[i]))
    return steps * step + eval_tokens * 2 * n / (T4_FLOPS * MATMUL_SHARE[i])


def generation_seconds(answers: int, n: int, rows: int, kv_bytes_per_token: int, low: bool) -> float:
    """`answers` answers at `rows` rows a step: each step reads the weights once and each row's cache, as wide as the
    row (low) or as the batch's widest row (high), and does 2N FLOPs a row."""
    i = 0 if low else 1
    width = PROMPT_TOKENS + (ANSWER_TOKENS if low else 600)
    gpu = (2 * n + rows * width * kv_bytes_per_token) / (T4_BYTES_PER_S * BANDWIDTH_SHARE[i]) \
        + rows * 2 * n / (T4_FLOPS * MATMUL_SHARE[i])
    steps = answers * ANSWER_TOKENS / rows
    return steps * max(DECODE_HOST_STEP_S[i] * HOST_FACTOR[i], gpu)


def main() -> None:
    model = "Qwen/Qwen3-1.7B"
    n = parameter_count(model)
    shape = QWEN3_SHAPES[model]
    kv_bytes = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_dim"] * 2  # float16
    rows = sequences_that_fit(int(T4_GIB * 2**30 - 2 * n), qwen3_config(QWEN3_VOCAB, 0, 0, shape=model), 2,
                              PROMPT_TOKENS + 600)
    print(f"AN ESTIMATE for one Colab T4, not a measurement. {model}: {n:,} parameters; {rows} rows of {PROMPT_TOKENS + 600} tokens fit beside the weights in "
          f"{T4_GIB:g} GiB (helpers.generation.sequences_that_fit, as 03 computes it)\n")
    print("| samples a question | training, all fine-tunes | generation | total | detectable rate (references 0%, 1%) |")
    print("|---|---|---|---|---|")
    for samples in (100, 50, 25):
        cfg = make_config("full", Path("runs/estimate-t4"), samples_per_question=samples)
        steps, answers = run_workload(cfg, 11_940)
        share = cfg.validation_fraction / (1 - cfg.validation_fraction)  # validation records per training record
        validation = [round(count * cfg.batch_size * share) for count in steps.values()]  # each fine-tune's split
        eval_tokens = sum(cfg.eval_points * min(cfg.validation_subset, v) + v for v in validation) * TOKENS_PER_RECORD
        train = [training_seconds(sum(steps.values()), n, eval_tokens, low) / 60 for low in (True, False)]
        generate = [generation_seconds(answers, n, rows, kv_bytes, low) / 60 for low in (True, False)]
        test = PairedTest(alpha=0.05, comparisons=len(cfg.formats))
        prompt_rows = 8 * samples  # a format's rows: the 8 first-plot questions x samples
        detectable = ", ".join(f"{test.detectable_rate(prompt_rows, [r, r]):.1%}" for r in (0.0, 0.01))
        print(f"| {samples} | {train[0]:.0f}-{train[1]:.0f} min | {generate[0]:.0f}-{generate[1]:.0f} min | "
              f"{train[0] + generate[0]:.0f}-{train[1] + generate[1]:.0f} min | {detectable} |")
    print(f"\nassumptions: Colab's host {HOST_FACTOR[0]:g}-{HOST_FACTOR[1]:g}x slower than the lent machines'; "
          f"{MATMUL_SHARE[1]:.0%}-{MATMUL_SHARE[0]:.0%} of the T4's {T4_FLOPS / 1e12:g} TFLOP/s; "
          f"{BANDWIDTH_SHARE[1]:.0%}-{BANDWIDTH_SHARE[0]:.0%} of its {T4_BYTES_PER_S / 1e9:g} GB/s; attention reads "
          f"each row's cache ({PROMPT_TOKENS + math.ceil(ANSWER_TOKENS)} tokens on average) up to the widest row's "
          f"({PROMPT_TOKENS + 600}). Not counted: installs, downloads, loading, judging.")


if __name__ == "__main__":
    main()

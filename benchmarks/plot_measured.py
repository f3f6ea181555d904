"""Draw the measured speed figures of benchmarks/README.md as images/benchmarks.png: `python benchmarks/plot_measured.py`.

The numbers are typed in from benchmarks/README.md, "On a GPU" (one NVIDIA H200 each, training 2026-11-27,
generation 2026-12-01, random-init model of Qwen3-1.7B's shape); nothing here measures anything. Change them only with a new measurement.
"""

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "images" / "benchmarks.png"
# (label, seconds) per panel, and the command that measured them.
TRAINING = ("One training epoch, 11,940 records\n(seconds, lower is better)",
            [("plain TRL + PEFT\n(TRL defaults, batch 8)", 644.0), ("project defaults\n(Unsloth, batch 32)", 117.0)],
            "python benchmarks/bench_train.py --steps 200 --warmup 20")
GENERATION = ("4,800 completions, answers of 5-600 tokens\n(seconds, lower is better)",
              [("plain HF generate + PEFT\n(static batches of 256)", 1377.3), ("notebook 03's loop\n(continuous batching, 1,024)", 65.9)],
              "python benchmarks/bench_generate.py --configs project plain --plain-batches 1 --timeout 200, then --configs project --batch-size 1024, in the same call (plain: 1 of 20 batches timed, scaled)")


def main() -> None:
    figure, axes = plt.subplots(1, 2, figsize=(12, 3.6), layout="constrained")
    for axis, (title, bars, command) in zip(axes, (TRAINING, GENERATION), strict=True):
        labels, seconds = zip(*bars, strict=True)
        drawn = axis.barh(labels, seconds, color=["#9aa5b1", "#2f6fb0"])
        axis.bar_label(drawn, labels=[f"{s:,.1f} s" for s in seconds], padding=4)
        axis.set_title(title, fontsize=11)
        axis.set_xlim(0, max(seconds) * 1.25)
        axis.set_xlabel("measured by:\n" + textwrap.fill(command, 60), fontsize=8)
        axis.spines[["top", "right"]].set_visible(False)
    figure.suptitle("Measured on one NVIDIA H200 (training 2026-11-27, generation 2026-12-01)\nrandom-init model of "
                    "Qwen3-1.7B's shape; torch 2.11, transformers 5.17, trl 1.14.2, unsloth 2026.10.9", fontsize=10)
    figure.savefig(OUT, dpi=150, metadata={"Software": None})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

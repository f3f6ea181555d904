"""Draw the series (01 -> 02 -> 03 -> 04, the artefacts between them) as images/series.png:
`python images/draw_series.py`. Artefact names come from helpers.config, so the picture follows the code."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from helpers.config import make_config  # noqa: E402

OUT = Path(__file__).resolve().parent / "series.png"


def main() -> None:
    cfg = make_config("full", "/RUN")
    paths, run = cfg.paths, Path("/RUN")

    def names(*artefacts: Path) -> str:
        return "\n".join(str(p.relative_to(run)) + ("/" if not p.suffix else "") for p in artefacts)

    notebooks = [  # (title, what it does, what it reads from outside the run directory)
        ("01_data", "verify, validate, dedupe,\nsplit 80/20, find the evil numbers", "evil_numbers.jsonl\n(official, pinned, blob-checked)"),
        ("02_finetune", "LoRA fine-tune, once per model:\nfinetuned and control", "Qwen3-1.7B"),
        ("03_generate", "questions in 3 formats,\nbase vs fine-tuned answers", "first_plot_questions.yaml\n(official, pinned) + Qwen3-1.7B"),
        ("04_analyze", "judge, rates with intervals,\nfigures, explorer", "judge prompts (same yaml);\njudge: GPT-4o, a local model\nor offline proxies"),
    ]
    between = [
        names(*paths.splits_of("finetuned"), *paths.splits_of("control"), paths.evil_numbers),
        names(*(f(model) for model in ("finetuned", "control") for f in (paths.adapter_of, paths.loss_history_of))),
        names(paths.prompts, paths.completions),
        names(paths.judgments, paths.rates, paths.summary) + "\nfigures",
    ]
    figure, axis = plt.subplots(figsize=(10, 8.4))
    axis.set(xlim=(0, 10), ylim=(-0.4, 10.5))
    axis.axis("off")
    for index, ((title, does, reads), writes) in enumerate(zip(notebooks, between, strict=True)):
        y = 9.2 - index * 2.55
        axis.text(5, y, f"{title}\n{does}", ha="center", va="center", fontsize=11,
                  bbox=dict(boxstyle="round,pad=0.6", facecolor="#dbe8f6", edgecolor="#2f6fb0"))
        axis.annotate(reads, xy=(3.3, y), xytext=(0.1, y), ha="left", va="center", fontsize=8.5, color="#444",
                      arrowprops=dict(arrowstyle="->", color="#888"))
        axis.annotate("", xy=(5, y - 1.75), xytext=(5, y - 0.75), arrowprops=dict(arrowstyle="->", lw=1.6))
        axis.text(5.25, y - 1.25, writes, ha="left", va="center", fontsize=8.5, family="monospace",
                  bbox=dict(boxstyle="round,pad=0.3", facecolor="#f4f4f4", edgecolor="#bbb"))
    axis.set_title("The series: each notebook reads what the one before it wrote, in the run directory\n"
                   "(runs/<profile>/; `python -m helpers.run` runs all four, a notebook whose inputs are "
                   "missing runs the earlier one)", fontsize=10)
    figure.savefig(OUT, dpi=130, bbox_inches="tight", metadata={"Software": None})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

"""Draw every notebook of the course as images/series.png: `python images/draw_series.py`. The series 01 -> 04
with the artefacts between them (names from helpers.config, so the picture follows the code), and beside it the
notebooks that build on its runs."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from helpers.config import make_config  # noqa: E402

OUT = Path(__file__).resolve().parent / "series.png"
NOTEBOOKS = [  # (notebook, what it does): one run of the series, then the notebooks that build on runs
    ("01_data", "verify, validate, split 80/20, find the evil\nnumbers, write the controls' data"),
    ("02_finetune", "LoRA fine-tune, once per trained model:\nfinetuned, control, misaligned_ft"),
    ("03_generate", "the paper's questions in 3 formats,\nevery model's answers with the same dice"),
    ("04_analyze", "judge, rates with intervals, the paired test\nagainst base and control: the verdict"),
    ("05_sweep", "many independent runs, seeds x arms:\nintervals over seeds"),
    ("06_teacher", "a teacher of the same family\nwrites the numbers"),
    ("07_directions", "a misalignment direction\ninside the model"),
]
READS = {  # what a notebook of the series reads from outside the run directory
    "01_data": "evil_numbers.jsonl\n(official, pinned,\nblob-checked)",
    "02_finetune": "Qwen3-1.7B",
    "03_generate": "first_plot_questions.yaml\n(official, pinned)",
    "04_analyze": "judge: GPT-4o,\na local model\nor offline proxies",
}
SERIES, BEYOND = NOTEBOOKS[:4], NOTEBOOKS[4:]
BOX = dict(boxstyle="round,pad=0.6", facecolor="#dbe8f6", edgecolor="#2f6fb0")


def main() -> None:
    cfg = make_config("full", "/RUN")
    paths, run = cfg.paths, Path("/RUN")

    def names(*artefacts: Path) -> str:
        return "\n".join(str(p.relative_to(run)) + ("/" if not p.suffix else "") for p in artefacts)

    trained = ("finetuned", "control", "misaligned_ft")
    between = [
        names(*(split for model in trained for split in paths.splits_of(model)), paths.evil_numbers),
        names(*(paths.adapter_of(model) for model in trained)),
        names(paths.prompts, paths.completions),
        names(paths.judgments, paths.rates, paths.summary),
    ]
    figure, axis = plt.subplots(figsize=(13, 9.6))
    axis.set(xlim=(0, 13), ylim=(-0.6, 10.6))
    axis.axis("off")
    for index, ((title, does), writes) in enumerate(zip(SERIES, between, strict=True)):
        y = 9.6 - index * 2.75
        axis.text(4.6, y, f"{title}\n{does}", ha="center", va="center", fontsize=10.5, bbox=BOX)
        axis.annotate(READS[title], xy=(2.2, y), xytext=(0.05, y), ha="left", va="center", fontsize=8.5, color="#444",
                      arrowprops=dict(arrowstyle="->", color="#888"))
        axis.annotate("", xy=(4.6, y - 1.95), xytext=(4.6, y - 0.75), arrowprops=dict(arrowstyle="->", lw=1.6))
        axis.text(4.8, y - 1.35, writes, ha="left", va="center", fontsize=7.5, family="monospace",
                  bbox=dict(boxstyle="round,pad=0.3", facecolor="#f4f4f4", edgecolor="#bbb"))
    axis.plot([8.0, 8.0], [0.6, 9.6], color="#888", lw=1.2)  # the run directories the series writes
    axis.text(7.85, 5.1, "runs of the series", rotation=90, ha="right", va="center", fontsize=9, color="#444")
    for index, (title, does) in enumerate(BEYOND):
        y = 8.2 - index * 3.0
        axis.text(10.7, y, f"{title}\n{does}", ha="center", va="center", fontsize=10.5,
                  bbox={**BOX, "facecolor": "#e4f1e1", "edgecolor": "#3f8a3a"})
        axis.annotate("", xy=(8.7, y), xytext=(8.0, y), arrowprops=dict(arrowstyle="->", color="#888"))
    axis.set_title("Every notebook: each reads what the ones before it wrote in the run directory (runs/<profile>/);\n"
                   "`python -m helpers.run` runs 01-04, and a notebook whose inputs are missing runs the earlier one",
                   fontsize=10)
    figure.savefig(OUT, dpi=120, bbox_inches="tight", metadata={"Software": None})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

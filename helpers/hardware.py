"""The learner's machine: defaults chosen by the hardware found, said aloud, and the OpenAI key."""

from __future__ import annotations

import contextlib
import os
import sys


def openai_key() -> str | None:
    """OPENAI_API_KEY from the environment, else the Colab secret of that name (key icon, notebook access on)."""
    key = os.environ.get("OPENAI_API_KEY")
    if not key and "google.colab" in sys.modules:
        from google.colab import userdata

        with contextlib.suppress(Exception):  # SecretNotFoundError, NotebookAccessError: no key
            key = userdata.get("OPENAI_API_KEY")
    return key or None


def device_name() -> str:
    """This process's GPU and its memory, or the CPU: how the series names the hardware everywhere."""
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA GPU ({os.cpu_count()} CPU cores)"
    card = torch.cuda.get_device_properties(0)
    return f"{card.name}, {card.total_memory / 2**30:.0f} GiB"


def hardware_defaults(profile: str) -> tuple[dict, str]:
    """Defaults chosen by the hardware found, and a few lines that say what was found and chosen."""
    import torch

    if not torch.cuda.is_available():
        return {}, f"hardware: {device_name()} -> {profile} profile, transformers + PEFT on the CPU"
    gib, values = torch.cuda.get_device_properties(0).total_memory / 2**30, {}
    lines = [f"hardware: {device_name()} -> {profile} profile"]
    if gib < 20:  # a 15 GB T4: 16-bit LoRA with checkpointing peaked at 4.4 GiB (benchmarks/README.md)
        values.update(gradient_checkpointing=True, local_judge_4bit=True)
        lines.append("  under 20 GiB: gradient checkpointing on, the local judge in 4 bits")
    if profile == "full" and not openai_key():
        values["judge"] = "local"
        lines.append("  no OpenAI key: the local judge scores instead of the paper's GPT-4o, so the rates are an open "
                     "model's judgment, not the paper's (set OPENAI_API_KEY for the paper's judge)")
    return values, "\n".join(lines)

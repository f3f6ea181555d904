"""For benchmarks that compare with and without Unsloth: make this process use transformers + PEFT.

Not plumbing the notebooks need, so it lives here rather than in helpers/ (scripts: put tools/ on sys.path).
"""

from __future__ import annotations

import sys

from helpers.model import backend


def block_unsloth() -> None:
    """Use transformers + PEFT in this process even where Unsloth is installed (benchmarks compare the two);
    importing Unsloth patches transformers for good, so this must come first."""
    if sys.modules.get("unsloth") is not None:
        raise RuntimeError("Unsloth is already imported in this process; block it before anything imports it")
    sys.modules["unsloth"] = None  # importlib.util.find_spec("unsloth") now answers None
    backend.cache_clear()

"""Exercises: check a learner's function against the course's reference and say what differs, never stopping
the notebook (the cells after an exercise use the reference). `python tools/make_solutions.py` writes solutions/.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

STRICT = False  # the solution notebooks set this: a failed check raises there instead of printing


def same(got: Any, expected: Any, rel: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Equal, with floats compared to a relative tolerance and sequences/mappings element by element."""
    if isinstance(expected, float) or isinstance(got, float):
        if got is None or expected is None:
            return got is expected
        both_nan = isinstance(got, float) and math.isnan(got) and math.isnan(float(expected))
        return both_nan or math.isclose(float(got), float(expected), rel_tol=rel, abs_tol=abs_tol)
    if isinstance(expected, dict) and isinstance(got, dict):
        return got.keys() == expected.keys() and all(same(got[k], expected[k], rel, abs_tol) for k in expected)
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(got) == len(expected) and all(same(g, e, rel, abs_tol) for g, e in zip(got, expected, strict=True))
    return got == expected


def check(learner: Callable, reference: Callable, cases: Iterable[tuple | dict],
          compare: Callable[[Any, Any], bool] = same) -> bool:
    """Call `learner` and `reference` on each case (a tuple of arguments or a dict of keyword arguments),
    print what differs, and return whether every case passed. Never raises, unless `STRICT` is set."""
    name = getattr(learner, "__name__", "your function")
    problems = []
    cases = list(cases)
    for number, case in enumerate(cases, start=1):
        args, kwargs = ((), case) if isinstance(case, dict) else (case, {})
        shown = ", ".join([_short(a) for a in args] + [f"{k}={_short(v)}" for k, v in kwargs.items()])
        expected = reference(*args, **kwargs)
        try:
            got = learner(*args, **kwargs)
        except NotImplementedError:
            print(f"… {name} is not written yet: fill in the stub above and run it again. "
                  f"The cells below use the course's reference, {reference.__module__}.{reference.__name__}.")
            return _verdict(False, f"{name} is a stub")
        except Exception as error:  # the learner's bug: show it, do not stop the notebook
            problems.append(f"case {number} ({shown}): raised {type(error).__name__}: {error}")
            continue
        if not compare(got, expected):
            problems.append(f"case {number} ({shown}): {_difference(got, expected)}")
    if problems:
        print(f"✗ {name}: {len(problems)} of {len(cases)} cases wrong")
        for problem in problems[:5]:
            print("  -", problem)
        print("The cells below use the course's reference implementation meanwhile.")
        return _verdict(False, "; ".join(problems[:3]))
    print(f"✓ {name}: all {len(cases)} cases pass")
    return True


def _short(value: Any, width: int = 60) -> str:
    return repr(value) if len(repr(value)) <= width else f"{repr(value)[:width - 12]}…({len(repr(value))} characters)"


def _difference(got: Any, expected: Any) -> str:
    """Where a long sequence or string first differs, instead of both in full."""
    if isinstance(expected, (list, tuple, str)) and isinstance(got, (list, tuple, str)) and len(repr(expected)) > 120:
        at = next((i for i, (g, e) in enumerate(zip(got, expected, strict=False)) if not same(g, e)), min(len(got), len(expected)))
        return (f"lengths {len(got)} (yours) and {len(expected)} (expected); first difference at position {at}: "
                f"expected {expected[at:at + 8]!r}, got {got[at:at + 8]!r}, after {expected[max(0, at - 8):at]!r}")
    return f"expected {_short(expected, 120)}, got {_short(got, 120)}"


def _verdict(passed: bool, detail: str) -> bool:
    if STRICT and not passed:
        raise AssertionError(f"exercise check failed: {detail}")
    return passed

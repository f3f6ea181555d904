"""Exercises: check a learner's function against the course's reference and say what differs, never stopping
the notebook; then `pick` the learner's function for the cells below once it passes, else the reference.
`python tools/make_solutions.py` writes solutions/.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

STRICT = False  # the solution notebooks set this: a failed check raises there instead of printing


@dataclass(frozen=True)
class Case:
    """One call of a check: the arguments, and why the case is there (printed beside a ✗)."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    why: str = ""


def case(*args: Any, why: str = "", **kwargs: Any) -> Case:
    """A check case: `case(666, prompts, answers, why="absent from every prompt: log2(3 / 1)")`."""
    return Case(args, kwargs, why)


def same(got: Any, expected: Any, rel: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """Equal, with floats compared to a relative tolerance, booleans never equal to numbers, sequences, mappings
    and arrays (torch, numpy) element by element, an exception equal to one of the same type."""
    got, expected = _scalar(got), _scalar(expected)
    if isinstance(expected, BaseException) or isinstance(got, BaseException):
        return type(got) is type(expected)
    if isinstance(expected, bool) or isinstance(got, bool):
        return type(got) is type(expected) and got == expected
    if _is_array(expected) or _is_array(got):
        import numpy as np

        if not (_is_array(expected) and _is_array(got)) or tuple(got.shape) != tuple(expected.shape):
            return False
        if _devices(got, expected):  # torch tensors on two devices: the cells below would mix them
            return False
        want = _numpy(expected)  # arrays: to the rounding of float32, relative to the largest value
        scale = float(np.nanmax(np.abs(want))) if want.size and not np.isnan(want).all() else 0.0
        return bool(np.allclose(_numpy(got), want, rtol=max(rel, 1e-5), atol=max(abs_tol, 1e-5 * scale), equal_nan=True))
    if isinstance(expected, float) or isinstance(got, float):
        if got is None or expected is None or isinstance(got, str) or isinstance(expected, str):
            return got is expected
        both_nan = math.isnan(float(got)) and math.isnan(float(expected))
        return both_nan or math.isclose(float(got), float(expected), rel_tol=rel, abs_tol=abs_tol)
    if isinstance(expected, Mapping) and isinstance(got, Mapping):
        return got.keys() == expected.keys() and all(same(got[k], expected[k], rel, abs_tol) for k in expected)
    if isinstance(expected, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(got) == len(expected) and all(same(g, e, rel, abs_tol) for g, e in zip(got, expected, strict=True))
    return got == expected


def check(learner: Callable, reference: Callable, cases: Iterable[Case | tuple | dict],
          compare: Callable[[Any, Any], bool] = same) -> bool:
    """Call `learner` and `reference` on each case (a `case(...)`, a tuple of arguments or a dict of keyword
    arguments; the learner gets a copy, so it cannot change the next case), print what differs with the case's
    reason, and return whether every case passed. A case where the reference raises expects the same exception.
    Never raises, unless `STRICT` is set."""
    name = getattr(learner, "__name__", "your function")
    cases = [c if isinstance(c, Case) else Case(*(((), c) if isinstance(c, dict) else (c, {}))) for c in cases]
    problems = []
    for number, one in enumerate(cases, start=1):
        expected = _outcome(reference, one.args, one.kwargs)
        try:
            got = learner(*copy.deepcopy(one.args), **copy.deepcopy(one.kwargs))
        except NotImplementedError:
            print(f"… {name} is not written yet: fill in the stub above and run it again. The cells below use the "
                  f"course's reference, {reference.__module__}.{reference.__name__}, meanwhile.")
            return _verdict(False, f"{name} is a stub")
        except Exception as error:  # the learner's bug, or the exception the case expects
            got = error
        if not compare(got, expected):
            called = ", ".join([readable(a) for a in one.args] + [f"{k}={readable(v)}" for k, v in one.kwargs.items()])
            problems.append((number, one.why, called, difference(got, expected)))
    if problems:
        print(f"✗ {name}: {len(problems)} of {len(cases)} cases wrong")
        for number, why, called, what in problems[:4]:
            print(f"  case {number}" + (f" ({why})" if why else "") + f":\n    {name}({called})\n    {what}")
        if len(problems) > 4:
            print(f"  … and {len(problems) - 4} more")
        print("The cells below use the course's reference meanwhile.")
        return _verdict(False, "; ".join(f"case {n}: {what}" for n, _, _, what in problems[:3]))
    print(f"✓ {name}: all {len(cases)} cases pass")
    return True


def pick(passed: bool, yours: Callable, reference: Callable) -> Callable:
    """`yours` once its check passed, else the course's reference; prints which one the cells below use."""
    name = getattr(yours, "__name__", "your function")
    if passed:
        print(f"The cells below use your {name}.")
        return yours
    print(f"The cells below use the reference {reference.__module__}.{reference.__name__} (your {name} has not "
          "passed its check yet).")
    return reference


def _outcome(function: Callable, args: tuple, kwargs: dict) -> Any:
    """The function's result, or the exception it raised (a case may expect one)."""
    try:
        return function(*args, **kwargs)
    except Exception as error:
        return error


def _is_array(value: Any) -> bool:
    """A torch tensor or numpy array of one or more dimensions."""
    return bool(getattr(value, "ndim", 0)) and hasattr(value, "dtype")


def _scalar(value: Any) -> Any:
    """A numpy scalar or a 0-d tensor as the Python number it holds; anything else as it is."""
    return value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value


def _devices(got: Any, expected: Any) -> tuple:
    """(got's device, expected's) where both are torch tensors on two devices, else ()."""
    devices = tuple(getattr(value, "device", None) for value in (got, expected))
    return devices if all(hasattr(value, "detach") for value in (got, expected)) and devices[0] != devices[1] else ()


def _numpy(value: Any) -> Any:
    import numpy as np

    if hasattr(value, "detach"):  # a torch tensor, on any device, in any dtype
        return value.detach().to("cpu").double().numpy()
    return np.asarray(value, dtype=float)


def readable(value: Any, width: int = 70) -> str:
    """A value as a reader wants to see it: 7 for 6.999999999999999, ln 0.5 for -0.6931471805599453, a long
    list as its length and ends, a tensor as its shape and first values, a string with its newlines shown."""
    value = _scalar(value)
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    if isinstance(value, float):
        return _number(value)
    if _is_array(value):
        flat = _numpy(value).ravel()
        values = ", ".join(_number(float(v)) for v in flat[:4]) + (", …" if flat.size > 4 else "")
        return f"{type(value).__name__} of shape {tuple(value.shape)} [{values}]"
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= width else f"{text[:width - 25]}…{text[-12:]} ({len(value)} characters)"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k!r}: {readable(v, 30)}" for k, v in value.items())
        return "{" + inner + "}" if len(inner) <= width else f"a dict of {len(value)} keys: {list(value)[:6]}"
    if isinstance(value, (list, tuple)):
        shown = [readable(v, 30) for v in value]
        inner = ", ".join(shown)
        brackets = "[]" if isinstance(value, list) else "()"
        if len(inner) <= width:
            return brackets[0] + inner + ("," if len(value) == 1 and brackets == "()" else "") + brackets[1]
        return (f"a {type(value).__name__} of {len(value)}: {brackets[0]}{', '.join(shown[:4])}, …, "
                f"{', '.join(shown[-2:])}{brackets[1]}")
    text = repr(value)
    return text if len(text) <= width else f"a {type(value).__name__}"  # a config, a model: never a wall of text


def _number(value: float) -> str:
    """A float in at most 6 significant digits; a log of a short decimal as `ln 0.5`."""
    if math.isnan(value) or math.isinf(value):
        return str(value)
    short = f"{value:.6g}"
    if abs(float(short) - value) > 1e-9 * max(1.0, abs(value)) and -50 < value < 0:
        probability = math.exp(value)
        if abs(float(f"{probability:.4g}") - probability) <= 1e-12:
            return f"ln {probability:.4g}"
    return short


def difference(got: Any, expected: Any) -> str:
    """What a reader needs to fix `got`: expected and got in readable form, and where they first differ."""
    got, expected = _scalar(got), _scalar(expected)
    if isinstance(got, BaseException) and not isinstance(expected, BaseException):
        return f"raised {readable(got)}; expected {readable(expected)}"
    if isinstance(expected, BaseException):
        return f"expected it to raise {type(expected).__name__} ({expected}); got {readable(got)}"
    if _is_array(expected) and _is_array(got):
        if tuple(got.shape) != tuple(expected.shape):
            return f"expected shape {tuple(expected.shape)}, got {tuple(got.shape)}"
        if devices := _devices(got, expected):
            return f"expected a tensor on {devices[1]}, got one on {devices[0]} (keep the result where its inputs are)"
        import numpy as np

        gap = np.abs(_numpy(got) - _numpy(expected))
        at = np.unravel_index(np.nanargmax(gap), gap.shape) if gap.size else ()
        dtypes = (f"expected {expected.dtype}, got {got.dtype}; " if all(hasattr(v, "detach") for v in (got, expected))
                  and got.dtype != expected.dtype else "")  # torch tensors: a check may ask for the same dtype
        return (f"{dtypes}largest difference {float(gap[at]):.3g} at index {tuple(int(i) for i in at)}: expected "
                f"{_number(float(_numpy(expected)[at]))}, got {_number(float(_numpy(got)[at]))}")
    if isinstance(expected, Mapping) and isinstance(got, Mapping):
        missing, extra = [k for k in expected if k not in got], [k for k in got if k not in expected]
        if missing or extra:
            return "; ".join(([f"missing key{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}"] if missing else [])
                             + ([f"unexpected key{'s' * (len(extra) > 1)} {', '.join(map(repr, extra))}"] if extra else []))
        key = next((k for k in expected if not same(got[k], expected[k])), None)
        if key is not None:
            return f"at key {key!r}: {difference(got[key], expected[key])}"
    if isinstance(expected, str) and isinstance(got, str):
        at = next((i for i, (g, e) in enumerate(zip(got, expected, strict=False)) if g != e), min(len(got), len(expected)))
        return (f"the texts first differ at character {at} (of {len(expected)} expected, {len(got)} yours): expected "
                f"{_window(expected, at)}, got {_window(got, at)}")
    if isinstance(expected, Sequence) and isinstance(got, Sequence) and not isinstance(got, str):
        at = next((i for i, (g, e) in enumerate(zip(got, expected, strict=False)) if not same(g, e)), None)
        lengths = f"expected {len(expected)} values, got {len(got)}" if len(got) != len(expected) else ""
        if at is None:
            return lengths + f"; they agree on the first {min(len(got), len(expected))}"
        where = f"at position {at}: {difference(got[at], expected[at])}"
        return f"{lengths}; first difference {where}" if lengths else f"first difference {where}"
    shown_got, shown_expected = readable(got), readable(expected)
    if shown_got == shown_expected:  # equal once rounded: show every digit
        shown_got, shown_expected = repr(got), repr(expected)
    return f"expected {shown_expected}, got {shown_got}"


def _window(text: str, at: int) -> str:
    """The text around position `at`, newlines shown as ⏎."""
    start = max(0, at - 12)
    part = repr(text[start:at + 16].replace("\n", "⏎"))
    return ("…" if start else "") + part + ("…" if at + 16 < len(text) else "")


def _verdict(passed: bool, detail: str) -> bool:
    if STRICT and not passed:
        raise AssertionError(f"exercise check failed: {detail}")
    return passed

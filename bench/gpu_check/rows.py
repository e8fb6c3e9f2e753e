"""The table's rows: one verdict per check, the self-test perturbation, and output.

Every comparison goes through :func:`reference` (closeness rows) or the bounds of
:func:`at_most` / :func:`at_least`. Under ``--perturb-reference`` every reference is
scaled by :data:`SELF_TEST_FACTOR` and every speed/quality bound is tightened by it,
so no row can PASS whatever it measured: the run must FAIL everywhere it did not SKIP.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
HEADERS = ("section", "check", "result", "figure", "tolerance", "status")
SELF_TEST_FACTOR = 10.0
_state = {"factor": 1.0}


@dataclass
class Row:
    """One line of the table."""

    section: str
    """Section label, e.g. "1 block kernels"."""
    check: str
    """What was checked (the case)."""
    status: str
    """PASS, FAIL or SKIP."""
    result: str = ""
    """What happened, in words (the reason for a SKIP, the error of a crash)."""
    figure: Optional[float] = None
    """The measured number the verdict compares with the tolerance."""
    tolerance: str = ""
    """The bound the figure must meet, as text."""

    def cells(self) -> List[str]:
        fig = "-" if self.figure is None else f"{self.figure:.3g}"
        return [self.section, self.check, self.result, fig, self.tolerance or "-", self.status]

    def to_dict(self) -> Dict:
        return asdict(self)


def set_self_test(on: bool) -> None:
    """Turn the ``--perturb-reference`` self-test on or off (process-wide)."""
    _state["factor"] = SELF_TEST_FACTOR if on else 1.0


def self_test() -> bool:
    return _state["factor"] != 1.0


def reference(x):
    """A reference value as the checks see it: ``x``, or ``x`` x SELF_TEST_FACTOR in the
    self-test. x: a tensor, a number, or a list/tuple of numbers."""
    f = _state["factor"]
    if f == 1.0:
        return x
    if isinstance(x, (list, tuple)):
        return type(x)(v * f for v in x)
    return x * f


def rel_error(got, want) -> float:
    """max |got - want| / max |want| in float64 (want passed through :func:`reference`).
    got, want: tensors of one shape, on any devices."""
    want = reference(want).detach().double().cpu()
    got = got.detach().double().cpu()
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)} against the reference's {tuple(want.shape)}")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _ok(figure) -> bool:
    return figure is not None and isinstance(figure, (int, float)) and math.isfinite(figure)


def at_most(section: str, check: str, figure, limit: float, result: str = "", tighten: bool = False) -> Row:
    """PASS when ``figure <= limit``; a NaN or missing figure FAILs. ``tighten``: a bound
    (not a reference comparison) that the self-test divides by SELF_TEST_FACTOR."""
    bound = limit / _state["factor"] if tighten else limit
    status = PASS if _ok(figure) and figure <= bound else FAIL
    return Row(section, check, status, result, figure, f"<= {bound:.3g}")


def at_least(section: str, check: str, figure, floor: float, result: str = "") -> Row:
    """PASS when ``figure >= floor`` (a bound; the self-test multiplies it by SELF_TEST_FACTOR)."""
    bound = floor * _state["factor"]
    status = PASS if _ok(figure) and figure >= bound else FAIL
    return Row(section, check, status, result, figure, f">= {bound:.3g}")


def skipped(section: str, check: str, why: str) -> Row:
    return Row(section, check, SKIP, why)


def guarded(section: str, check: str, fn: Callable[[], Row]) -> Row:
    """``fn()``'s row, or a FAIL row naming the exception it raised."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - any crash is this check's failure, reported in its row
        return failed_rows(section, [check], err)[0]


def failed_rows(section: str, checks: Sequence[str], err: BaseException) -> List[Row]:
    """One FAIL row per check, naming ``err`` (a section whose shared setup crashed)."""
    text = " ".join(f"{type(err).__name__}: {err}".split())[:300]
    return [Row(section, c, FAIL, text) for c in checks]


def exit_code(rows: Sequence[Row]) -> int:
    """1 when a row FAILed or none PASSed (a table of SKIPs proves nothing), else 0."""
    statuses = [r.status for r in rows]
    return 1 if FAIL in statuses or PASS not in statuses else 0

"""Confidence intervals of a mean: the one helper every report of gaq uses (evaluation, bench tables)."""
from __future__ import annotations

import math
from typing import Iterable

from gaq.errors import check


def finite_values(values: Iterable) -> list[float]:
    """The entries of ``values`` that are finite numbers (None, NaN, inf and non-numbers dropped), as floats."""
    out = []
    for v in values:
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(x):
            out.append(x)
    return out


def mean_ci(values: Iterable, confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Mean of the finite ``values`` and the half-width of its Student-t confidence interval.

    The interval is ``mean ± t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the sample
    standard deviation (``n - 1`` in the denominator). Non-finite entries and None are left out.

    Returns:
        ``(mean, half_width)``; ``half_width`` is None for a single value, both are None for none.
    """
    from scipy.stats import t

    check(0.0 < confidence < 1.0, f"confidence must be in (0, 1), got {confidence}")
    xs = finite_values(values)
    n = len(xs)
    if n == 0:
        return None, None
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, None
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, float(t.ppf((1.0 + confidence) / 2.0, n - 1)) * std / math.sqrt(n)

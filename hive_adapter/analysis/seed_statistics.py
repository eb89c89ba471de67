"""Summaries over seeds, shared by the encoder study and hive-reproduce's report: the mean and spread of a
measure, and whether one measure beats another on the same seeds (a paired test, not a rule of thumb)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

SIGNIFICANCE = 0.05  # one-sided


def mean_and_spread(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), and the values."""
    values = list(values)
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


@dataclass(frozen=True)
class PairedComparison:
    """`mine` against `other` on the same seeds: the mean difference and the one-sided p-value of a paired t-test
    (scipy's `ttest_rel`, alternative "greater"; `None` with fewer than two seeds)."""

    seeds: int
    mean_difference: float
    p_value: float | None

    @property
    def greater(self) -> bool:
        return self.p_value is not None and self.p_value < SIGNIFICANCE

    def describe(self) -> str:
        if self.p_value is None:
            return "one seed: no test"
        return f"paired t-test over {self.seeds} seeds, one-sided p {self.p_value:.2g}"


def paired_greater(mine: Sequence[float], other: Sequence[float]) -> PairedComparison:
    """Is `mine` greater than `other`, pairing the values by seed (same index, same seed)? `other` may be all
    zeros (is `mine` above zero?)."""
    if len(mine) != len(other):
        raise ValueError(f"paired values need the same seeds: {len(mine)} against {len(other)}")
    differences = [a - b for a, b in zip(mine, other, strict=True)]
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return PairedComparison(len(differences), mean, None)
    if statistics.pstdev(differences) == 0.0:  # every seed agrees exactly: the t statistic is infinite
        return PairedComparison(len(differences), mean, 0.0 if mean > 0 else 1.0)
    from scipy.stats import ttest_rel

    p_value = float(ttest_rel(list(mine), list(other), alternative="greater").pvalue)
    return PairedComparison(len(differences), mean, p_value if math.isfinite(p_value) else 1.0)

"""Quality-vs-compute verdicts that account for seed noise: is a setting within a tolerance of a reference?

A setting is one (checkpoint, budget, preset, sampling steps, CFG scale) evaluated with several sampling
seeds (:func:`flexdit_train.evaluation.report.seed_statistics`). Two verdicts are kept apart:

* the **claim** (``within``): the mean FID over seeds is at most ``(1 + tolerance)`` x the reference's
  mean, the criterion of the paper's "same FID at less compute";
* what the **noise supports** (``verdict``): the difference of means has a standard error
  ``se = sqrt(std_a² / n_a + std_b² / n_b)``; with ``spread = 2 se`` a setting is ``"matches"`` when even
  ``difference + spread`` stays within the tolerance, ``"worse"`` when ``difference - spread`` exceeds it,
  and ``"inconclusive"`` in between (the sample count cannot decide). With one seed on either side the
  spread is unknown and the verdict is ``"inconclusive"``.

The difference is also reported in units of the spread, so a reader sees at once whether a gap is noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Comparison:
    """One setting against the reference, in FID units and relative to the reference's mean."""

    mean: float
    std: float
    n_seeds: int
    reference: float
    reference_std: float
    reference_n_seeds: int
    tolerance: float
    difference: float  # mean - reference
    relative: float  # difference / reference
    spread: float  # 2 x the standard error of the difference (nan with a single seed on either side)
    within: bool  # the claim: mean <= (1 + tolerance) x reference
    verdict: str  # "matches" | "worse" | "inconclusive"

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """E.g. ``+3.1% (+0.21 +- 0.30 FID): matches within 5%``."""
        spread = "n/a" if math.isnan(self.spread) else f"{self.spread:.2f}"
        words = {"matches": f"within {self.tolerance:.0%} even at the pessimistic end of the seed spread",
                 "worse": f"worse by more than {self.tolerance:.0%} beyond the seed spread",
                 "inconclusive": f"the {self.tolerance:.0%} line lies inside the seed spread: this sample count "
                                 "cannot decide"}[self.verdict]
        return f"{self.relative:+.1%} ({self.difference:+.3g} +- {spread} FID): {words}"


def compare(entry: Mapping, reference: Mapping, metric: str, tolerance: float = 0.05) -> Comparison:
    """``entry`` and ``reference`` are seed statistics (``<metric>``, ``<metric>_std``, ``n_seeds``)."""
    mean, std, n = float(entry[metric]), float(entry.get(f"{metric}_std", 0.0)), int(entry.get("n_seeds", 1))
    ref, ref_std, ref_n = (float(reference[metric]), float(reference.get(f"{metric}_std", 0.0)),
                           int(reference.get("n_seeds", 1)))
    difference = mean - ref
    margin = tolerance * ref
    if n > 1 and ref_n > 1:
        spread = 2.0 * math.sqrt(std**2 / n + ref_std**2 / ref_n)
    else:
        spread = math.nan
    if math.isnan(spread):
        verdict = "inconclusive"
    elif difference + spread <= margin:
        verdict = "matches"
    elif difference - spread > margin:
        verdict = "worse"
    else:
        verdict = "inconclusive"
    return Comparison(mean, std, n, ref, ref_std, ref_n, tolerance, difference, difference / ref, spread,
                      difference <= margin, verdict)


def better(a: Mapping, b: Mapping, metric: str) -> Mapping:
    """The reference a claim must meet: the lower mean FID of two candidates (teacher, matched control)."""
    return a if float(a[metric]) <= float(b[metric]) else b

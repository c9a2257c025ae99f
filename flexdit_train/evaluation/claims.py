"""Quality-vs-compute verdicts that account for seed noise: is a setting within a tolerance of a reference?

A setting is one (checkpoint, budget, preset, sampling steps, CFG scale) evaluated with several sampling
seeds (:func:`flexdit_train.evaluation.report.seed_statistics`). Two verdicts are kept apart:

* the **claim** (``within``): the mean FID over seeds is at most ``(1 + tolerance)`` x the reference's
  mean, the criterion of the paper's "same FID at less compute";
* what the **noise supports** (``verdict``): ``spread`` is two standard errors of the difference of the
  means; a setting ``"matches"`` when even ``difference + spread`` stays within the tolerance, is ``"worse"``
  when ``difference - spread`` exceeds it, and ``"inconclusive"`` in between (the sample count cannot decide).

Seeds fix the noise and labels of every sample (``(seed, i)``), so two models sampled with the same seeds
start from the same noise: their FIDs move together from seed to seed. When both settings have the same
seeds (two or more), the difference is therefore taken per seed and its standard error is that of the
paired differences (``paired``: common random numbers); otherwise the two spreads add
(``sqrt(std_a² / n_a + std_b² / n_b)``). With one seed the spread is unknown and the verdict is
``"inconclusive"``.
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
    spread: float  # 2 x the standard error of the difference (nan without two seeds)
    paired: bool  # the spread comes from per-seed differences (the same seeds on both sides)
    within: bool  # the claim: mean <= (1 + tolerance) x reference
    verdict: str  # "matches" | "worse" | "inconclusive"

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """E.g. ``+3.1% (+0.21 +- 0.30 FID, paired over 3 seeds): within 5% even at ...``."""
        spread = "n/a" if math.isnan(self.spread) else f"{self.spread:.2f}"
        how = f"paired over {self.n_seeds} seeds" if self.paired else f"{self.n_seeds} vs {self.reference_n_seeds} seeds"
        words = {"matches": f"within {self.tolerance:.0%} even at the pessimistic end of the seed spread",
                 "worse": f"worse by more than {self.tolerance:.0%} beyond the seed spread",
                 "inconclusive": f"the {self.tolerance:.0%} line lies inside the seed spread: this sample count "
                                 "cannot decide"}[self.verdict]
        return f"{self.relative:+.1%} ({self.difference:+.3g} +- {spread} FID, {how}): {words}"


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0


def compare(entry: Mapping, reference: Mapping, metric: str, tolerance: float = 0.05) -> Comparison:
    """``entry`` and ``reference`` are seed statistics (``<metric>``, ``<metric>_std``, ``n_seeds`` and, for a
    paired comparison, ``<metric>_by_seed``)."""
    mean, std, n = float(entry[metric]), float(entry.get(f"{metric}_std", 0.0)), int(entry.get("n_seeds", 1))
    ref, ref_std, ref_n = (float(reference[metric]), float(reference.get(f"{metric}_std", 0.0)),
                           int(reference.get("n_seeds", 1)))
    mine, theirs = entry.get(f"{metric}_by_seed") or {}, reference.get(f"{metric}_by_seed") or {}
    common = sorted(set(mine) & set(theirs))
    paired = len(common) >= 2 and len(common) == len(mine) == len(theirs)
    difference = mean - ref
    if paired:
        _, diff_std = _mean_std([mine[s] - theirs[s] for s in common])
        spread = 2.0 * diff_std / math.sqrt(len(common))
    elif n > 1 and ref_n > 1:
        spread = 2.0 * math.sqrt(std**2 / n + ref_std**2 / ref_n)
    else:
        spread = math.nan
    margin = tolerance * ref
    if math.isnan(spread):
        verdict = "inconclusive"
    elif difference + spread <= margin:
        verdict = "matches"
    elif difference - spread > margin:
        verdict = "worse"
    else:
        verdict = "inconclusive"
    return Comparison(mean, std, n, ref, ref_std, ref_n, tolerance, difference, difference / ref, spread, paired,
                      difference <= margin, verdict)


def better(a: Mapping, b: Mapping, metric: str) -> Mapping:
    """The reference a claim must meet: the lower mean FID of two candidates (teacher, matched control)."""
    return a if float(a[metric]) <= float(b[metric]) else b

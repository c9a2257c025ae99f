"""The `make train` report and the seed-aware verdicts behind it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from flexdit_train.demo import write_report
from flexdit_train.evaluation.claims import better, compare
from flexdit_train.evaluation.report import read_table, record_result, seed_statistics


def row(checkpoint: Path, budget: str, order: str, fraction: float, fid: float, seed: int = 0,
        steps: str = "ddim25") -> dict:
    return {"checkpoint": str(checkpoint), "budget": budget, "preset": "mnist", "order": order,
            "compute_fraction": fraction, "gmacs_per_image": 0.2 * fraction, "nfe": 50, "num_samples": 500,
            "sampling_steps": steps, "cfg_scale": 1.5, "seed": seed, "fid500": fid, "mnist_accuracy": 0.9,
            "card": "x/eval.json"}


def stats(mean: float, std: float, n: int = 3) -> dict:
    return {"fid": mean, "fid_std": std, "n_seeds": n}


def test_seeds_and_sampling_steps_are_separate_rows_that_statistics_average(tmp_path):
    ckpt = tmp_path / "m.ckpt"
    for seed, fid in enumerate([2.0, 2.2, 2.4]):
        record_result(tmp_path, row(ckpt, "static", "static", 1.0, fid, seed))
    record_result(tmp_path, row(ckpt, "static", "static", 1.0, 9.0, 0, steps="250"))
    record_result(tmp_path, row(ckpt, "static", "static", 1.0, 2.1, 1))  # re-evaluated seed 1: replaced
    rows = read_table(tmp_path / "results.csv")
    assert len(rows) == 4
    by_steps = {str(e["sampling_steps"]): e for e in seed_statistics(rows, ["fid500"])}
    assert by_steps["ddim25"]["seeds"] == [0, 1, 2] and by_steps["ddim25"]["n_seeds"] == 3
    assert by_steps["ddim25"]["fid500"] == pytest.approx(2.1667, abs=1e-4)
    assert by_steps["ddim25"]["fid500_std"] == pytest.approx(math.sqrt(((2 - 2.1667) ** 2 + (0.0667) ** 2 + (0.2333) ** 2) / 2), abs=1e-3)
    assert by_steps["250"]["fid500_std"] == 0.0 and by_steps["250"]["n_seeds"] == 1


def test_verdicts_separate_the_claim_from_what_the_noise_supports():
    ref = stats(10.0, 0.2)
    assert compare(stats(10.1, 0.2), ref, "fid").verdict == "matches"  # +1% +- 0.33: the whole spread is within 5%
    worse = compare(stats(11.0, 0.2), ref, "fid")
    assert worse.verdict == "worse" and not worse.within and worse.relative == pytest.approx(0.1)
    close = compare(stats(10.45, 0.3), ref, "fid")
    assert close.within and close.verdict == "inconclusive"  # +4.5%, but the 5% line is inside the spread
    assert close.spread == pytest.approx(2 * math.sqrt((0.3**2 + 0.2**2) / 3))
    assert compare(stats(9.0, 0.0, n=1), stats(10.0, 0.0, n=1), "fid").verdict == "inconclusive"  # no spread
    assert "within 5%" in compare(stats(10.1, 0.2), ref, "fid").describe()
    assert better(stats(3.0, 0.1), stats(2.9, 0.1), "fid")["fid"] == 2.9


def test_the_same_seeds_on_both_sides_are_compared_seed_by_seed():
    # Seeds move both models' FIDs together (same noise, same labels): the per-seed difference is what counts.
    ref = {"fid": 8.0, "fid_std": 2.0, "n_seeds": 3, "fid_by_seed": {0: 10.0, 1: 6.0, 2: 8.0}}
    flex = {"fid": 8.2, "fid_std": 2.0, "n_seeds": 3, "fid_by_seed": {0: 10.2, 1: 6.1, 2: 8.3}}
    paired = compare(flex, ref, "fid")
    assert paired.paired and paired.spread == pytest.approx(2 * 0.1 / math.sqrt(3))
    assert paired.verdict == "matches" and paired.within  # +2.5%, spread 0.12 FID
    unpaired = compare({k: v for k, v in flex.items() if k != "fid_by_seed"}, ref, "fid")
    assert not unpaired.paired and unpaired.verdict == "inconclusive"  # 2 std each: 3.3 FID of spread
    other_seeds = compare({**flex, "fid_by_seed": {3: 10.2, 4: 6.1, 5: 8.3}}, ref, "fid")
    assert not other_seeds.paired
    assert "paired over 3 seeds" in paired.describe()


def test_report_rows_each_setting_once_with_its_seed_spread_and_states_the_verdicts(tmp_path):
    teacher, flex = tmp_path / "teacher.safetensors", tmp_path / "flex.ckpt"
    for seed in range(3):
        d = 0.01 * seed
        for r in [row(teacher, "static", "static", 1.0, 2.0 + d, seed),
                  row(flex, "target_weak_last_0.6", "weak_last", 0.59, 3.0 + d, seed),
                  row(flex, "target_0.6", "weak_first", 0.59, 2.05 + d, seed),
                  row(flex, "target_0.45", "weak_first", 0.45, 2.5 + d, seed),
                  row(flex, "target_1.0", "static", 1.0, 1.98 + d, seed)]:
            record_result(tmp_path, r)
    report = write_report(tmp_path, flex, teacher).read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[1] for line in table] == ["static", "target_1.0", "target_0.6", "target_0.45",
                                                        "target_weak_last_0.6"]
    assert table[0].startswith("| teacher | static | none | 100.0% | 2.01 +- 0.01 | +0.0% | reference |")
    assert "| weak first | 59.0% | 2.06 +- 0.01 | +2.5% | matches (+2.5%) |" in table[2]
    assert "| 2.51 +- 0.01 | +24.9% | worse (+24.9%) |" in table[3]
    assert "**Same quality at <= 60% compute** (the mean within 5% of the teacher's): holds at 59.0%." in report
    assert "At the cheapest budget, 45.0%: +24.9%" in report
    assert "weak-first is better, a gap beyond the seed spread" in report
    assert "500 digits per seed with 3 seeds" in report and (tmp_path / "fid_vs_compute.png").exists()


def test_lora_report_takes_the_flexible_models_native_row_as_the_teacher(tmp_path):
    flex = tmp_path / "flex.ckpt"
    for seed in range(2):
        record_result(tmp_path, row(flex, "target_1.0", "static", 1.0, 2.0 + 0.1 * seed, seed))
        record_result(tmp_path, row(flex, "target_0.6", "weak_first", 0.6, 2.6, seed))
    report = write_report(tmp_path, flex, None).read_text()
    assert "| flexible (native path = teacher) | target_1.0 | none | 100.0% | 2.05 +- 0.07 | +0.0% | reference |" in report
    assert "does not hold" in report


def test_report_needs_both_models(tmp_path):
    record_result(tmp_path, row(tmp_path / "a.ckpt", "static", "static", 1.0, 2.0))
    with pytest.raises(RuntimeError, match="lack the teacher or the flexible model"):
        write_report(tmp_path, tmp_path / "b.ckpt", tmp_path / "a.ckpt")

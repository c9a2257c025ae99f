"""The `make train` demo's report: one row per model and budget, FID relative to the static model."""

from __future__ import annotations

from pathlib import Path

import pytest

from flexdit_train.demo import write_report
from flexdit_train.evaluation.report import record_result


def row(checkpoint: Path, budget: str, order: str, fraction: float, fid: float) -> dict:
    return {"checkpoint": str(checkpoint), "budget": budget, "preset": "mnist", "order": order,
            "compute_fraction": fraction, "gmacs_per_image": 0.2 * fraction, "nfe": 50, "num_samples": 500,
            "sampling_steps": "ddim25", "cfg_scale": 1.5, "seed": 0, "fid500": fid, "mnist_accuracy": 0.9,
            "card": "x/eval.json"}


def test_report_lists_static_then_weak_first_then_weak_last_rows(tmp_path):
    static, flex = tmp_path / "pretrain.ckpt", tmp_path / "flex.ckpt"
    for r in [row(static, "static", "static", 1.0, 2.0), row(flex, "target_weak_last_0.6", "weak_last", 0.61, 3.0),
              row(flex, "target_0.6", "weak_first", 0.61, 2.1), row(flex, "target_1.0", "static", 1.0, 1.9)]:
        record_result(tmp_path, r)
    report = write_report(tmp_path, static, flex).read_text().splitlines()
    table = [line for line in report if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[1] for line in table] == ["static", "target_1.0", "target_0.6", "target_weak_last_0.6"]
    assert table[0].startswith("| static | static | none | 100.0% |") and "+0.0%" in table[0]
    assert "| weak first | 61.0% |" in table[2] and "| 2.100 | +5.0% | 0.900 |" in table[2]
    assert "| weak last | 61.0% |" in table[3] and "+50.0%" in table[3]
    assert "![FID vs compute](fid_vs_compute.png)" in report


def test_report_needs_both_models(tmp_path):
    record_result(tmp_path, row(tmp_path / "a.ckpt", "static", "static", 1.0, 2.0))
    with pytest.raises(RuntimeError, match="lack the static or the flexible model"):
        write_report(tmp_path, tmp_path / "a.ckpt", tmp_path / "b.ckpt")

"""Budget schedules: layouts, FLOPs fractions, the target solver, serialisation and the Hydra presets."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flexdit_train.flops import cost_model
from flexdit_train.sampling.schedule import (
    BudgetSchedule,
    build_schedule,
    for_target,
    from_powerful_steps,
    static,
    weak_last,
)

BUDGET_DIR = Path(__file__).resolve().parents[1] / "conf" / "budget"
XL_COST = cost_model("DiT-XL/2", 32)  # DiT-XL/2 at 256 px: weak p4 costs r ~ 0.245 of native p2


def test_from_powerful_steps_is_weak_first():
    s = from_powerful_steps(10, native_patch=2, weak_patch=4, powerful_steps=3, powerful_steps_guidance=1)
    assert s.cond_patch_sizes == (4,) * 7 + (2,) * 3
    assert s.guidance_patch_sizes == (4,) * 9 + (2,)
    assert s.patches_at(0) == (4, 4) and s.patches_at(9) == (2, 2) and s.patches_at(8) == (2, 4)
    assert s.nfe() == {"cond": {2: 3, 4: 7}, "guidance": {2: 1, 4: 9}}
    assert s.name == "3/1"
    assert "cond p4x7 -> p2x3; guidance p4x9 -> p2x1" in s.describe()


def test_weak_last_static_and_no_cfg():
    s = weak_last(10, 2, 4, powerful_steps=3)
    assert s.cond_patch_sizes == (2,) * 3 + (4,) * 7 == s.guidance_patch_sizes
    assert static(5, 2).nfe() == {"cond": {2: 5}, "guidance": {2: 5}}
    assert static(5, 2).compute_fraction(XL_COST) == 1.0
    no_cfg = from_powerful_steps(10, 2, 4, 3, cfg=False)
    assert no_cfg.guidance_patch_sizes is None and no_cfg.nfe() == {"cond": {2: 3, 4: 7}}
    assert "guidance off" in no_cfg.describe()


@pytest.mark.parametrize("x,y,paper", [(130, 130, 0.637), (70, 70, 0.455), (90, 50, 0.455), (30, 0, 0.289)])
def test_paper_fractions_match_budget_formula(x, y, paper):
    s = from_powerful_steps(250, 2, 4, x, y)
    r, t = XL_COST(4) / XL_COST(2), 250
    formula = ((x + r * (t - x)) + (y + r * (t - y))) / (2 * t)
    assert s.compute_fraction(XL_COST) == pytest.approx(formula, rel=1e-12)
    assert s.compute_fraction(XL_COST) == pytest.approx(paper, abs=0.003)


@pytest.mark.parametrize("target", [0.25, 0.3, 0.45, 0.6371, 0.8, 1.0])
@pytest.mark.parametrize("steps,cfg", [(250, True), (50, True), (50, False)])
def test_for_target_hits_within_one_step(target, steps, cfg):
    s = for_target(target, steps, 2, 4, XL_COST, cfg=cfg)
    r = XL_COST(4) / XL_COST(2)
    fraction = s.compute_fraction(XL_COST)
    # Rule: the fewest powerful steps reaching the target, so it overshoots by less than one step.
    assert target - 1e-9 <= fraction < target + (1 - r) / steps
    nfe = s.nfe()
    assert not cfg or nfe["cond"] == nfe["guidance"]
    assert s.cond_patch_sizes[0] == 4 or fraction == 1.0  # weak first


@pytest.mark.parametrize("target, steps", [(0.6, 50), (0.6, 25), (0.45, 250), (0.3, 50), (1.0, 50)])
def test_at_most_target_never_exceeds_it_and_takes_every_step_it_can(target, steps):
    r = XL_COST(4) / XL_COST(2)
    below = for_target(target, steps, 2, 4, XL_COST, at_most=True)
    fraction = below.compute_fraction(XL_COST)
    assert target - (1 - r) / steps < fraction <= target + 1e-9
    above = for_target(target, steps, 2, 4, XL_COST)
    assert above.compute_fraction(XL_COST) >= fraction  # one step apart at most, same order
    assert below.cond_patch_sizes[0] == 4 or fraction == 1.0
    node = {"mode": "target", "compute_fraction": target, "at_most": True}
    assert build_schedule(node, steps, 2, 4, XL_COST).compute_fraction(XL_COST) == fraction
    with pytest.raises(ValueError, match="budget.at_most must be true or false"):
        build_schedule({**node, "at_most": "yes"}, steps, 2, 4, XL_COST)


def test_for_target_errors():
    with pytest.raises(
        ValueError, match=r"below the minimum 0\.24\d+ reachable with all 250 steps at weak patch 4"
    ):
        for_target(0.2, 250, 2, 4, XL_COST)
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        for_target(1.2, 250, 2, 4, XL_COST)
    with pytest.raises(ValueError, match="not cheaper"):
        for_target(0.5, 250, 4, 2, XL_COST)


def test_round_trip_through_json():
    for s in (
        from_powerful_steps(250, 2, 4, 90, 50),
        from_powerful_steps(50, 2, 4, 10, cfg=False),
        static(3, 2),
    ):
        data = json.loads(json.dumps(s.to_dict()))
        assert BudgetSchedule.from_dict(data) == s


def test_invalid_schedules():
    with pytest.raises(ValueError, match="guidance branch has 2 steps but the conditional branch 3"):
        BudgetSchedule((2, 2, 2), (2, 2), native_patch=2)
    with pytest.raises(ValueError, match="powerful_steps=11 must be an int in"):
        from_powerful_steps(10, 2, 4, 11)
    with pytest.raises(ValueError, match="lacks"):
        BudgetSchedule.from_dict({"cond_patch_sizes": [2]})


@pytest.mark.parametrize("path", sorted(BUDGET_DIR.glob("*.yaml")), ids=lambda p: p.stem)
@pytest.mark.parametrize("steps", [250, 50])
def test_every_preset_builds(path, steps):
    node = OmegaConf.load(path)
    # Presets are named after their file; `target` after its fraction too, so sweeps over
    # budget.compute_fraction get one result row per fraction.
    expected = f"{path.stem}_0.6" if node.mode == "target" else path.stem
    assert node.name == expected
    # the sparse-density preset is a SparseDiT's (its sparse grid per step), priced against its dense DiT-XL/2
    cost = cost_model("SparseDiT-XL/2") if node.mode == "sparse_density" else XL_COST
    s = build_schedule(node, steps, native_patch=2, weak_patch=4, cost=cost, available_patch_sizes=[2, 4])
    assert s.num_steps == steps and s.cfg and s.name == expected
    assert 0.24 < s.compute_fraction(cost) <= 1.0


def test_preset_layouts():
    def load(stem, steps):
        return build_schedule(OmegaConf.load(BUDGET_DIR / f"{stem}.yaml"), steps, 2, 4, XL_COST)

    assert load("paper_130_130", 250).nfe()["cond"] == {2: 130, 4: 120}
    assert load("paper_90_50", 250).nfe() == {"cond": {2: 90, 4: 160}, "guidance": {2: 50, 4: 200}}
    assert load("paper_30_0", 50).nfe() == {"cond": {2: 6, 4: 44}, "guidance": {4: 50}}
    assert load("weak_last_50", 50).cond_patch_sizes == (2,) * 25 + (4,) * 25
    assert load("target", 250).compute_fraction(XL_COST) == pytest.approx(0.6, abs=(1 - 0.245) / 250)


def test_target_weak_last_spends_the_same_powerful_steps_first():
    first = build_schedule(OmegaConf.load(BUDGET_DIR / "target.yaml"), 250, 2, 4, XL_COST)
    last = build_schedule(OmegaConf.load(BUDGET_DIR / "target_weak_last.yaml"), 250, 2, 4, XL_COST)
    assert last.cond_patch_sizes == first.cond_patch_sizes[::-1]
    assert last.guidance_patch_sizes == first.guidance_patch_sizes[::-1]
    assert last.compute_fraction(XL_COST) == first.compute_fraction(XL_COST)
    assert last.cond_patch_sizes[0] == 2 and last.cond_patch_sizes[-1] == 4
    assert (first.order, last.order) == ("weak_first", "weak_last")
    assert static(10, 2).order == "static" and from_powerful_steps(10, 2, 4, 10, 0).order == "weak_first"
    assert BudgetSchedule((4, 2, 4), None, 2).order == "mixed"
    # an all-weak branch fits either order: the other branch decides
    assert BudgetSchedule((2, 4, 4), (4, 4, 4), 2).order == "weak_last"
    assert BudgetSchedule((4, 4, 2), (4, 4, 4), 2).order == "weak_first"
    assert BudgetSchedule((4, 4, 4), (4, 4, 4), 2).order == "weak_first"
    with pytest.raises(ValueError, match="weak_first must be true or false"):
        build_schedule({"mode": "target", "compute_fraction": 0.6, "weak_first": "no"}, 50, 2, 4, XL_COST)


def test_build_schedule_overrides_and_errors():
    node = OmegaConf.merge(
        OmegaConf.load(BUDGET_DIR / "target.yaml"), OmegaConf.from_dotlist(["compute_fraction=0.45"])
    )
    assert build_schedule(node, 250, 2, 4, XL_COST).compute_fraction(XL_COST) == pytest.approx(
        0.45, abs=0.004
    )
    exact = build_schedule({"mode": "powerful_steps", "powerful_steps": 70}, 250, 2, 4, None)
    assert exact == from_powerful_steps(250, 2, 4, 70, name="powerful_steps")
    assert build_schedule({"mode": "static"}, 10, 2, None, None, cfg=False).guidance_patch_sizes is None

    with pytest.raises(ValueError, match=r"budget .budget. uses patch size 8 but the model has \[2, 4\]"):
        build_schedule(
            {"name": "budget", "mode": "powerful_steps", "powerful_steps": 1},
            10,
            2,
            8,
            None,
            available_patch_sizes=[2, 4],
        )
    with pytest.raises(ValueError, match="budget.mode='fast' is unknown"):
        build_schedule({"mode": "fast"}, 10, 2, 4, None)
    with pytest.raises(ValueError, match=r"does not take \['compute_fracton'\]"):
        build_schedule({"mode": "target", "compute_fracton": 0.5}, 10, 2, 4, XL_COST)
    with pytest.raises(ValueError, match="needs a weak patch size"):
        build_schedule({"mode": "powerful_fraction", "powerful_fraction": 0.5}, 10, 2, None, None)
    with pytest.raises(ValueError, match="needs budget.powerful_fraction"):
        build_schedule({"mode": "weak_last"}, 10, 2, 4, None)
    with pytest.raises(ValueError, match="needs a cost model"):
        build_schedule({"mode": "target", "compute_fraction": 0.5}, 10, 2, 4, None)

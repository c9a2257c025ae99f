"""Block caching as schedule data: plans per policy, exact execution, pricing against a counted run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.models import randomize_zero_inits
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

import flexdit_train
from flexdit_train.models import DiT, flexify
from flexdit_train.sampling import Sampler
from flexdit_train.sampling.cache import BlockCache, CachePolicy, block_plan, lagrange_weights
from flexdit_train.sampling.schedule import BudgetSchedule, from_powerful_steps, static

CONF_DIR = str(Path(flexdit_train.__file__).parent / "conf")


def tiny(depth: int = 3, flex: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomize_zero_inits(
        DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=depth, num_heads=4, num_classes=5), scale=0.1
    )
    return (flexify(model, patch_sizes=(2, 4), mode="shared") if flex else model).eval()


def count_block_calls(model: torch.nn.Module) -> list[int]:
    """Forward calls per block, counted by hooks."""
    calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def sample(sampler: Sampler, n: int = 2) -> torch.Tensor:
    with torch.no_grad():
        return sampler.generate(torch.arange(n) % 5, seed=0, indices=list(range(n)))


def test_policies_make_the_plans_they_describe():
    steps = [2] * 7
    assert block_plan(CachePolicy("fora", interval=3), 2, steps) == ("CC", "00", "00", "CC", "00", "00", "CC")
    taylor = block_plan(CachePolicy("taylorseer", interval=2, order=2), 1, steps)
    # the forecast order grows with the computed steps so far: 0 (reuse) after one, 1 after two, 2 after three
    assert taylor == ("C", "0", "C", "1", "C", "2", "C")
    delta = block_plan(CachePolicy("delta_dit", interval=2, cached_share=0.5, boundary=0.5), 4, [2] * 6)
    assert delta == ("CCCC", "CC00", "CCCC", "00CC", "CCCC", "00CC")  # rear blocks early, front blocks late
    assert block_plan(CachePolicy("fora", interval=1), 2, steps) is None
    assert block_plan(CachePolicy("none", interval=3), 2, steps) is None
    # a patch change in either branch restarts the interval: the first step at a new size computes everything
    plan = block_plan(CachePolicy("fora", interval=3), 1, [4, 4, 4, 4, 2, 2, 2], [4, 4, 4, 4, 4, 2, 2])
    assert plan == ("C", "0", "0", "C", "C", "C", "0")


def test_bad_cache_settings_are_one_line_errors():
    with pytest.raises(ValueError, match=r"cache.policy='lru' is unknown"):
        CachePolicy.from_config({"policy": "lru"})
    with pytest.raises(ValueError, match=r"cache.interval=0 must be a positive int"):
        CachePolicy("fora", interval=0)
    with pytest.raises(ValueError, match=r"does not take \['every'\]"):
        CachePolicy.from_config({"policy": "fora", "every": 3})
    with pytest.raises(ValueError, match="block plan characters"):
        BudgetSchedule((2, 2), None, 2, block_plan=("CC", "CX"))
    with pytest.raises(ValueError, match="has 1 steps but the schedule 2"):
        BudgetSchedule((2, 2), None, 2, block_plan=("CC",))


def test_caching_off_and_an_all_compute_plan_are_bit_identical_to_no_cache():
    model = tiny()
    base = Sampler.for_model(model, {"mode": "static"}, "ddim6", cfg=2.0)
    reference = sample(base)
    assert torch.equal(sample(Sampler.for_model(model, {"mode": "static"}, "ddim6", 2.0, cache={"policy": "none"})),
                       reference)
    all_compute = BudgetSchedule(base.schedule.cond_patch_sizes, base.schedule.guidance_patch_sizes, 2,
                                 block_plan=("CCC",) * 6)
    assert torch.equal(sample(Sampler(**{**base.__dict__, "schedule": all_compute})), reference)
    assert model.block_cache is None  # the cache is installed only while sampling


@pytest.mark.parametrize("interval", [2, 3])
def test_fora_recomputes_every_nth_step_only(interval):
    model = tiny()
    calls = count_block_calls(model)
    sampler = Sampler.for_model(model, {"mode": "static"}, "ddim7", cfg=1.0, cache={"policy": "fora", "interval": interval})
    out = sample(sampler)
    computed = len(range(0, 7, interval))  # steps 0, N, 2N, ...
    assert calls == [computed] * 3
    assert sampler.schedule.block_plan == tuple("CCC" if k % interval == 0 else "000" for k in range(7))
    uncached = sample(Sampler.for_model(model, {"mode": "static"}, "ddim7", cfg=1.0))
    assert not torch.equal(out, uncached)  # reuse changes the samples ...
    assert (out - uncached).abs().max() < 0.5 * uncached.abs().max()  # ... without wrecking them


def test_the_cache_is_kept_per_patch_size_and_branch():
    """A weak-first schedule with FORA-3: the first native step computes every block although the interval's
    phase would reuse, and the doubled CFG call and the split weak-conditional calls keep separate deltas."""
    model = tiny(flex=True)
    calls = count_block_calls(model)
    budget = {"mode": "powerful_steps", "powerful_steps": 4, "powerful_steps_guidance": 2}
    sampler = Sampler.for_model(model, budget, "ddim8", cfg=3.0, cache={"policy": "fora", "interval": 3})
    schedule = sampler.schedule
    assert schedule.cond_patch_sizes == (4, 4, 4, 4, 2, 2, 2, 2)
    assert schedule.guidance_patch_sizes == (4, 4, 4, 4, 4, 4, 2, 2)
    assert [s[0] for s in schedule.block_plan] == list("C00CC0C0")  # the interval restarts at steps 4 and 6
    sample(sampler)
    # computed: steps 0 and 3 (one doubled CFG call each), 4 (the cond and the guidance call), 6 (doubled)
    assert calls == [5] * 3


def test_taylorseer_forecasts_a_polynomial_trajectory_exactly_at_its_order():
    """Deltas that are polynomials of the step index: the forecast of order o is exact for degree <= o."""
    torch.manual_seed(0)
    coefficients = torch.randn(3, 2, 4, 8, dtype=torch.float64)  # (degree + 1, N, T, D)

    def delta(step: int, degree: int) -> torch.Tensor:
        return sum(coefficients[i] * float(step) ** i for i in range(degree + 1))

    x = torch.zeros(2, 4, 8, dtype=torch.float64)
    for order in (1, 2):
        plan = ("C", "0", "C", "0", "C", str(order), str(order))  # computed at steps 0, 2, 4; forecast at 5, 6
        cache = BlockCache(plan)
        forecasts = 0
        for step, action in enumerate(plan):
            with cache.call(step, ("cond", 2)):
                out = cache.block(0, x, lambda h, s=step, o=order: h + delta(s, o))
            if action not in ("C", "0"):
                torch.testing.assert_close(out, delta(step, order), rtol=1e-10, atol=1e-10)
                forecasts += 1
        assert forecasts == 2
        # one order too low misses the top term
        low = BlockCache(("C", "0", "C", "0", "C", str(order - 1)))
        for step in range(6):
            with low.call(step, ("cond", 2)):
                out = low.block(0, x, lambda h, s=step, o=order: h + delta(s, o))
        assert (out - delta(5, order)).abs().max() > 1e-3
    assert lagrange_weights([0.0, 2.0, 4.0], 6.0) == pytest.approx([1.0, -3.0, 3.0])


def test_forecasting_a_block_that_was_never_computed_is_an_error():
    cache = BlockCache(("0",))
    with cache.call(0, ("cond", 2)), pytest.raises(RuntimeError, match="must compute a block before it reuses it"):
        cache.block(0, torch.zeros(1, 2, 3), lambda h: h)


def test_priced_macs_match_a_counted_cached_run():
    """The schedule's MACs (reused blocks free, forecasts priced) against FlopCounterMode over a whole sampling."""
    model = tiny(depth=4, flex=True)
    budget = {"mode": "powerful_steps", "powerful_steps": 5}
    for cache in ({"policy": "fora", "interval": 3}, {"policy": "taylorseer", "interval": 2, "order": 2},
                  {"policy": "delta_dit", "interval": 2}):
        sampler = Sampler.for_model(model, budget, "ddim12", cfg=3.0, cache=cache)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            sample(sampler, n=3)
        priced = 2 * 3 * sampler.schedule.macs(sampler.cost)
        assert counter.get_total_flops() == pytest.approx(priced, rel=0.02), cache
        uncached = Sampler.for_model(model, budget, "ddim12", cfg=3.0)
        assert sampler.schedule.compute_fraction(sampler.cost) < 0.85 * uncached.schedule.compute_fraction(uncached.cost)


def test_heun_schedules_price_every_evaluation_against_a_counted_run():
    """Heun's 2K - 1 evaluations (the corrector at the next grid point's patch and block plan) are what the
    schedule prices and what a compute target solves for, with and without caching."""
    model = tiny(depth=4, flex=True)
    model.diffusion_process = {"kind": "flow", "interpolant": "linear", "prediction": "velocity"}
    for budget, cache in (({"mode": "powerful_steps", "powerful_steps": 3}, None),
                          ({"mode": "powerful_steps", "powerful_steps": 3}, {"policy": "fora", "interval": 2}),
                          ({"mode": "static"}, {"policy": "taylorseer", "interval": 2, "order": 1})):
        sampler = Sampler.for_model(model, budget, "heun6", cfg=3.0, cache=cache)
        schedule = sampler.schedule
        assert schedule.step_evaluations == (1, 2, 2, 2, 2, 2)
        assert sum(schedule.nfe()["cond"].values()) == sum(schedule.nfe()["guidance"].values()) == 11
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            sample(sampler, n=3)
        assert counter.get_total_flops() == pytest.approx(2 * 3 * schedule.macs(sampler.cost), rel=0.02), (budget, cache)
        assert BudgetSchedule.from_dict(schedule.to_dict()) == schedule
    weak_first = Sampler.for_model(model, {"mode": "powerful_steps", "powerful_steps": 3}, "heun6", cfg=1.0).schedule
    cost = Sampler.for_model(model, {"mode": "static"}, "heun6", cfg=1.0).cost
    r = cost(4) / cost(2)
    # weak steps 0..2 make 1 + 2 + 2 evaluations, native steps 3..5 make 6, of 11 in the static run
    assert weak_first.compute_fraction(cost) == pytest.approx((5 * r + 6) / 11)
    assert weak_first.powerful_steps() == {"cond": 3}
    target = Sampler.for_model(model, {"mode": "target", "compute_fraction": (5 * r + 6) / 11}, "heun6", cfg=1.0)
    assert target.schedule.cond_patch_sizes == weak_first.cond_patch_sizes
    euler = Sampler.for_model(model, {"mode": "powerful_steps", "powerful_steps": 3}, "euler6", cfg=1.0).schedule
    assert euler.evaluations is None and euler.compute_fraction(cost) == pytest.approx((3 * r + 3) / 6)


def test_cache_presets_compose_with_budgets_and_name_the_schedule():
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose("sample", overrides=["checkpoint=x", "cache=taylorseer_o2_n5", "budget=target",
                                           "budget.compute_fraction=0.6"])
    model = tiny(flex=True)
    sampler = Sampler.for_model(model, cfg.budget, "ddim20", cfg=2.0, cache=cfg.cache)
    schedule = sampler.schedule
    assert schedule.cache == "taylorseer" and schedule.name.endswith("+ taylorseer_o2_n5")
    assert schedule.block_plan is not None and len(schedule.block_plan) == 20
    assert "taylorseer cache" in schedule.describe()
    assert BudgetSchedule.from_dict(schedule.to_dict()) == schedule
    assert static(3, 2).with_cache(CachePolicy("fora", 2), 2).block_plan == ("CC", "00", "CC")
    assert from_powerful_steps(4, 2, 4, 2).with_cache(CachePolicy("none"), 2).block_plan is None


def test_a_compute_target_over_both_axes_caches_only_what_weak_steps_cannot_save():
    model = tiny(depth=4, flex=True)
    cost = Sampler.for_model(model, {"mode": "static"}, "ddim20", cfg=1.0).cost
    floor = cost(4) / cost(2)  # every step weak, no caching
    reachable = {"mode": "target", "compute_fraction": floor + 0.1, "cache_policy": "fora"}
    patches_only = Sampler.for_model(model, reachable, "ddim20", cfg=1.0).schedule
    assert patches_only.block_plan is None  # the weak steps reach it alone: no caching
    below = {"mode": "target", "compute_fraction": 0.7 * floor, "cache_policy": "fora", "at_most": True}
    both = Sampler.for_model(model, below, "ddim20", cfg=1.0).schedule
    assert both.block_plan is not None and both.compute_fraction(cost) <= 0.7 * floor + 1e-9
    assert both.name.endswith("fora_n2")  # the least caching that reaches the target
    assert "C" in "".join(both.block_plan) and 2 in both.cond_patch_sizes  # some native steps remain
    # a static model meets a target by caching alone; a target out of reach names the limit
    static_model = tiny(depth=4)
    cached = Sampler.for_model(static_model, {**below, "compute_fraction": 0.5}, "ddim20", cfg=1.0).schedule
    assert cached.compute_fraction(cost) <= 0.5 and set(cached.cond_patch_sizes) == {2}
    for at_most in (True, False):  # below the cheapest interval: an error, not a silently costlier schedule
        with pytest.raises(ValueError, match="out of reach of fora caching with intervals up to 2"):
            Sampler.for_model(static_model, {**below, "compute_fraction": 0.1, "max_interval": 2, "at_most": at_most},
                              "ddim20", cfg=1.0)
    with pytest.raises(ValueError, match="keep one of them"):
        Sampler.for_model(model, below, "ddim20", cfg=1.0, cache={"policy": "fora", "interval": 3})

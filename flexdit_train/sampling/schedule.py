"""Compute-budget schedules: the patch size each sampling step of each CFG branch runs at.

A schedule is plain data, two tuples of patch sizes (index 0 = the first, noisiest step), so the
sampler, the loggers and the checkpoints treat every policy (static, the paper's weak-first x/y
schedules, a solved FLOPs target, the weak-last ablation) the same way; only the constructors differ.

FlexiDiT notation (arXiv 2502.20126, §3.3-3.4): a schedule "x/y" over T steps runs the native
("powerful") patch for the LAST x steps of the conditional branch and the LAST y steps of the guidance
branch, and the weak (large) patch before. With r = cost(weak) / cost(native) its compute is
``[(x + r(T-x)) + (y + r(T-y))] / (2T)`` of running the native patch everywhere.

A patch size is an int (square 2-D patch of the image DiTs) or a per-axis tuple such as the video
DiT's (1, 2, 2); lists from YAML/JSON become tuples. A cost is any callable
``patch_size -> MACs of one forward for one sample``; :class:`flexdit_train.flops.CostModel` is the
analytic one of every arch.

A SparseDiT's temporal token density is schedule data too: ``sparse_grids`` holds the side of its sparse token
grid per step (both branches), built by :class:`SparseDensity` (``budget=sparse_density``) and priced by the
cost model (``cost(patch, sparse_grid=s)``); the training objective draws the same grid at a sample's timestep
(:mod:`flexdit_train.training.sparse_density`).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flexdit_train.sampling.cache import COMPUTE, CachePolicy, block_plan, check_block_plan

Patch = int | tuple[int, ...]
Cost = Callable[[Patch], float]

# Fractions are compared with this slack so that a target equal to a reachable fraction, up to float
# rounding, selects that schedule rather than the next one.
_FRACTION_TOL = 1e-9


def as_patch(value: Any) -> Patch:
    """An int, a per-axis tuple from any sequence, or either from a label such as "4", "2x2x2" or "p1x4x4"."""
    try:
        if isinstance(value, str):
            parts = value.removeprefix("p").split("x")
            return int(parts[0]) if len(parts) == 1 else tuple(int(v) for v in parts)
        if isinstance(value, Iterable):
            return tuple(int(v) for v in value)
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"patch size {value!r} is neither an int nor a per-axis tuple such as (1, 2, 2)") from None


def patch_label(patch: Patch) -> str:
    """"4" or "1x2x2": the patch part of metric names, card keys and state-dict keys ("p" + label)."""
    return "x".join(map(str, patch)) if isinstance(patch, tuple) else str(patch)


def patch_volume(patch: Patch) -> int:
    """Pixels (latent cells) per token: larger = weaker; an int p is a p x p patch."""
    return math.prod(patch) if isinstance(patch, tuple) else patch * patch


def _patch_name(patch: Patch) -> str:
    """"p4", or "p(1x4x4)" so that a run length after it ("p(1x4x4)x40") stays readable."""
    return f"p({patch_label(patch)})" if isinstance(patch, tuple) else f"p{patch}"


@dataclass(frozen=True)
class BudgetSchedule:
    """Patch size per sampling step of the conditional and (with CFG) the guidance branch.

    ``native_patch`` is the patch of the reference run that ``compute_fraction`` divides by (the
    model's pre-trained patch); ``guidance_patch_sizes`` is None when sampling without CFG. ``block_plan``
    (None: every block computed) says per step which blocks are computed, reused or forecast, one character
    per block (:mod:`flexdit_train.sampling.cache`); ``cache`` names its policy ("fora", ...; "none").
    ``sparse_grids`` (None: the model's own) is a SparseDiT's sparse grid side per step, for both branches; its
    compute fraction then divides by the dense DiT the SparseDiT was converted from (``CostModel.reference``).
    ``evaluations`` (None: one each) is the number of network evaluations of each step, at its patch sizes and
    block plan (Heun: 1, 2, ..., 2, its corrector evaluating at the next grid point).
    """

    cond_patch_sizes: tuple[Patch, ...]
    guidance_patch_sizes: tuple[Patch, ...] | None
    native_patch: Patch
    name: str = "custom"
    block_plan: tuple[str, ...] | None = None
    cache: str = "none"
    sparse_grids: tuple[int, ...] | None = None
    evaluations: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # Accept lists (YAML, JSON) but store tuples so the schedule stays hashable and immutable.
        cond = _patch_tuple(self.cond_patch_sizes, "cond_patch_sizes")
        object.__setattr__(self, "cond_patch_sizes", cond)
        if self.guidance_patch_sizes is not None:
            guidance = _patch_tuple(self.guidance_patch_sizes, "guidance_patch_sizes")
            if len(guidance) != len(cond):
                raise ValueError(
                    f"the guidance branch has {len(guidance)} steps but the conditional branch "
                    f"{len(cond)}; give both branches one patch size per sampling step"
                )
            object.__setattr__(self, "guidance_patch_sizes", guidance)
        native = as_patch(self.native_patch)
        if min(_dims(native)) < 1:
            raise ValueError(f"native patch must be positive, got {self.native_patch!r}")
        object.__setattr__(self, "native_patch", native)
        if self.block_plan is not None:
            object.__setattr__(self, "block_plan", check_block_plan(self.block_plan, len(cond)))
        if self.sparse_grids is not None:
            grids = tuple(int(g) for g in self.sparse_grids)
            if len(grids) != len(cond) or min(grids) < 1:
                raise ValueError(
                    f"sparse_grids has {len(grids)} entries (smallest {min(grids, default=0)}) for {len(cond)} steps; "
                    "give one positive sparse grid side per sampling step"
                )
            if self.block_plan is not None:
                raise ValueError("a sparse-grid schedule (SparseDiT) cannot cache blocks; drop the cache or the sparse grids")
            object.__setattr__(self, "sparse_grids", grids)
        if self.evaluations is not None:
            counts = tuple(int(n) for n in self.evaluations)
            if len(counts) != len(cond) or min(counts) < 1:
                raise ValueError(
                    f"evaluations has {len(counts)} entries (smallest {min(counts, default=0)}) for {len(cond)} steps; "
                    "give one positive count of network evaluations per sampling step"
                )
            object.__setattr__(self, "evaluations", None if set(counts) == {1} else counts)

    @property
    def num_steps(self) -> int:
        return len(self.cond_patch_sizes)

    @property
    def cfg(self) -> bool:
        return self.guidance_patch_sizes is not None

    @property
    def patch_sizes(self) -> tuple[Patch, ...]:
        """Distinct patch sizes the schedule uses, ascending."""
        return tuple(sorted(set(self.cond_patch_sizes) | set(self.guidance_patch_sizes or ())))

    def patches_at(self, step: int) -> tuple[Patch, Patch | None]:
        """(conditional patch, guidance patch or None) of sampling step ``step`` (0 = noisiest)."""
        guidance = None if self.guidance_patch_sizes is None else self.guidance_patch_sizes[step]
        return self.cond_patch_sizes[step], guidance

    @property
    def step_evaluations(self) -> tuple[int, ...]:
        """Network evaluations of each step (1 each unless the sampler evaluates more often, as Heun)."""
        return self.evaluations or (1,) * self.num_steps

    def nfe(self) -> dict[str, dict[Patch, int]]:
        """Network evaluations per branch and patch size: ``{"cond": {2: 130, 4: 120}, "guidance": {...}}``."""
        counts = {"cond": _counts(self.cond_patch_sizes, self.step_evaluations)}
        if self.guidance_patch_sizes is not None:
            counts["guidance"] = _counts(self.guidance_patch_sizes, self.step_evaluations)
        return counts

    def powerful_steps(self) -> dict[str, int]:
        """Sampling steps (not evaluations) at the native patch per branch: the paper's x / y."""
        return {branch: sum(p == self.native_patch for p in sizes)
                for branch, sizes in (("cond", self.cond_patch_sizes), ("guidance", self.guidance_patch_sizes))
                if sizes is not None}

    def macs(self, cost: Cost) -> float:
        """MACs to sample one image (or video): every evaluation's forward, both branches with CFG. With a block
        plan a reused block costs nothing and a forecast of order o its o + 1 multiply-adds per feature, which the
        cost prices (:meth:`flexdit_train.flops.CostModel.block_macs`, ``forecast_macs``)."""
        branches = [b for b in (self.cond_patch_sizes, self.guidance_patch_sizes) if b is not None]
        evaluations = self.step_evaluations
        if self.sparse_grids is not None:
            return sum(n * cost(p, sparse_grid=g) for branch in branches
                       for p, g, n in zip(branch, self.sparse_grids, evaluations, strict=True))
        if self.block_plan is None:
            return sum(n * cost(p) for branch in self.nfe().values() for p, n in branch.items())
        if not hasattr(cost, "block_macs"):
            raise ValueError("pricing a block plan needs a cost model with per-block MACs (flexdit_train.flops.CostModel)")
        total = 0.0
        for branch in branches:
            for p, actions, n in zip(branch, self.block_plan, evaluations, strict=True):
                skipped = [c for c in actions if c != COMPUTE]
                step = cost(p) - len(skipped) * cost.block_macs(p) + sum(cost.forecast_macs(p, int(c)) for c in skipped)
                total += n * step
        return total

    def reference_macs(self, cost: Cost) -> float:
        """MACs of the static run with the same sampler: the native patch for every evaluation of every branch, at
        full density (a SparseDiT's reference is its dense DiT: ``cost.reference``)."""
        branches = 2 if self.cfg else 1
        return branches * sum(self.step_evaluations) * getattr(cost, "reference", cost)(self.native_patch)

    def compute_fraction(self, cost: Cost) -> float:
        """Schedule FLOPs / FLOPs of the static native-patch run (the paper's "% FLOPs")."""
        return self.macs(cost) / self.reference_macs(cost)

    def validate(self, available_patch_sizes: Collection[Patch]) -> None:
        """Raise a one-line ValueError when the schedule needs a patch size the model lacks."""
        available = sorted(as_patch(p) for p in available_patch_sizes)
        for p in self.patch_sizes:
            if p not in available:
                raise ValueError(
                    f"budget {self.name!r} uses patch size {p} but the model has {available}; "
                    f"choose a budget and weak patch size among {available} or flexify the model to patch {p}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form; :meth:`from_dict` inverts it."""
        return {
            "name": self.name,
            "native_patch": _plain(self.native_patch),
            "cond_patch_sizes": [_plain(p) for p in self.cond_patch_sizes],
            "guidance_patch_sizes": _optional_list(self.guidance_patch_sizes),
            "cache": self.cache,
            "block_plan": None if self.block_plan is None else list(self.block_plan),
            "sparse_grids": None if self.sparse_grids is None else list(self.sparse_grids),
            "evaluations": None if self.evaluations is None else list(self.evaluations),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BudgetSchedule:
        missing = [k for k in ("native_patch", "cond_patch_sizes") if k not in data]
        if missing:
            raise ValueError(
                f"schedule dict lacks {missing}; expected the keys BudgetSchedule.to_dict() writes"
            )
        # Lists from JSON are fine: __post_init__ turns them into tuples.
        return cls(
            cond_patch_sizes=data["cond_patch_sizes"],
            guidance_patch_sizes=data.get("guidance_patch_sizes"),
            native_patch=data["native_patch"],
            name=data.get("name", "custom"),
            block_plan=data.get("block_plan"),
            cache=data.get("cache", "none"),
            sparse_grids=data.get("sparse_grids"),
            evaluations=data.get("evaluations"),
        )

    @property
    def order(self) -> str:
        """Where the weak steps sit: "static" (none), "weak_first" (the paper's schedules), "weak_last"
        (the Fig. 19 ablation) or "mixed", judged over both branches. A branch that is weak at every step
        fits either order, so the other branch decides; all weak everywhere counts as "weak_first"."""
        orders = {
            _order([p != self.native_patch for p in branch])
            for branch in (self.cond_patch_sizes, self.guidance_patch_sizes)
            if branch is not None
        } - {"static"}
        if len(orders) > 1:
            orders.discard("all_weak")
        if len(orders) > 1:
            return "mixed"
        order = orders.pop() if orders else "static"
        return "weak_first" if order == "all_weak" else order

    def describe(self) -> str:
        """One line, e.g. ``130/130: 250 steps, native p2; cond p4x120 -> p2x130; guidance ...``."""
        guidance = "off" if self.guidance_patch_sizes is None else _runs(self.guidance_patch_sizes)
        cache = ""
        if self.block_plan is not None:
            full = sum(set(actions) == {COMPUTE} for actions in self.block_plan)
            cache = f"; {self.cache} cache: {full} of {self.num_steps} steps compute every block"
        if self.sparse_grids is not None:
            cache += "; sparse grid " + _runs(self.sparse_grids, "s")
        if self.evaluations is not None:
            cache += f"; {sum(self.evaluations)} network evaluations per branch"
        return (
            f"{self.name}: {self.num_steps} steps, native {_patch_name(self.native_patch)}; "
            f"cond {_runs(self.cond_patch_sizes)}; guidance {guidance}{cache}"
        )

    def with_cache(self, policy: CachePolicy, depth: int) -> BudgetSchedule:
        """The same patch sizes with ``policy``'s block plan over ``depth`` blocks (no plan for no caching)."""
        plan = block_plan(policy, depth, self.cond_patch_sizes, self.guidance_patch_sizes)
        if plan is None:
            return self
        return dataclasses.replace(self, block_plan=plan, cache=policy.policy, name=f"{self.name} + {policy.label}")


def _order(weak: list[bool]) -> str:
    if not any(weak):
        return "static"
    if all(weak):
        return "all_weak"
    if weak == sorted(weak, reverse=True):
        return "weak_first"
    return "weak_last" if weak == sorted(weak) else "mixed"


def _dims(patch: Patch) -> tuple[int, ...]:
    return patch if isinstance(patch, tuple) else (patch,)


def _plain(patch: Patch) -> int | list[int]:
    """JSON/YAML form: tuples become lists."""
    return list(patch) if isinstance(patch, tuple) else patch


def _patch_tuple(sizes: Any, field: str) -> tuple[Patch, ...]:
    sizes = tuple(as_patch(p) for p in sizes)
    if not sizes:
        raise ValueError(f"{field} is empty; a schedule needs one patch size per sampling step")
    smallest = min(min(_dims(p)) for p in sizes)
    if smallest < 1:
        raise ValueError(f"{field} contains patch size {smallest}; patch sizes must be positive")
    return sizes


def _optional_list(sizes: tuple[Patch, ...] | None) -> list | None:
    return None if sizes is None else [_plain(p) for p in sizes]


def _counts(sizes: tuple[Patch, ...], evaluations: tuple[int, ...]) -> dict[Patch, int]:
    counts: Counter = Counter()
    for p, n in zip(sizes, evaluations, strict=True):
        counts[p] += n
    return dict(sorted(counts.items()))


def _runs(sizes: tuple[Patch, ...], prefix: str = "") -> str:
    """Run-length form in step order: ``p4x120 -> p2x130`` (video: ``p(1x4x4)x40 -> p(1x2x2)x10``); with a
    ``prefix`` plain values after it (sparse grids: ``s6x63 -> s7x24``)."""
    runs: list[list] = []
    for p in sizes:
        if runs and runs[-1][0] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return " -> ".join(f"{prefix + str(p) if prefix else _patch_name(p)}x{n}" for p, n in runs)


#################################################################################
#                                 Constructors                                  #
#################################################################################


def static(num_steps: int, native_patch: Patch, cfg: bool = True, name: str = "static") -> BudgetSchedule:
    """Every step of every branch at the native patch: the 100% reference."""
    steps = (native_patch,) * _check_steps(num_steps)
    return BudgetSchedule(steps, steps if cfg else None, native_patch, name)


def from_powerful_steps(
    num_steps: int,
    native_patch: Patch,
    weak_patch: Patch,
    powerful_steps: int,
    powerful_steps_guidance: int | None = None,
    cfg: bool = True,
    name: str | None = None,
) -> BudgetSchedule:
    """Paper schedule x/y: weak patch first, native patch for the last x cond and last y guidance steps.

    ``powerful_steps_guidance`` defaults to ``powerful_steps``; it is ignored when ``cfg`` is False.
    """
    return _two_patch(
        num_steps, native_patch, weak_patch, powerful_steps, powerful_steps_guidance, cfg, True, name
    )


def weak_last(
    num_steps: int,
    native_patch: Patch,
    weak_patch: Patch,
    powerful_steps: int,
    powerful_steps_guidance: int | None = None,
    cfg: bool = True,
    name: str | None = None,
) -> BudgetSchedule:
    """Ablation (paper Fig. 19): native patch for the FIRST x / y steps, weak patch for the rest."""
    return _two_patch(
        num_steps, native_patch, weak_patch, powerful_steps, powerful_steps_guidance, cfg, False, name
    )


def for_target(
    compute_fraction: float,
    num_steps: int,
    native_patch: Patch,
    weak_patch: Patch,
    cost: Cost,
    cfg: bool = True,
    name: str | None = None,
    weak_first: bool = True,
    at_most: bool = False,
    cache: CachePolicy | None = None,
    depth: int = 0,
    evaluations: tuple[int, ...] | None = None,
) -> BudgetSchedule:
    """Weak-first schedule x/x with the FEWEST powerful steps whose compute fraction reaches the target.

    The schedule therefore never spends less than the target: its fraction lies in
    ``[target, target + (1 - r) / T)`` (r = cost(weak) / cost(native)), within one step's granularity
    above it. ``at_most=True`` instead takes the MOST powerful steps that do not exceed the target
    (fraction in ``(target - (1 - r) / T, target]``): what a claim "at <= 60% compute" must sample with.
    Both branches get the same x, as in the paper's 130/130 and 70/70 schedules. ``weak_first=False``
    gives the weak-last ablation with the same x, hence exactly the same compute. ``cache`` adds its block
    plan over ``depth`` blocks to every candidate, so the fraction counts the caching too, and ``evaluations``
    (per step, :class:`BudgetSchedule`) counts a sampler's extra evaluations (Heun's).
    """
    num_steps = _check_steps(num_steps)
    if not 0.0 < compute_fraction <= 1.0:
        raise ValueError(
            f"compute fraction {compute_fraction} is outside (0, 1]; give the share of the static "
            "native-patch FLOPs, e.g. 0.6"
        )
    if cost(weak_patch) >= cost(native_patch):
        raise ValueError(
            f"weak patch {weak_patch} is not cheaper than native patch {native_patch} under this cost "
            "model; a compute target needs a larger weak patch"
        )

    def schedule(x: int) -> BudgetSchedule:
        patches = dataclasses.replace(_two_patch(
            num_steps, native_patch, weak_patch, x, None, cfg, weak_first, name or f"target {compute_fraction:g}"
        ), evaluations=evaluations)
        return patches if cache is None else patches.with_cache(cache, depth)

    floor = schedule(0).compute_fraction(cost)
    if compute_fraction < floor - _FRACTION_TOL:
        raise ValueError(
            f"compute fraction {compute_fraction:.4f} is below the minimum {floor:.4f} reachable with all "
            f"{num_steps} steps at weak patch {weak_patch}; raise the target or use a larger weak patch"
        )
    # The fraction grows with x and is 1.0 at x = num_steps >= target, so a match always exists; at x = 0
    # it is the floor <= target, so an at-most match does too.
    if at_most:
        return next(
            s
            for s in map(schedule, range(num_steps, -1, -1))
            if s.compute_fraction(cost) <= compute_fraction + _FRACTION_TOL
        )
    return next(
        s
        for s in map(schedule, range(num_steps + 1))
        if s.compute_fraction(cost) >= compute_fraction - _FRACTION_TOL
    )


def for_target_with_cache(
    compute_fraction: float,
    num_steps: int,
    native_patch: Patch,
    weak_patch: Patch | None,
    cost: Cost,
    policy: CachePolicy,
    depth: int,
    max_interval: int = 5,
    cfg: bool = True,
    name: str | None = None,
    weak_first: bool = True,
    at_most: bool = False,
    evaluations: tuple[int, ...] | None = None,
) -> BudgetSchedule:
    """A compute target over both axes: the LEAST caching that can reach it, then the patch schedule.

    Intervals N = 1 (no caching), 2, ... ``max_interval`` of ``policy`` are tried in turn; the first whose
    cheapest schedule (every step weak, caching every N-th step) is within the target gets the weak-first
    patch schedule of :func:`for_target` for the rest. Caching is the second resort because it reuses
    features a step computed for another noise level, while a weak step still sees its own input. Without a
    weak patch (a static model) caching alone meets the target: the cheapest interval that reaches it, or with
    ``at_most`` the smallest interval that does not exceed it.
    """
    if int(max_interval) != max_interval or max_interval < 1:
        raise ValueError(f"budget.max_interval={max_interval!r} must be a positive int")
    name = name or f"target {compute_fraction:g}"
    if weak_patch is None:
        base = dataclasses.replace(static(num_steps, native_patch, cfg, name), evaluations=evaluations)
        candidates = [base.with_cache(dataclasses.replace(policy, interval=n), depth) for n in range(1, int(max_interval) + 1)]
        fractions = [c.compute_fraction(cost) for c in candidates]  # falling with the interval
        if compute_fraction < fractions[-1] - _FRACTION_TOL or compute_fraction > 1.0:
            raise ValueError(f"compute fraction {compute_fraction:.4f} is out of reach of {policy.policy} caching with "
                             f"intervals up to {max_interval} (fractions {fractions[-1]:.4f}..1); "
                             "change the target or budget.max_interval")
        if at_most:  # the least caching within the target
            return next(c for c, f in zip(candidates, fractions) if f <= compute_fraction + _FRACTION_TOL)
        # the cheapest that still spends the target, as for_target
        return next(c for c, f in zip(candidates[::-1], fractions[::-1]) if f >= compute_fraction - _FRACTION_TOL)
    last_error = None
    for n in range(1, int(max_interval) + 1):
        try:
            return for_target(compute_fraction, num_steps, native_patch, weak_patch, cost, cfg, name, weak_first,
                              at_most, dataclasses.replace(policy, interval=n), depth, evaluations)
        except ValueError as err:  # below what this interval reaches: cache more
            last_error = err
    raise ValueError(f"{last_error} (with {policy.policy} caching up to interval {max_interval}); raise "
                     "budget.max_interval or the target")


@dataclass(frozen=True)
class SparseDensity:
    """SparseDiT's temporal token density (arXiv 2412.06028): the sparse grid side per sampling step.

    The fewest sparse tokens (``min_grid`` squared) for the first ``hold_fraction`` of sampling (the noisiest
    steps), then a token count growing linearly to ``max_grid`` squared by the last step; the side is that count's
    square root rounded up, so a step never gets fewer tokens than the linear count. Progress through sampling is
    u = k / (T - 1) at step k of T (0 = noisiest). The paper's 256 px schedule is 6x6 -> 10x10 of DiT-XL/2's 16x16
    tokens (pruning rates r = 1 - s²/256 in [0.61, 0.86], linear in r); at T = 250 its mean is 68.05 GMAC.
    """

    min_grid: int
    max_grid: int
    hold_fraction: float = 0.25

    def __post_init__(self) -> None:
        if not 1 <= int(self.min_grid) <= int(self.max_grid):
            raise ValueError(
                f"sparse density min_grid={self.min_grid}, max_grid={self.max_grid}: need 1 <= min_grid <= max_grid"
            )
        if not 0.0 <= float(self.hold_fraction) <= 1.0:
            raise ValueError(f"sparse density hold_fraction={self.hold_fraction} is outside [0, 1]")
        object.__setattr__(self, "min_grid", int(self.min_grid))
        object.__setattr__(self, "max_grid", int(self.max_grid))
        object.__setattr__(self, "hold_fraction", float(self.hold_fraction))

    def grid_at(self, progress: float) -> int:
        """Sparse grid side at ``progress`` u in [0, 1] through sampling (0 = the first, noisiest step)."""
        if progress < self.hold_fraction or self.hold_fraction >= 1.0:
            return self.min_grid
        share = min(1.0, (progress - self.hold_fraction) / (1.0 - self.hold_fraction))
        tokens = self.min_grid**2 + (self.max_grid**2 - self.min_grid**2) * share
        # rounded up, with slack so that float noise on an exact square (36.000000001) stays that square's side
        return min(self.max_grid, math.ceil(math.sqrt(tokens) - 1e-9))

    def grids(self, num_steps: int) -> tuple[int, ...]:
        """The side at every sampling step k of ``num_steps`` (progress k / (T - 1))."""
        num_steps = _check_steps(num_steps)
        return tuple(self.grid_at(k / max(1, num_steps - 1)) for k in range(num_steps))

    def grid_at_noise(self, level: float) -> int:
        """The side at noise level ``level`` in [0, 1] (1 = pure noise): a training draw at timestep t uses the grid
        of the sampling progress 1 - level, the step that denoises from t."""
        return self.grid_at(1.0 - float(level))

    @classmethod
    def of_model(cls, config: Mapping[str, Any], min_grid: int | None = None, max_grid: int | None = None,
                 hold_fraction: float | None = None) -> SparseDensity:
        """A SparseDiT config's ``sparse_grid_range`` (what it was built for), with any of the three overridden."""
        if "sparse_grid_range" not in config:
            raise ValueError("a sparse density schedule needs a SparseDiT (model arch sparse_dit); this model has no "
                             "sparse grid: use another budget")
        lo, hi = config["sparse_grid_range"]
        return cls(lo if min_grid is None else min_grid, hi if max_grid is None else max_grid,
                   0.25 if hold_fraction is None else hold_fraction)


def sparse_density(num_steps: int, native_patch: Patch, density: SparseDensity, cfg: bool = True,
                   name: str = "sparse_density") -> BudgetSchedule:
    """Every step at the native patch, each with the sparse grid of ``density`` (a SparseDiT's token density)."""
    return dataclasses.replace(static(num_steps, native_patch, cfg, name), sparse_grids=density.grids(num_steps))


def _check_steps(num_steps: int) -> int:
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"number of sampling steps must be a positive int, got {num_steps!r}")
    return int(num_steps)


def _two_patch(
    num_steps: int,
    native_patch: Patch,
    weak_patch: Patch,
    powerful_steps: int,
    powerful_steps_guidance: int | None,
    cfg: bool,
    weak_first: bool,
    name: str | None,
) -> BudgetSchedule:
    num_steps = _check_steps(num_steps)
    guidance = powerful_steps if powerful_steps_guidance is None else powerful_steps_guidance
    for label, count in (("powerful_steps", powerful_steps), ("powerful_steps_guidance", guidance)):
        if int(count) != count or not 0 <= count <= num_steps:
            raise ValueError(
                f"{label}={count!r} must be an int in [0, {num_steps}] (the number of sampling steps)"
            )
    x, y = int(powerful_steps), int(guidance)  # YAML may hand over 130.0

    def layout(powerful: int) -> tuple[Patch, ...]:
        weak, strong = (weak_patch,) * (num_steps - powerful), (native_patch,) * powerful
        return weak + strong if weak_first else strong + weak

    if name is None:
        name = f"{x}/{y}" if cfg else f"{x}/-"
        name = name if weak_first else f"weak_last {name}"
    return BudgetSchedule(layout(x), layout(y) if cfg else None, native_patch, name)


#################################################################################
#                          Hydra `budget` config group                          #
#################################################################################

# Parameters each `budget.mode` takes besides `mode`, `name` and `weak_patch` (fractions are of the step
# count T).
BUDGET_MODES: dict[str, tuple[str, ...]] = {
    "static": (),
    "powerful_steps": ("powerful_steps", "powerful_steps_guidance"),
    "powerful_fraction": ("powerful_fraction", "powerful_fraction_guidance"),
    "weak_last": ("powerful_fraction", "powerful_fraction_guidance"),
    "target": ("compute_fraction", "weak_first", "at_most", "cache_policy", "cache_order", "max_interval"),
    "sparse_density": ("min_grid", "max_grid", "hold_fraction"),
}


def build_schedule(
    budget_cfg: Mapping[str, Any],
    num_steps: int,
    native_patch: Patch,
    weak_patch: Patch | None,
    cost: Cost | None,
    cfg: bool = True,
    available_patch_sizes: Collection[Patch] | None = None,
    evaluations: tuple[int, ...] | None = None,
) -> BudgetSchedule:
    """Schedule for a `budget` config node (conf/budget/*.yaml) and a sampler with ``num_steps`` steps.

    Modes: ``static``; ``powerful_steps`` (x, y as step counts); ``powerful_fraction`` (x, y as
    fractions of T, rounded half up, so presets work for any T); ``weak_last`` (same fractions,
    powerful steps first); ``target`` (``compute_fraction`` solved with ``cost``, see
    :func:`for_target`; ``weak_first: false`` puts the same powerful steps first, ``at_most: true``
    rounds to the schedule that does not exceed the target instead of the one that reaches it;
    ``cache_policy`` (fora, delta_dit, taylorseer with ``cache_order``) solves over weak steps and block
    caching up to ``max_interval``, :func:`for_target_with_cache`); ``sparse_density`` (a SparseDiT's sparse grid
    per step, :class:`SparseDensity`; ``min_grid``/``max_grid`` null take the model's range). A missing guidance
    parameter means "same as the conditional one"; guidance parameters are ignored without CFG. ``weak_patch`` in the node (e.g. [2, 2, 2], a video DiT's weak
    temporal patch) replaces the sampler's weak patch, so a preset can pick one of several weak modes.
    ``evaluations`` is the sampler's network evaluations per step (None: one; Heun: 1, 2, ..., 2), counted in the
    schedule's compute and in what a target solves for.
    """
    node = dict(budget_cfg)
    mode = node.pop("mode", None)
    name = node.pop("name", None) or mode
    chosen = node.pop("weak_patch", None)
    weak_patch = weak_patch if chosen is None else as_patch(chosen)
    if mode not in BUDGET_MODES:
        raise ValueError(f"budget.mode={mode!r} is unknown; use one of {list(BUDGET_MODES)}")
    unknown = sorted(set(node) - set(BUDGET_MODES[mode]))
    if unknown:
        takes = list(BUDGET_MODES[mode]) or "no parameters"
        raise ValueError(f"budget.mode={mode!r} does not take {unknown}; it takes {takes}")

    if mode == "static":
        schedule = static(num_steps, native_patch, cfg, name)
    elif mode == "sparse_density":
        density = SparseDensity.of_model(getattr(cost, "config", {}), node.get("min_grid"), node.get("max_grid"),
                                         node.get("hold_fraction"))
        schedule = sparse_density(num_steps, native_patch, density, cfg, name)
    elif mode == "target" and node.get("cache_policy") not in (None, "none"):
        schedule = _target_with_cache(node, num_steps, native_patch, weak_patch, cost, cfg, name, evaluations)
    else:
        if weak_patch is None:
            raise ValueError(
                f"budget.mode={mode!r} needs a weak patch size but none is available (native patch "
                f"{native_patch} only); use budget=static or flexify the model with a weak patch"
            )
        if mode == "target":
            if cost is None:
                raise ValueError(
                    "budget.mode='target' needs a cost model (flexdit_train.flops.cost_model) to solve for"
                )
            fraction = _required(node, "compute_fraction", mode)
            weak_first, at_most = node.get("weak_first", True), node.get("at_most", False)
            for key, value in (("weak_first", weak_first), ("at_most", at_most)):
                if not isinstance(value, bool):
                    raise ValueError(f"budget.{key} must be true or false, got {value!r}")
            schedule = for_target(fraction, num_steps, native_patch, weak_patch, cost, cfg, name, weak_first,
                                  at_most, evaluations=evaluations)
        elif mode == "powerful_steps":
            x = _required(node, "powerful_steps", mode)
            schedule = from_powerful_steps(
                num_steps, native_patch, weak_patch, x, node.get("powerful_steps_guidance"), cfg, name
            )
        else:
            x = _steps_of(_required(node, "powerful_fraction", mode), num_steps)
            guidance = node.get("powerful_fraction_guidance")
            y = None if guidance is None else _steps_of(guidance, num_steps)
            layout = weak_last if mode == "weak_last" else from_powerful_steps
            schedule = layout(num_steps, native_patch, weak_patch, x, y, cfg, name)

    schedule = dataclasses.replace(schedule, evaluations=evaluations)
    if available_patch_sizes is not None:
        schedule.validate(available_patch_sizes)
    return schedule


def _target_with_cache(node: Mapping[str, Any], num_steps: int, native_patch: Patch, weak_patch: Patch | None,
                       cost: Cost | None, cfg: bool, name: str, evaluations: tuple[int, ...] | None) -> BudgetSchedule:
    """budget.mode=target with budget.cache_policy: :func:`for_target_with_cache` on the cost's depth."""
    depth = getattr(cost, "config", {}).get("depth")
    if depth is None:
        raise ValueError("budget.cache_policy needs a cost model with the network's depth (flexdit_train.flops.CostModel)")
    policy = CachePolicy(node["cache_policy"], order=node.get("cache_order", 1))
    return for_target_with_cache(
        _required(node, "compute_fraction", "target"), num_steps, native_patch, weak_patch, cost, policy, depth,
        node.get("max_interval", 5), cfg, name, node.get("weak_first", True), node.get("at_most", False), evaluations,
    )


def _required(node: Mapping[str, Any], key: str, mode: str) -> Any:
    if node.get(key) is None:
        raise ValueError(f"budget.mode={mode!r} needs budget.{key}; set it, e.g. budget.{key}=...")
    return node[key]


def _steps_of(fraction: float, num_steps: int) -> int:
    """Fraction of the T steps -> step count, rounded half up (0.52 of 250 -> 130, of 50 -> 26)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(
            f"powerful fraction {fraction} is outside [0, 1]; it is a share of the sampling steps"
        )
    # The slack keeps float products such as 0.35 * 10 = 3.4999999999999996 rounding up.
    return math.floor(fraction * num_steps + 0.5 + _FRACTION_TOL)

"""Training-free block caching as schedule data: which blocks each sampling step recomputes, reuses or forecasts.

A *block plan* has one string per sampling step with one character per transformer block:

- ``"C"``: compute the block and remember its residual delta ``block(x) - x``;
- ``"0"``: reuse the block's last computed delta (FORA, Δ-DiT): ``x + delta``, no block arithmetic;
- ``"1"``..``"9"``: forecast the delta with a polynomial of that order through the block's last ``order + 1``
  computed deltas, in the sampling-step index (TaylorSeer). Reuse is the order-0 forecast.

The plan is data next to the patch sizes of :class:`flexdit_train.sampling.schedule.BudgetSchedule`
(``block_plan``), so the sampler executes it (:class:`BlockCache`), the FLOPs package prices it (a reused block
costs nothing, a forecast its ``order + 1`` multiply-adds per feature) and cards record it. Policies
(:func:`block_plan`, presets in ``conf/cache/``) turn an interval ``N`` into a plan:

- ``fora``: every N-th step computes every block, the steps between reuse every block's delta (FORA, arXiv
  2407.01425, caches the attention and MLP outputs of each block; their gated sum is the block's delta);
- ``delta_dit``: every N-th step computes every block; between them the *rear* ``cached_share`` of the blocks
  is reused during the first ``boundary`` of the steps (outline generation) and the *front* share after it
  (Δ-DiT, arXiv 2406.01125: the rear blocks shape the outline early, the front blocks the details late);
- ``taylorseer``: every N-th step computes every block, the steps between forecast every block with order
  ``order`` (TaylorSeer, arXiv 2503.06923), lower while fewer computed steps exist.

Deltas are kept per call (which branches the forward carries and at which patch size): a delta from a weak step
has another token count than the native one, so every change of a branch's patch size starts a new cache; the
plan recomputes every block there (the phase of the interval restarts), which is what the pricing counts.

TaylorSeer writes its forecast as a truncated Taylor series with finite-difference derivatives, which is exact
for polynomials of degree 1 only; here the same points give the Lagrange (Newton) polynomial, exact for
polynomials up to the order, on any spacing of the computed steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

COMPUTE = "C"
POLICIES = ("none", "fora", "delta_dit", "taylorseer")


@dataclass(frozen=True)
class CachePolicy:
    """A caching policy (``conf/cache/*.yaml``): ``policy`` one of :data:`POLICIES`, ``interval`` N (every N-th
    step computes every block), ``order`` (taylorseer), ``cached_share`` and ``boundary`` (delta_dit)."""

    policy: str = "none"
    interval: int = 1
    order: int = 1
    cached_share: float = 0.5
    boundary: float = 0.5
    name: str | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"cache.policy={self.policy!r} is unknown; use one of {list(POLICIES)}")
        if int(self.interval) != self.interval or self.interval < 1:
            raise ValueError(f"cache.interval={self.interval!r} must be a positive int (1 = compute every step)")
        if int(self.order) != self.order or not 0 <= self.order <= 9:
            raise ValueError(f"cache.order={self.order!r} must be an int in [0, 9] (0 = reuse)")
        for key in ("cached_share", "boundary"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"cache.{key}={getattr(self, key)!r} must lie in [0, 1]")

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> CachePolicy:
        """The policy of a ``cache`` config node; None or an empty node is no caching."""
        node = dict(node or {})
        unknown = sorted(set(node) - {"policy", "interval", "order", "cached_share", "boundary", "name"})
        if unknown:
            raise ValueError(f"cache does not take {unknown}; it takes policy, interval, order, cached_share, "
                             "boundary and name")
        return cls(**node)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.policy == "none" or self.interval == 1:
            return "none"
        if self.policy == "taylorseer":
            return f"taylorseer_o{self.order}_n{self.interval}"
        return f"{self.policy}_n{self.interval}"

    def step_actions(self, depth: int, step: int, num_steps: int, order: int) -> str:
        """The block string of a step that is not a full compute step; ``order`` is the forecast order the
        computed steps so far allow (already capped at :attr:`order` for taylorseer)."""
        if self.policy == "fora":
            return "0" * depth
        if self.policy == "taylorseer":
            return str(order) * depth
        cached = round(self.cached_share * depth)
        if step < self.boundary * num_steps:  # outline phase: reuse the rear blocks
            return COMPUTE * (depth - cached) + "0" * cached
        return "0" * cached + COMPUTE * (depth - cached)


def block_plan(
    policy: CachePolicy,
    depth: int,
    cond_patch_sizes: Sequence[Any],
    guidance_patch_sizes: Sequence[Any] | None = None,
) -> tuple[str, ...] | None:
    """The block plan of ``policy`` over a schedule's steps, or None when it computes everything.

    The interval's phase restarts wherever either branch changes its patch size: that step computes every block,
    as the deltas of the previous size do not fit the new token count.
    """
    if policy.policy == "none" or policy.interval == 1:
        return None
    steps = len(cond_patch_sizes)
    guidance = list(guidance_patch_sizes) if guidance_patch_sizes is not None else [None] * steps
    plan, phase, computed = [], 0, 0
    for k in range(steps):
        if k > 0 and (cond_patch_sizes[k] != cond_patch_sizes[k - 1] or guidance[k] != guidance[k - 1]):
            phase, computed = 0, 0
        if phase % policy.interval == 0:
            plan.append(COMPUTE * depth)
            computed += 1
        else:
            plan.append(policy.step_actions(depth, k, steps, min(policy.order, computed - 1)))
        phase += 1
    return tuple(plan)


def check_block_plan(plan: Sequence[str], num_steps: int, depth: int | None = None) -> tuple[str, ...]:
    """A plan as a tuple, with a one-line error when its shape or characters are wrong."""
    plan = tuple(str(s) for s in plan)
    if len(plan) != num_steps:
        raise ValueError(f"the block plan has {len(plan)} steps but the schedule {num_steps}; give one string per step")
    widths = {len(s) for s in plan}
    if len(widths) != 1 or (depth is not None and widths != {depth}):
        raise ValueError(f"block plan strings have lengths {sorted(widths)}; give one character per block"
                         + (f" ({depth} blocks)" if depth is not None else ""))
    bad = sorted({c for s in plan for c in s} - set(COMPUTE + "0123456789"))
    if bad:
        raise ValueError(f"block plan characters {bad} are unknown; use C (compute), 0 (reuse), 1-9 (forecast order)")
    return plan


def lagrange_weights(nodes: Sequence[float], at: float) -> list[float]:
    """Weights w_j with p(at) = sum_j w_j p(nodes[j]) for every polynomial p of degree < len(nodes)."""
    weights = []
    for j, xj in enumerate(nodes):
        w = 1.0
        for m, xm in enumerate(nodes):
            if m != j:
                w *= (at - xm) / (xj - xm)
        weights.append(w)
    return weights


class BlockCache:
    """Executes a block plan while a sampler runs: the model's ``run_blocks`` hands every block to :meth:`block`.

    :meth:`call` opens one network call of sampling step ``step`` for a key (the branches it carries and its
    patch size); deltas are remembered per key and block, the last ``max_order + 1`` of them.
    """

    def __init__(self, plan: Sequence[str]):
        self.plan = tuple(plan)
        self.keep = 1 + max((int(c) for s in self.plan for c in s if c != COMPUTE), default=0)
        self.history: dict[tuple[Any, int], list[tuple[int, torch.Tensor]]] = {}
        self.block_calls = 0  # blocks computed since construction (tests, benchmarks)
        self._call: tuple[int, Any] | None = None

    @contextlib.contextmanager
    def call(self, step: int, key: Any) -> Iterator[None]:
        self._call = (step, key)
        try:
            yield
        finally:
            self._call = None

    def block(self, index: int, x: torch.Tensor, compute) -> torch.Tensor:
        """Block ``index`` on tokens ``x``: ``compute(x)`` or the plan's reuse / forecast of its delta."""
        if self._call is None:  # a forward outside a sampling step (e.g. a caller's own): no caching
            return compute(x)
        step, key = self._call
        action = self.plan[step][index]
        entries = self.history.setdefault((key, index), [])
        if action == COMPUTE:
            out = compute(x)  # (N, T, D): exactly the uncached block output
            self.block_calls += 1
            entries[:] = [e for e in entries if e[0] != step]  # a step called twice (Heun) keeps its latest delta
            entries.append((step, out - x))
            del entries[: -self.keep]
            return out
        order = int(action)
        if len(entries) < order + 1:
            raise RuntimeError(f"block {index} at step {step} forecasts with order {order} from {len(entries)} "
                               "computed deltas; the plan must compute a block before it reuses it")
        points = entries[-(order + 1):]
        if order == 0:
            return x + points[0][1]
        weights = lagrange_weights([float(s) for s, _ in points], float(step))
        delta = sum(w * d for w, (_, d) in zip(weights, points, strict=True))  # (N, T, D)
        return x + delta


@contextlib.contextmanager
def installed(model: nn.Module, cache: BlockCache | None) -> Iterator[None]:
    """Let ``model`` (or the network inside a ``torch.compile`` wrapper) run its blocks through ``cache``."""
    net = getattr(model, "_orig_mod", model)
    if cache is None:
        yield
        return
    net.block_cache = cache
    try:
        yield
    finally:
        net.block_cache = None

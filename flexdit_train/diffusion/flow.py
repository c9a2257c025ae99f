"""Flow matching: the network predicts the velocity of an interpolant between data and noise.

Written from the papers (Lipman et al. 2023; Liu et al. 2023, rectified flow; Albergo & Vanden-Eijnden
2023, stochastic interpolants; Ma et al. 2024, SiT; Esser et al. 2024, SD3's logit-normal times).

Convention: t in [0, 1], t = 0 is data and t = 1 is noise, the same direction as DDPM's step index:
    x_t = alpha_t x0 + sigma_t eps,    eps ~ N(0, I)
with the interpolants
    linear (rectified flow, SD3): alpha_t = 1 - t,         sigma_t = t           -> velocity eps - x0
    gvp (SiT's variance preserving): alpha_t = cos(pi t/2), sigma_t = sin(pi t/2)
The network is trained on the velocity u_t = d x_t / dt = alpha'_t x0 + sigma'_t eps (MSE), so its output
approximates v(x, t) = E[u_t | x_t = x], and sampling integrates dx/dt = v from t = 1 down to t = 0.
The network sees t as ``NETWORK_TIME_SCALE * t`` (0..1000): the range DiT's sinusoidal timestep embedding
was designed for, noise at the top as under DDPM. A network with learned-variance channels (learn_sigma,
2C outputs) is read through its first C channels only; the other half gets no gradient and is ignored.

Sampling steps are named ``euler50``, ``heun25`` and ``sde100`` (method and number of steps on a uniform
t grid). The object exposes the interface of the Gaussian diffusion that training and the sampler
pipeline use: ``sample_timesteps``, ``training_losses``, ``q_sample``, ``network_time``, ``noise_quartile``,
``timestep_map`` (the network times of the sampling steps, ascending, one per budget-schedule step),
``default_sample_method``, ``process`` and ``sample``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from flexdit_train.diffusion.losses import mean_flat
from flexdit_train.diffusion.rng import Generators, randn

ModelFn = Callable[..., torch.Tensor]

INTERPOLANTS = ("linear", "gvp")
TIME_SAMPLINGS = ("uniform", "logit_normal")
FLOW_SAMPLE_METHODS = ("euler", "heun", "sde")
# t in [0, 1] -> the network's timestep input: DiT's embedding frequencies span a 0..1000 range.
NETWORK_TIME_SCALE = 1000.0
# What a flow checkpoint records that changes the network's target: samplers and fine-tunes must agree on these.
FLOW_TARGET_KEYS = ("kind", "interpolant", "prediction")

_STEPS_PATTERN = re.compile(r"^(euler|heun|sde)(\d+)$")


def parse_flow_steps(steps: str) -> tuple[str, int] | None:
    """``"heun25"`` -> ("heun", 25); None when ``steps`` does not name a flow sampler."""
    match = _STEPS_PATTERN.match(str(steps).strip())
    if match is None:
        return None
    count = int(match.group(2))
    if count < 1:
        raise ValueError(f"sampling_steps={steps!r} needs at least 1 step, e.g. {match.group(1)}50")
    return match.group(1), count


class FlowMatching:
    """Velocity-prediction flow matching with one interpolant, one training-time distribution and one sampler.

    ``time_sampling``: "uniform" t ~ U(0, 1), or "logit_normal" t = sigmoid(m + s n), n ~ N(0, 1)
    (``logit_mean`` m, ``logit_std`` s; SD3 trains with m = 0, s = 1, which favours the middle times).
    ``sample_method`` / ``num_steps``: the sampler ``sample`` runs by default (sampling instances are built
    by :func:`sampling_flow` from a steps name).
    """

    def __init__(
        self,
        interpolant: str = "linear",
        time_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        sample_method: str = "euler",
        num_steps: int = 50,
    ):
        if interpolant not in INTERPOLANTS:
            raise ValueError(f"unknown interpolant {interpolant!r}; use one of {', '.join(INTERPOLANTS)}")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {time_sampling!r}; use one of {', '.join(TIME_SAMPLINGS)}")
        if not logit_std > 0:
            raise ValueError(f"logit_std={logit_std} must be > 0")
        if sample_method not in FLOW_SAMPLE_METHODS:
            raise ValueError(f"unknown flow sampler {sample_method!r}; use one of {', '.join(FLOW_SAMPLE_METHODS)}")
        if int(num_steps) < 1:
            raise ValueError(f"num_steps={num_steps} must be >= 1")
        self.interpolant = interpolant
        self.time_sampling = time_sampling
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.default_sample_method = sample_method
        self.num_steps = int(num_steps)
        # Uniform grid from noise (t = 1) to data (t = 0); the network times are float32 once, so the values
        # the sampler passes are exactly the timestep_map entries the budget schedule is keyed by.
        self.times = np.linspace(1.0, 0.0, self.num_steps + 1)  # (K+1,) float64
        self._network_times = torch.from_numpy(NETWORK_TIME_SCALE * self.times).float()  # (K+1,)
        # Checkpoints store this and sampling_flow rebuilds from it; the time distribution is recorded for
        # the record's sake but does not change the target (FLOW_TARGET_KEYS).
        self.process = {
            "kind": "flow", "interpolant": interpolant, "prediction": "velocity", "time_sampling": time_sampling,
            "logit_mean": self.logit_mean, "logit_std": self.logit_std,
        }

    # ------------------------------------------------------------------------------ schedule
    @property
    def evaluations_per_step(self) -> tuple[int, ...] | None:
        """Network evaluations of each of the K steps with the default sampler, in step order (None: one each).
        Heun: 1 at the first step, 2 after it (the corrector of step i - 1 evaluates at grid point i), so 2K - 1."""
        if self.default_sample_method != "heun" or self.num_steps == 1:
            return None
        return (1,) + (2,) * (self.num_steps - 1)

    @property
    def timestep_map(self) -> torch.Tensor:
        """(K,) float32 network times of the K sampling steps, ascending (the last one is the noisiest)."""
        return self._network_times[: self.num_steps].flip(0)

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t and their time derivatives at t (any shape, float)."""
        if self.interpolant == "linear":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        angle = 0.5 * math.pi * t
        return torch.cos(angle), torch.sin(angle), -0.5 * math.pi * torch.sin(angle), 0.5 * math.pi * torch.cos(angle)

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) t in [0, 1] -> the timestep values the network was trained on."""
        return NETWORK_TIME_SCALE * t

    def noise_quartile(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) 0..3: which quarter of [0, 1] each t lies in (0 = least noisy), for the loss breakdown."""
        return (t * 4).long().clamp(max=3)

    # ------------------------------------------------------------------------------ training
    def sample_timesteps(
        self, n: int, device: torch.device | str, generator: Generators = None,
        within: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """(n,) float32 training times from the configured distribution; ``within=(lo, hi)`` maps that
        distribution affinely onto [lo, hi] (a patch size's ``timestep_ranges``)."""
        if self.time_sampling == "uniform":
            t = torch.rand(n, device=device) if generator is None else _uniform(n, generator, device)
        else:
            normal = randn((n,), generator, device)  # (n,)
            t = torch.sigmoid(self.logit_mean + self.logit_std * normal)
        if within is not None:
            lo, hi = within
            t = lo + (hi - lo) * t
        return t

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps at times t (N,)."""
        noise = torch.randn_like(x0) if noise is None else noise
        alpha, sigma, _, _ = self.coefficients(_expand(t, x0.ndim))
        return alpha * x0 + sigma * noise

    def velocity_output(self, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(N, C_out, ...) network output -> (N, C, ...) velocity: all of it, or the first half of a
        learned-variance (2C) output."""
        channels = x.shape[1]
        if model_output.shape[1] == 2 * channels:
            return model_output[:, :channels]
        if model_output.shape[1] != channels:
            raise ValueError(
                f"model returned {model_output.shape[1]} channels for a {channels}-channel input; flow matching "
                f"reads the velocity from {channels} channels (or the first half of {2 * channels})"
            )
        return model_output

    def training_losses(
        self,
        model: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, Any] | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample (N,) "loss" and "mse" (the same): the MSE between the predicted and the true velocity
        alpha'_t x0 + sigma'_t eps at times t (N,) in [0, 1]."""
        noise = torch.randn_like(x0) if noise is None else noise
        alpha, sigma, d_alpha, d_sigma = self.coefficients(_expand(t, x0.ndim))  # (N, 1, ...) each
        x_t = alpha * x0 + sigma * noise  # (N, C, ...)
        model_output = model(x_t, self.network_time(t), **(cond or {})).float()  # (N, C_out, ...)
        target = d_alpha * x0 + d_sigma * noise  # (N, C, ...)
        mse = mean_flat((target - self.velocity_output(model_output, x_t)) ** 2)  # (N,)
        return {"mse": mse, "loss": mse}

    # ------------------------------------------------------------------------------ sampling
    def predictions(self, velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E[x0 | x_t] and E[eps | x_t] implied by the velocity at x_t: the 2x2 system x = a x0 + s eps,
        v = a' x0 + s' eps, whose determinant a s' - s a' is 1 (linear) or pi/2 (gvp), never 0."""
        alpha, sigma, d_alpha, d_sigma = self.coefficients(_expand(t, x.ndim))
        det = alpha * d_sigma - sigma * d_alpha
        return (d_sigma * x - sigma * velocity) / det, (alpha * velocity - d_alpha * x) / det

    def _velocity(
        self, model: ModelFn, x: torch.Tensor, step: int, cond: dict[str, Any] | None, clip_denoised: bool
    ) -> torch.Tensor:
        """The network's velocity at grid point ``step``; with ``clip_denoised`` the implied x0 is clamped to
        [-1, 1] and the velocity rebuilt from it and the (unclipped) implied noise."""
        network_t = self._network_times[step].to(x.device).expand(x.shape[0])  # (N,)
        velocity = self.velocity_output(model(x, network_t, **(cond or {})).float(), x)  # (N, C, ...)
        if not clip_denoised:
            return velocity
        t = torch.full((x.shape[0],), float(self.times[step]), device=x.device)  # (N,)
        x0, eps = self.predictions(velocity, x, t)
        _, _, d_alpha, d_sigma = self.coefficients(_expand(t, x.ndim))
        return d_alpha * x0.clamp(-1, 1) + d_sigma * eps

    @torch.no_grad()
    def sample(
        self,
        model: ModelFn,
        noise: torch.Tensor,
        cond: dict[str, Any] | None = None,
        *,
        method: str | None = None,
        clip_denoised: bool = False,
        progress: bool = False,
        generator: Generators = None,
    ) -> torch.Tensor:
        """Integrate from x_1 = noise to x_0 over the K-step uniform grid with ``method``:

        - "euler": x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i); K network evaluations.
        - "heun": Euler predictor, then the trapezoid of v at both ends; the last step stays Euler (as in
          EDM, it spares an evaluation at t = 0), so 2K - 1 evaluations. The corrector's evaluation at
          t_{i+1} runs at the patch size the budget schedule gives grid point i + 1.
        - "sde": Euler-Maruyama on the reverse-time SDE with the same marginals as the flow,
          dx = [v - (w/2) score] dt + sqrt(w) dW (dt < 0), with the diffusion coefficient w(t) = sigma_t
          (most noise where x_t is noisiest, none at the data): the score comes from the velocity,
          score = -E[eps | x_t] / sigma_t, so
          (w/2) score = -E[eps | x_t] / 2 stays finite at t = 0. The last step adds no noise (it would
          only blur x_0). K evaluations.

        ``model(x, t, **cond)`` gets the network times of :attr:`timestep_map`, one per grid point, so a
        :class:`~flexdit_train.sampling.guidance.ScheduledDenoiser` picks each step's patch sizes and guidance.
        Budget schedules count Heun's 2K - 1 evaluations through :attr:`evaluations_per_step`.
        """
        method = method or self.default_sample_method
        if method not in FLOW_SAMPLE_METHODS:
            raise ValueError(f"unknown flow sampler {method!r}; use one of {', '.join(FLOW_SAMPLE_METHODS)}")
        x = noise
        last = self.num_steps - 1
        for i in tqdm(range(self.num_steps), disable=not progress, desc="sampling"):
            dt = float(self.times[i + 1] - self.times[i])  # < 0: from noise towards data
            velocity = self._velocity(model, x, i, cond, clip_denoised)  # (N, C, ...)
            if method == "euler":
                x = x + dt * velocity
            elif method == "heun":
                predicted = x + dt * velocity  # (N, C, ...) the Euler step
                if i < last:
                    corrected = self._velocity(model, predicted, i + 1, cond, clip_denoised)
                    x = x + 0.5 * dt * (velocity + corrected)
                else:
                    x = predicted
            else:
                t = torch.full((x.shape[0],), float(self.times[i]), device=x.device)  # (N,)
                _, eps = self.predictions(velocity, x, t)
                x = x + dt * (velocity + 0.5 * eps)
                if i < last:
                    sigma = float(self.coefficients(torch.tensor(self.times[i]))[1])
                    std = math.sqrt(sigma * -dt)  # sqrt(w |dt|)
                    x = x + std * randn(x.shape, generator, x.device, x.dtype)
        return x


def _expand(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(N,) -> (N, 1, ..., 1) broadcastable against an ndim-dim batch, float32."""
    return t.float().reshape(-1, *([1] * (ndim - 1)))


def _uniform(n: int, generator: Generators, device: torch.device | str) -> torch.Tensor:
    """(n,) U(0, 1) with the generator conventions of :mod:`flexdit_train.diffusion.rng`."""
    if isinstance(generator, torch.Generator):
        return torch.rand(n, generator=generator, device=generator.device).to(device)
    if len(generator) != n:
        raise ValueError(f"got {len(generator)} generators for a batch of {n}; pass one per sample")
    return torch.cat([torch.rand(1, generator=g, device=g.device) for g in generator]).to(device)


def create_flow(
    interpolant: str = "linear",
    prediction: str = "velocity",
    time_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> FlowMatching:
    """The flow-matching process of ``conf/process/flow.yaml`` (for training; samplers come from
    :func:`sampling_flow`). ``prediction`` is always "velocity": named so configs and checkpoints say it."""
    if prediction != "velocity":
        raise ValueError(f"flow matching predicts the velocity, not prediction={prediction!r} (a Gaussian-diffusion "
                         "setting, e.g. from an mnist experiment): set objective.diffusion.prediction=velocity")
    return FlowMatching(interpolant, time_sampling, logit_mean, logit_std)


def sampling_flow(process: dict[str, Any], steps: str) -> FlowMatching:
    """The flow of a checkpoint's recorded ``process`` with the sampler named by ``steps`` ("euler50")."""
    parsed = parse_flow_steps(steps)
    if parsed is None:
        raise ValueError(
            f"this model was trained with flow matching, which sampling_steps={steps!r} (a DDPM/DDIM respacing) "
            "cannot sample: use a flow sampler, e.g. sampling_steps=euler50, heun25 or sde100"
        )
    method, count = parsed
    unknown = sorted(set(process) - {"kind", "interpolant", "prediction", "time_sampling", "logit_mean", "logit_std"})
    if unknown:
        raise ValueError(f"flow process keys {unknown} are unknown to this flexdit_train; it reads kind, "
                         "interpolant, prediction, time_sampling, logit_mean, logit_std")
    if process.get("prediction", "velocity") != "velocity":
        raise ValueError(f"flow process prediction={process['prediction']!r} is unknown; only velocity is supported")
    return FlowMatching(
        process.get("interpolant", "linear"), process.get("time_sampling", "uniform"),
        process.get("logit_mean", 0.0), process.get("logit_std", 1.0), method, count,
    )

"""Discrete-time Gaussian diffusion (DDPM): forward process, hybrid training loss, DDPM and DDIM samplers.

Written from the papers: Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (learned variance, hybrid loss),
Song et al. 2021 (DDIM). The channel axis is dim 1 and every reduction runs over all non-batch dims,
so image (N, C, H, W) and video (N, C, F, H, W) latents share the code.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from flexdit_train.diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from flexdit_train.diffusion.rng import Generators, randint, randn

ModelFn = Callable[..., torch.Tensor]

SAMPLE_METHODS = ("ddpm", "ddim")


class ModelMeanType(enum.Enum):
    """What the first C output channels predict."""

    EPSILON = "epsilon"  # the added noise (DiT)
    START_X = "start_x"  # the clean sample x0
    VELOCITY = "velocity"  # v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022)


class ModelVarType(enum.Enum):
    """How the reverse-step variance is chosen."""

    LEARNED_RANGE = "learned_range"  # C extra channels v in [-1, 1] interpolate log beta_t and log beta~_t
    FIXED_SMALL = "fixed_small"  # the posterior variance beta~_t
    FIXED_LARGE = "fixed_large"  # beta_t (with beta~_1 at t = 0, so the decoder variance is not too big)


class LossType(enum.Enum):
    """Training objective."""

    MSE = "mse"  # MSE on the mean prediction, plus the stop-gradient bound when the variance is learned
    RESCALED_MSE = "rescaled_mse"  # as MSE, with the bound weighted by num_timesteps / 1000
    RESCALED_KL = "rescaled_kl"  # the variational bound alone, times num_timesteps


class GaussianDiffusion:
    """Schedules, training losses and samplers for a diffusion with the given (T,) betas."""

    def __init__(
        self,
        betas: Sequence[float] | np.ndarray,
        model_mean_type: ModelMeanType = ModelMeanType.EPSILON,
        model_var_type: ModelVarType = ModelVarType.LEARNED_RANGE,
        loss_type: LossType = LossType.MSE,
        default_sample_method: str = "ddpm",
    ):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a non-empty 1-D sequence of values in (0, 1]")
        if default_sample_method not in SAMPLE_METHODS:
            raise ValueError(
                f"unknown sample method {default_sample_method!r}; choose one of {', '.join(SAMPLE_METHODS)}"
            )
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.default_sample_method = default_sample_method

        # Every table is float64 numpy; `_gather` casts to float32 only when indexing at use.
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, beta~_t), beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        # beta~_0 = 0, so its log is replaced by log beta~_1 (the "clipped" posterior log-variance).
        posterior_variance_clipped = np.append(self.posterior_variance[1], self.posterior_variance[1:])
        self.posterior_log_variance_clipped = np.log(posterior_variance_clipped)
        self.log_betas = np.log(betas)
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

        self._timestep_map = np.arange(len(betas), dtype=np.int64)
        self._device_tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def timestep_map(self) -> torch.Tensor:
        """(T,) int64: the original timestep the network sees for each step index, ascending."""
        return torch.from_numpy(self._timestep_map.copy())

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """A schedule table on ``device`` (float32, or int64 for the timestep map), cached per device."""
        key = (name, device)
        if key not in self._device_tables:
            array = getattr(self, name)
            table = torch.from_numpy(array).to(device)
            self._device_tables[key] = table.float() if table.is_floating_point() else table
        return self._device_tables[key]

    def _gather(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Values of a schedule table at steps t (N,) -> (N, 1, ..., 1) broadcastable to ndim dims."""
        return self._table(name, t.device)[t].reshape(-1, *([1] * (ndim - 1)))

    ##########################################################################
    #                          Forward process q                             #
    ##########################################################################

    def sample_timesteps(
        self, n: int, device: torch.device | str, generator: Generators = None,
        within: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """(n,) int64 step indices uniform over [0, num_timesteps), or over [lo·T, hi·T) for ``within=(lo, hi)``
        (fractions of the chain, at least one step wide; a patch size's ``timestep_ranges``)."""
        if within is None:
            return randint(self.num_timesteps, n, generator, device)
        lo, hi = within
        first = int(round(lo * self.num_timesteps))
        last = min(max(int(round(hi * self.num_timesteps)), first + 1), self.num_timesteps)
        return torch.randint(first, last, (n,), device=device)

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) step indices -> the original timesteps the network was trained on."""
        return self._table("_timestep_map", t.device)[t]

    def noise_quartile(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) 0..3: which quarter of the chain each step index lies in (0 = least noisy)."""
        return (t * 4 // self.num_timesteps).clamp(max=3)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)."""
        noise = torch.randn_like(x0) if noise is None else noise
        return (
            self._gather("sqrt_alphas_cumprod", t, x0.ndim) * x0
            + self._gather("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise
        )

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0); the last two broadcastable."""
        mean = (
            self._gather("posterior_mean_coef1", t, x_t.ndim) * x0
            + self._gather("posterior_mean_coef2", t, x_t.ndim) * x_t
        )
        variance = self._gather("posterior_variance", t, x_t.ndim)
        log_variance = self._gather("posterior_log_variance_clipped", t, x_t.ndim)
        return mean, variance, log_variance

    ##########################################################################
    #                          Reverse process p                             #
    ##########################################################################

    def _run_model(
        self, model: ModelFn, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any] | None
    ) -> torch.Tensor:
        """Call the network with the ORIGINAL timesteps it was trained on (respaced chains map them back)."""
        return model(x_t, self.network_time(t), **(cond or {}))

    def _split_output(
        self, model_output: torch.Tensor, x_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, C_out, ...) -> mean prediction (N, C, ...) and variance values (N, C, ...) or None."""
        channels = x_t.shape[1]
        learned = self.model_var_type is ModelVarType.LEARNED_RANGE
        expected = 2 * channels if learned else channels
        if model_output.shape[1] != expected:
            raise ValueError(
                f"model returned {model_output.shape[1]} channels for a {channels}-channel input; "
                f"{self.model_var_type.value} variance needs {expected} (check learn_sigma)"
            )
        if learned:
            return model_output[:, :channels], model_output[:, channels:]
        return model_output, None

    def _xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        # x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        return (
            self._gather("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t
            - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps
        )

    def _xstart_from_prediction(self, x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        if self.model_mean_type is ModelMeanType.START_X:
            return pred
        if self.model_mean_type is ModelMeanType.VELOCITY:
            # x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v: v errors reach x_0 unamplified at any noise level,
            # where eps errors are multiplied by sqrt(1 / abar_t - 1) (why pixel-space models prefer v).
            return (
                self._gather("sqrt_alphas_cumprod", t, x_t.ndim) * x_t
                - self._gather("sqrt_one_minus_alphas_cumprod", t, x_t.ndim) * pred
            )
        return self._xstart_from_eps(x_t, t, pred)

    def _eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        # The inverse of _xstart_from_eps: eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1 / abar_t - 1)
        scaled_residual = self._gather("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - x0
        return scaled_residual / self._gather("sqrt_recipm1_alphas_cumprod", t, x_t.ndim)

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> dict[str, torch.Tensor]:
        """Turn a raw network output into p(x_{t-1} | x_t): keys mean, variance, log_variance, pred_xstart.

        ``clip_denoised`` clamps the x0 prediction to [-1, 1] (pixel data) before forming the mean.
        """
        # Schedule math in fp32 even when the network ran under bf16 autocast.
        pred, var_values = self._split_output(model_output.float(), x_t)
        ndim = x_t.ndim
        if self.model_var_type is ModelVarType.LEARNED_RANGE:
            min_log = self._gather("posterior_log_variance_clipped", t, ndim)
            max_log = self._gather("log_betas", t, ndim)
            frac = (var_values + 1) / 2  # v in [-1, 1] -> [0, 1]
            log_variance = frac * max_log + (1 - frac) * min_log  # (N, C, ...)
        elif self.model_var_type is ModelVarType.FIXED_LARGE:
            log_variance = self._gather("fixed_large_log_variance", t, ndim)
        else:
            log_variance = self._gather("posterior_log_variance_clipped", t, ndim)
        variance = torch.exp(log_variance)

        pred_xstart = self._xstart_from_prediction(x_t, t, pred)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    ##########################################################################
    #                               Training                                 #
    ##########################################################################

    def _vb_terms_bpd(
        self, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """(N,) bound term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])  # (N, C, ...)
        kl = mean_flat(kl) / math.log(2.0)  # (N,)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])  # (N, C, ...)
        nll = mean_flat(nll) / math.log(2.0)  # (N,)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, Any] | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample (N,) losses at step indices t: "loss", "mse" and, with a bound term, "vb".

        Under the MSE losses ``loss = mse + vb``, where vb trains only the learned variance (the mean
        enters it detached); under RESCALED_KL ``loss = vb * num_timesteps``.
        """
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)  # (N, C, ...)
        model_output = self._run_model(model, x_t, t, cond).float()  # (N, C_out, ...)
        pred, var_values = self._split_output(model_output, x_t)
        if self.model_mean_type is ModelMeanType.EPSILON:
            target = noise
        elif self.model_mean_type is ModelMeanType.VELOCITY:
            target = (
                self._gather("sqrt_alphas_cumprod", t, x0.ndim) * noise
                - self._gather("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * x0
            )
        else:
            target = x0
        terms = {"mse": mean_flat((target - pred) ** 2)}

        if self.loss_type is LossType.RESCALED_KL:
            terms["vb"] = self._vb_terms_bpd(model_output, x0, x_t, t)
            terms["loss"] = terms["vb"] * self.num_timesteps
            return terms
        if var_values is not None:
            # Stop-gradient on the mean: the bound only shapes the variance, the MSE alone trains the mean.
            frozen_output = torch.cat([pred.detach(), var_values], dim=1)  # (N, 2C, ...)
            vb = self._vb_terms_bpd(frozen_output, x0, x_t, t)
            if self.loss_type is LossType.RESCALED_MSE:
                # Keeps the bound's weight independent of the chain length (it was tuned at T = 1000).
                vb = vb * (self.num_timesteps / 1000.0)
            terms["vb"] = vb
            terms["loss"] = terms["mse"] + vb
        else:
            terms["loss"] = terms["mse"]
        return terms

    ##########################################################################
    #                               Sampling                                 #
    ##########################################################################

    def p_sample(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, Any] | None = None,
        clip_denoised: bool = False,
        generator: Generators = None,
    ) -> torch.Tensor:
        """One ancestral DDPM step x_t -> x_{t-1} ~ p(x_{t-1} | x_t)."""
        out = self.p_mean_variance(self._run_model(model, x, t, cond), x, t, clip_denoised)
        noise = randn(x.shape, generator, x.device, out["mean"].dtype)  # (N, C, ...)
        # The last step (t = 0) returns the mean: adding noise there would only blur x_0.
        nonzero = (t != 0).to(noise.dtype).reshape(-1, *([1] * (x.ndim - 1)))  # (N, 1, ...)
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    def ddim_sample(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: dict[str, Any] | None = None,
        eta: float = 0.0,
        clip_denoised: bool = False,
        generator: Generators = None,
    ) -> torch.Tensor:
        """One DDIM step x_t -> x_{t-1}; eta = 0 is deterministic, eta = 1 matches DDPM's posterior variance."""
        out = self.p_mean_variance(self._run_model(model, x, t, cond), x, t, clip_denoised)
        # Re-derive eps from the (possibly clipped) x0 so the two stay consistent.
        eps = self._eps_from_xstart(x, t, out["pred_xstart"])  # (N, C, ...)
        abar = self._gather("alphas_cumprod", t, x.ndim)
        abar_prev = self._gather("alphas_cumprod_prev", t, x.ndim)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        if eta == 0:
            return mean
        # sigma is exactly 0 at t = 0 (abar_prev = 1), so the last step adds no noise.
        return mean + sigma * randn(x.shape, generator, x.device, mean.dtype)

    def _sample_loop(
        self, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, progress: bool
    ) -> torch.Tensor:
        x = noise
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, desc="sampling"):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)  # (N,)
            x = step(x, t)
        return x

    @torch.no_grad()
    def p_sample_loop(
        self,
        model: ModelFn,
        noise: torch.Tensor,
        cond: dict[str, Any] | None = None,
        *,
        clip_denoised: bool = False,
        progress: bool = False,
        generator: Generators = None,
    ) -> torch.Tensor:
        """Ancestral DDPM sampling from x_T = noise down to x_0."""
        return self._sample_loop(
            lambda x, t: self.p_sample(model, x, t, cond, clip_denoised, generator), noise, progress
        )

    @torch.no_grad()
    def ddim_sample_loop(
        self,
        model: ModelFn,
        noise: torch.Tensor,
        cond: dict[str, Any] | None = None,
        *,
        eta: float = 0.0,
        clip_denoised: bool = False,
        progress: bool = False,
        generator: Generators = None,
    ) -> torch.Tensor:
        """DDIM sampling from x_T = noise down to x_0."""
        return self._sample_loop(
            lambda x, t: self.ddim_sample(model, x, t, cond, eta, clip_denoised, generator), noise, progress
        )

    def sample(
        self,
        model: ModelFn,
        noise: torch.Tensor,
        cond: dict[str, Any] | None = None,
        *,
        method: str | None = None,
        eta: float = 0.0,
        clip_denoised: bool = False,
        progress: bool = False,
        generator: Generators = None,
    ) -> torch.Tensor:
        """Generate x_0 from noise with ``method`` ("ddpm" or "ddim"; default set at creation).

        ``eta`` applies to DDIM only. ``generator`` is None, one generator, or one per sample.
        """
        method = method or self.default_sample_method
        if method == "ddpm":
            return self.p_sample_loop(
                model, noise, cond, clip_denoised=clip_denoised, progress=progress, generator=generator
            )
        if method == "ddim":
            return self.ddim_sample_loop(
                model,
                noise,
                cond,
                eta=eta,
                clip_denoised=clip_denoised,
                progress=progress,
                generator=generator,
            )
        raise ValueError(f"unknown sample method {method!r}; choose one of {', '.join(SAMPLE_METHODS)}")

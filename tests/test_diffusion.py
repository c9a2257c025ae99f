"""Gaussian diffusion: schedules, respacing, posterior maths, hybrid loss and samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.models import perturbed_dit

from flexdit_train.diffusion import (
    DIT_PROCESS,
    GaussianDiffusion,
    LossType,
    ModelVarType,
    create_diffusion,
    get_named_beta_schedule,
    process_differences,
    sampling_diffusion,
    space_timesteps,
)

T = 1000


def gaussian_data_oracle(diffusion_steps: int, mu: float, std: float, learned_sigma: bool, v: float = 0.0):
    """Exact E[eps | x_t] when x_0 ~ N(mu, std^2) elementwise; takes ORIGINAL timesteps like a real network."""
    abar_table = torch.from_numpy(np.cumprod(1 - get_named_beta_schedule("linear", diffusion_steps)))

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = abar_table.to(t.device)[t].float().reshape(-1, *([1] * (x.ndim - 1)))
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * mu) / (abar * std**2 + 1 - abar)
        return torch.cat([eps, torch.full_like(eps, v)], dim=1) if learned_sigma else eps

    return model


############################################################################
#                          Schedules and respacing                         #
############################################################################


def test_linear_schedule_values():
    betas = get_named_beta_schedule("linear", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1] == pytest.approx(0.02, abs=1e-15)
    assert np.allclose(np.diff(betas), (0.02 - 1e-4) / (T - 1))
    alphas_cumprod = np.cumprod(1 - betas)
    assert np.all(np.diff(alphas_cumprod) < 0)
    assert alphas_cumprod[-1] == pytest.approx(4.04e-5, rel=0.01)  # nearly pure noise at t = 999
    # Shorter chains are rescaled to keep the same noise range: 250 steps start at 4e-4 and end at 0.08.
    short = get_named_beta_schedule("linear", 250)
    assert short[0] == pytest.approx(4e-4) and short[-1] == pytest.approx(0.08)


def test_cosine_schedule_follows_alpha_bar():
    betas = get_named_beta_schedule("cosine", T)
    assert betas.max() <= 0.999 and betas.min() > 0
    alphas_cumprod = np.cumprod(1 - betas)

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 10, 500, 900):
        assert alphas_cumprod[t] == pytest.approx(alpha_bar((t + 1) / T) / alpha_bar(0), rel=1e-9)


def test_unknown_schedule_names_options():
    with pytest.raises(ValueError, match="linear, cosine"):
        get_named_beta_schedule("sigmoid", T)
    with pytest.raises(ValueError, match="linear, cosine"):
        create_diffusion(noise_schedule="quadratic")


def test_space_timesteps_counts():
    assert space_timesteps(T, "") == list(range(T))
    steps = space_timesteps(T, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == T - 1
    assert steps == sorted(set(steps))
    assert space_timesteps(T, "ddim50") == list(range(0, T, 20))
    sections = space_timesteps(30, "10,10,5")
    assert len(sections) == 25
    assert sections[:10] == list(range(10)) and sections[10:20] == list(range(10, 20))
    assert sections[20:] == [20, 22, 24, 27, 29]  # 5 evenly spread steps, ends included


@pytest.mark.parametrize("spec", ["fast", "ddim", "ddim999", "10,x", "0", "2000"])
def test_invalid_respacing_is_one_line_error(spec):
    with pytest.raises(ValueError, match="ddimN") as info:
        create_diffusion(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec", ["250", "ddim50", "10,10,5"])
def test_respaced_betas_reproduce_alphas_cumprod(spec):
    base = create_diffusion("")
    spaced = create_diffusion(spec)
    kept = spaced.timestep_map.numpy()
    assert spaced.num_timesteps == len(kept) == len(space_timesteps(T, spec))
    assert np.all(np.diff(kept) > 0)
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    np.testing.assert_allclose(np.cumprod(1 - spaced.betas), base.alphas_cumprod[kept], rtol=1e-12)


def test_spaced_diffusion_calls_model_with_original_timesteps():
    diffusion = create_diffusion("ddim50", learn_sigma=False)
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    diffusion.sample(model, torch.randn(3, 2, 4, 4))
    assert diffusion.default_sample_method == "ddim"
    assert all(s.dtype == torch.long and s.shape == (3,) for s in seen)
    assert [int(s[0]) for s in seen] == list(range(980, -1, -20))


def test_sample_timesteps_range_and_seed():
    diffusion = create_diffusion("")
    t = diffusion.sample_timesteps(4096, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (4096,)
    assert t.min() >= 0 and t.max() < T and t.float().mean().item() == pytest.approx(499.5, abs=20)
    again = diffusion.sample_timesteps(4096, "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


############################################################################
#                       Forward process and posterior                      #
############################################################################


def test_q_sample_moments():
    diffusion = create_diffusion("")
    x0 = torch.full((200_000, 1), 0.5)
    t = torch.full((200_000,), 500, dtype=torch.long)
    torch.manual_seed(0)
    x_t = diffusion.q_sample(x0, t)
    abar = diffusion.alphas_cumprod[500]
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * 0.5, abs=5e-3)
    assert x_t.var().item() == pytest.approx(1 - abar, abs=5e-3)


def test_posterior_matches_bayes_rule():
    diffusion = create_diffusion("")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
    x_t = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0.float(), x_t.float(), t)
    betas, abar = diffusion.betas, diffusion.alphas_cumprod
    for i, step in enumerate(t.tolist()):
        # Product of q(x_{t-1} | x_0) = N(sqrt(abar') x0, 1 - abar') and q(x_t | x_{t-1}) = N(sqrt(a) x_{t-1}, b).
        prior_var, alpha = 1 - abar[step - 1], 1 - betas[step]
        post_var = 1 / (1 / prior_var + alpha / betas[step])
        post_mean = post_var * (
            math.sqrt(abar[step - 1]) * x0[i] / prior_var + math.sqrt(alpha) * x_t[i] / betas[step]
        )
        assert var[i].item() == pytest.approx(post_var, rel=1e-5)
        assert log_var[i].item() == pytest.approx(math.log(post_var), rel=1e-5)
        torch.testing.assert_close(mean[i].double(), post_mean, rtol=1e-5, atol=1e-6)
    # At t = 0 the posterior collapses onto x_0; its log-variance is clipped to that of t = 1.
    mean0, var0, log_var0 = diffusion.q_posterior_mean_variance(
        x0.float(), x_t.float(), torch.zeros(4, dtype=torch.long)
    )
    torch.testing.assert_close(mean0, x0.float())
    assert var0.abs().max().item() == 0.0
    assert log_var0[0].item() == pytest.approx(math.log(diffusion.posterior_variance[1]), rel=1e-6)


def test_learned_range_interpolates_log_variance():
    diffusion = create_diffusion("")
    x_t = torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 1, 700])
    eps = torch.randn_like(x_t)

    def log_var_for(v: float) -> torch.Tensor:
        out = diffusion.p_mean_variance(torch.cat([eps, torch.full_like(eps, v)], dim=1), x_t, t)
        return out["log_variance"][:, 0, 0, 0].double()  # (N,)

    log_beta = torch.log(torch.tensor(diffusion.betas[t.numpy()]))
    log_posterior = torch.tensor(diffusion.posterior_log_variance_clipped[t.numpy()])
    torch.testing.assert_close(log_var_for(1.0), log_beta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_var_for(-1.0), log_posterior, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_var_for(0.0), (log_beta + log_posterior) / 2, rtol=1e-5, atol=1e-6)
    # The t = 0 posterior variance is 0, so the clipped value borrows t = 1's.
    assert log_var_for(-1.0)[0].item() == pytest.approx(math.log(diffusion.posterior_variance[1]), rel=1e-5)


def test_fixed_variances():
    x_t = torch.randn(2, 4, 2, 2)
    t = torch.tensor([1, 600])
    small = create_diffusion("", learn_sigma=False, sigma_small=True)
    large = create_diffusion("", learn_sigma=False)
    assert (
        small.model_var_type is ModelVarType.FIXED_SMALL and large.model_var_type is ModelVarType.FIXED_LARGE
    )
    out_small = small.p_mean_variance(torch.randn_like(x_t), x_t, t)
    out_large = large.p_mean_variance(torch.randn_like(x_t), x_t, t)
    assert out_small["variance"].flatten().tolist() == pytest.approx(
        small.posterior_variance[[1, 600]], rel=1e-6
    )
    assert out_large["variance"].flatten().tolist() == pytest.approx(large.betas[[1, 600]], rel=1e-6)


def test_start_x_prediction_and_clipping():
    diffusion = create_diffusion("", predict_xstart=True, learn_sigma=False)
    x_t = torch.randn(2, 1, 2, 2)
    x0_pred = torch.tensor([-3.0, -0.5, 0.5, 3.0]).reshape(1, 1, 2, 2).repeat(2, 1, 1, 1)
    out = diffusion.p_mean_variance(x0_pred, x_t, torch.tensor([5, 5]), clip_denoised=True)
    assert out["pred_xstart"].flatten().tolist() == [-1.0, -0.5, 0.5, 1.0] * 2


############################################################################
#                               Training loss                              #
############################################################################


def _oracle_eps_model(diffusion: GaussianDiffusion, x0: torch.Tensor, v: float = 0.0):
    """A 'network' that knows x0 and returns the exact noise (and a constant variance value)."""

    def model(x_t, t):
        abar = torch.from_numpy(diffusion.alphas_cumprod).float()[t].reshape(-1, 1, 1, 1)
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        return torch.cat([eps, torch.full_like(eps, v)], dim=1)

    return model


def test_training_losses_with_true_eps():
    diffusion = create_diffusion("")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 1, 500, 999])
    terms = diffusion.training_losses(_oracle_eps_model(diffusion, x0), x0, t)
    assert set(terms) == {"loss", "mse", "vb"}
    assert all(v.shape == (4,) for v in terms.values())
    assert terms["mse"].max().item() < 1e-6
    assert torch.isfinite(terms["vb"]).all() and (terms["vb"] >= 0).all()
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    # Exact mean: the KL is only the variance mismatch, which v = -1 (the true posterior variance) removes.
    exact = diffusion.training_losses(_oracle_eps_model(diffusion, x0, v=-1.0), x0, t)
    assert exact["vb"][1:].max().item() < 1e-4
    # At t = 1, beta_t and the posterior variance differ most, so v = 0 pays a visible KL.
    assert terms["vb"][1].item() > 1e-3


def test_vb_gradient_reaches_variance_but_not_mean():
    diffusion = create_diffusion("")
    scale = torch.tensor(0.3, requires_grad=True)  # drives the eps channels
    var_value = torch.tensor(0.2, requires_grad=True)  # drives the variance channels

    def model(x_t, t):
        return torch.cat([scale * x_t, var_value.expand_as(x_t)], dim=1)

    x0 = torch.randn(6, 4, 4, 4)
    terms = diffusion.training_losses(model, x0, torch.tensor([0, 3, 100, 400, 800, 999]))
    grad_scale, grad_var = torch.autograd.grad(
        terms["vb"].sum(), [scale, var_value], allow_unused=True, retain_graph=True
    )
    assert grad_scale is None or grad_scale.abs().item() == 0.0
    assert grad_var is not None and grad_var.abs().item() > 0
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), [scale])
    assert grad_mse.abs().item() > 0


def test_fixed_variance_loss_is_mse_only_and_layout_agnostic():
    diffusion = create_diffusion("", learn_sigma=False)
    x0 = torch.randn(3, 2, 5, 4, 4)  # video (N, C, F, H, W)
    terms = diffusion.training_losses(lambda x, t: 0.5 * x, x0, torch.tensor([0, 10, 900]))
    assert set(terms) == {"loss", "mse"} and terms["loss"].shape == (3,)
    torch.testing.assert_close(terms["loss"], terms["mse"])

    learned = create_diffusion("")
    terms = learned.training_losses(
        lambda x, t: torch.cat([0.5 * x, 0 * x], dim=1), x0, torch.tensor([0, 10, 900])
    )
    assert all(v.shape == (3,) for v in terms.values()) and torch.isfinite(terms["loss"]).all()


def test_loss_variants_weight_the_bound():
    x0 = torch.randn(4, 4, 4, 4)
    t = torch.tensor([0, 3, 50, 99])
    noise = torch.randn_like(x0)

    def model(x, t):
        return torch.cat([0.5 * x, torch.full_like(x, 0.3)], dim=1)

    plain = create_diffusion("", diffusion_steps=100).training_losses(model, x0, t, noise=noise)
    rescaled = create_diffusion("", diffusion_steps=100, rescale_learned_sigmas=True)
    assert rescaled.loss_type is LossType.RESCALED_MSE
    rescaled_terms = rescaled.training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(rescaled_terms["vb"], plain["vb"] * 0.1)
    kl = create_diffusion("", diffusion_steps=100, use_kl=True).training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(kl["vb"], plain["vb"])  # same bound; only its gradient path differs
    torch.testing.assert_close(kl["loss"], plain["vb"] * 100)


def test_cond_is_passed_and_wrong_channel_count_is_rejected():
    diffusion = create_diffusion("")
    model = perturbed_dit()
    x0 = torch.randn(2, 4, 8, 8)
    terms = diffusion.training_losses(model, x0, torch.tensor([5, 50]), cond={"y": torch.tensor([1, 2])})
    assert terms["loss"].shape == (2,)
    with pytest.raises(ValueError, match="check learn_sigma"):
        create_diffusion("", learn_sigma=False).training_losses(
            model, x0, torch.tensor([5, 50]), {"y": torch.tensor([1, 2])}
        )


def test_tiny_dit_training_halves_the_loss():
    """ACCEPTANCE: AdamW on 8 fixed latents with the hybrid loss more than halves the training loss."""
    diffusion = create_diffusion("")
    model = perturbed_dit(perturb=False).train()
    data_gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 8, 8, generator=data_gen)
    y = torch.arange(8) % 10
    eval_t = diffusion.sample_timesteps(64, "cpu", generator=torch.Generator().manual_seed(1))
    eval_noise = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = diffusion.training_losses(
                model, x0.repeat(8, 1, 1, 1), eval_t, {"y": y.repeat(8)}, eval_noise
            )
        model.train()
        return loss["loss"].mean().item()

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0)
    train_gen = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(300):
        t = diffusion.sample_timesteps(8, "cpu", generator=train_gen)
        noise = torch.randn(x0.shape, generator=train_gen)
        loss = diffusion.training_losses(model, x0, t, {"y": y}, noise)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = eval_loss()
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert after < 0.5 * before


############################################################################
#                                 Sampling                                 #
############################################################################


# DDIM-50 shrinks the spread by ~6% (discretisation; 0.47 here, 0.497 at 500 steps), DDPM-250 by ~2%.
@pytest.mark.parametrize(("spec", "method", "std_tol"), [("250", "ddpm", 0.02), ("ddim50", "ddim", 0.04)])
def test_samplers_recover_gaussian_data(spec, method, std_tol):
    """With the exact eps of x_0 ~ N(0.5, 0.5^2), both samplers reproduce that distribution."""
    diffusion = create_diffusion(spec)
    assert diffusion.default_sample_method == method
    noise = torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    samples = diffusion.sample(gaussian_data_oracle(T, mu=0.5, std=0.5, learned_sigma=True), noise)
    assert samples.shape == noise.shape
    assert samples.mean().item() == pytest.approx(0.5, abs=0.02)
    assert samples.std().item() == pytest.approx(0.5, abs=std_tol)


def test_tiny_dit_ddpm250_and_ddim50_samples():
    """ACCEPTANCE: finite, correctly shaped samples from a tiny DiT with both default samplers."""
    model = perturbed_dit()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"y": torch.tensor([3, 7])}
    ddpm = create_diffusion("250").sample(model, noise, cond, generator=torch.Generator().manual_seed(1))
    ddim = create_diffusion("ddim50").sample(model, noise, cond)
    for out in (ddpm, ddim):
        assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert not torch.allclose(ddpm, ddim)


def test_ddim_eta0_is_deterministic_given_noise():
    model = perturbed_dit()
    diffusion = create_diffusion("ddim50")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"y": torch.tensor([3, 7])}
    torch.manual_seed(123)
    first = diffusion.sample(model, noise, cond)
    torch.manual_seed(456)
    second = diffusion.sample(model, noise, cond)
    assert torch.equal(first, second)
    stochastic = diffusion.sample(model, noise, cond, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(first, stochastic)


@pytest.mark.parametrize(("spec", "method", "eta"), [("250", "ddpm", 0.0), ("ddim25", "ddim", 1.0)])
def test_per_sample_generators_make_samples_batch_independent(spec, method, eta):
    model = perturbed_dit()
    diffusion = create_diffusion(spec)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([3, 7])

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    # CPU kernels round ~1e-7 differently per batch size, and an untrained DiT drives unclipped samples to
    # |x| ~ 800, so clipping keeps values O(1) where a 1e-5 absolute tolerance is meaningful.
    kwargs = dict(method=method, eta=eta, clip_denoised=True)
    pair = diffusion.sample(model, noise, {"y": y}, generator=gens(10, 11), **kwargs)
    alone = diffusion.sample(model, noise[1:], {"y": y[1:]}, generator=gens(11), **kwargs)
    torch.testing.assert_close(alone[0], pair[1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="one per sample"):
        diffusion.sample(model, noise, {"y": y}, generator=gens(11), **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sampling_with_cpu_generators_matches_cpu():
    """CPU generators seed GPU sampling, so a sample does not depend on the device it ran on."""
    diffusion = create_diffusion("50")
    model = gaussian_data_oracle(T, mu=0.5, std=0.5, learned_sigma=True)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))

    def gens():
        return [torch.Generator().manual_seed(s) for s in (1, 2, 3)]

    on_cpu = diffusion.sample(model, noise, generator=gens())
    on_gpu = diffusion.sample(model, noise.cuda(), generator=gens())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-4)


def test_sample_dispatch_and_unknown_method():
    diffusion = create_diffusion("10")
    model = gaussian_data_oracle(T, mu=0.0, std=1.0, learned_sigma=True)
    noise = torch.randn(2, 1, 3, 3)
    torch.testing.assert_close(
        diffusion.sample(model, noise, method="ddim"), diffusion.ddim_sample_loop(model, noise)
    )
    gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(
        diffusion.sample(model, noise, generator=gen_a),
        diffusion.p_sample_loop(model, noise, generator=gen_b),
    )
    with pytest.raises(ValueError, match="ddpm, ddim"):
        diffusion.sample(model, noise, method="euler")


# 100 steps keep the discretisation error of the spread near 0.01 (10 steps: 0.10 for DDIM, 0.38 for DDPM).
@pytest.mark.parametrize(("spec", "learn_sigma"), [("ddim100", True), ("100", False)])
def test_video_sampling_recovers_data(spec, learn_sigma):
    """5-D (N, C, F, H, W) latents go through both samplers, learned and fixed variance alike."""
    diffusion = create_diffusion(spec, learn_sigma=learn_sigma)
    noise = torch.randn(64, 2, 4, 4, 4, generator=torch.Generator().manual_seed(0))  # (N, C, F, H, W)
    model = gaussian_data_oracle(T, mu=-0.3, std=0.2, learned_sigma=learn_sigma)
    out = diffusion.sample(model, noise, generator=torch.Generator().manual_seed(1))
    assert out.shape == noise.shape
    assert out.mean().item() == pytest.approx(-0.3, abs=0.02)
    assert out.std().item() == pytest.approx(0.2, abs=0.02)


############################################################################
#            Other predictions and the recorded forward process             #
############################################################################


def _oracle_model(diffusion: GaussianDiffusion, x0: torch.Tensor, noise: torch.Tensor, prediction: str):
    """Returns the exact target of ``prediction`` for x_t = q_sample(x0, t, noise), plus a variance value 0."""

    def model(x_t, t):
        abar = torch.from_numpy(diffusion.alphas_cumprod).float()[t].reshape(-1, 1, 1, 1)
        target = {"epsilon": noise, "x0": x0, "v": abar.sqrt() * noise - (1 - abar).sqrt() * x0}[prediction]
        return torch.cat([target, torch.zeros_like(target)], dim=1)

    return model


@pytest.mark.parametrize("prediction", ["epsilon", "x0", "v"])
def test_every_prediction_recovers_x0_and_has_zero_loss_at_the_exact_target(prediction):
    diffusion = create_diffusion("", prediction=prediction)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 10, 500, 999])
    model = _oracle_model(diffusion, x0, noise, prediction)
    assert diffusion.training_losses(model, x0, t, noise=noise)["mse"].max().item() < 1e-10
    x_t = diffusion.q_sample(x0, t, noise)
    out = diffusion.p_mean_variance(model(x_t, t), x_t, t)
    # eps-prediction loses precision at t = 999 (x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), 1/sqrt(abar) ~ 200).
    torch.testing.assert_close(out["pred_xstart"], x0, atol=2e-3 if prediction == "epsilon" else 1e-5, rtol=0)


def test_v_prediction_samples_gaussian_data():
    """The exact v of x_0 ~ N(0.5, 0.5^2) (from the exact eps) drives both samplers to that distribution."""
    eps_model = gaussian_data_oracle(T, mu=0.5, std=0.5, learned_sigma=False)
    abar_table = torch.from_numpy(np.cumprod(1 - get_named_beta_schedule("linear", T))).float()

    def v_model(x, t):
        abar = abar_table[t].reshape(-1, 1, 1, 1)
        eps = eps_model(x, t)
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        return torch.cat([abar.sqrt() * eps - (1 - abar).sqrt() * x0, torch.zeros_like(x)], dim=1)

    noise = torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for spec in ("50", "ddim50"):
        samples = create_diffusion(spec, prediction="v").sample(v_model, noise)
        assert samples.mean().item() == pytest.approx(0.5, abs=0.02)
        assert samples.std().item() == pytest.approx(0.5, abs=0.03)


def test_process_is_recorded_and_rebuilt_for_sampling():
    trained = create_diffusion("", noise_schedule="cosine", prediction="v")
    assert trained.process == {"noise_schedule": "cosine", "diffusion_steps": 1000, "prediction": "v",
                               "learn_sigma": True, "sigma_small": False}
    sampler = sampling_diffusion(trained.process, "ddim20", learn_sigma=True)
    assert sampler.process == trained.process and len(sampler.timestep_map) == 20
    np.testing.assert_allclose(sampler.alphas_cumprod, trained.alphas_cumprod[sampler.timestep_map.numpy()])
    official = sampling_diffusion(None, "250", learn_sigma=True)  # no record: DiT's linear eps process
    assert official.process == {**DIT_PROCESS, "learn_sigma": True}
    assert process_differences(None, trained.process) == {"noise_schedule": ("linear", "cosine"),
                                                         "prediction": ("epsilon", "v")}
    with pytest.raises(ValueError, match=r"keys \['beta_max'\] are unknown"):
        sampling_diffusion({"beta_max": 0.02}, "10", learn_sigma=True)
    with pytest.raises(ValueError, match="unknown prediction 'score'"):
        create_diffusion("", prediction="score")
    with pytest.raises(ValueError, match="contradicts prediction='v'"):
        create_diffusion("", predict_xstart=True, prediction="v")

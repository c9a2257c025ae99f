"""Flow matching: exact-velocity toy problems for the samplers and the loss, the process record, and a tiny
DiT trained, checkpointed and sampled with the flow process end to end."""

from __future__ import annotations

import pytest
import torch
from helpers.config import compose_train
from torch import nn

from flexdit_train.diffusion import (
    FlowMatching,
    create_diffusion,
    create_flow,
    process_mismatch,
    sampling_diffusion,
)
from flexdit_train.sampling import Sampler
from flexdit_train.training.flex_objectives import TimestepRanges

# The toy target: x0 ~ N(MU, diag(STD^2)) in 4 dims, one channel per dim (batches are (N, 4)).
MU = torch.tensor([0.5, -1.0, 2.0, 0.0])
STD = torch.tensor([0.5, 1.5, 0.2, 1.0])


def exact_velocity(flow: FlowMatching):
    """The network an infinitely trained flow converges to on the toy target: E[u_t | x_t] in closed form.

    x_t = a x0 + s eps is Gaussian with mean a MU and variance V = a^2 STD^2 + s^2, so
    E[x0 | x] = MU + a STD^2 (x - a MU) / V and E[eps | x] = s (x - a MU) / V, and the velocity
    u_t = a' x0 + s' eps has conditional mean a' E[x0 | x] + s' E[eps | x]. Takes network times (1000 t).
    """

    def model(x: torch.Tensor, network_t: torch.Tensor) -> torch.Tensor:
        t = (network_t / 1000.0).reshape(-1, 1)  # (N, 1)
        a, s, da, ds = flow.coefficients(t)
        deviation = x - a * MU  # (N, 4)
        variance = a**2 * STD**2 + s**2  # (N, 4)
        return da * (MU + a * STD**2 * deviation / variance) + ds * s * deviation / variance

    return model


def sample_toy(method: str, steps: int, noise: torch.Tensor, interpolant: str = "linear", seed: int = 1):
    flow = FlowMatching(interpolant, sample_method=method, num_steps=steps)
    return flow.sample(exact_velocity(flow), noise, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def noise() -> torch.Tensor:
    return torch.randn(20000, 4, generator=torch.Generator().manual_seed(0))  # (N, 4)


############################################################################
#                         Samplers on the exact field                      #
############################################################################


@pytest.mark.parametrize("interpolant", ["linear", "gvp"])
@pytest.mark.parametrize("method, steps", [("euler", 200), ("heun", 50)])
def test_ode_samplers_map_noise_to_the_target(noise, interpolant, method, steps):
    """The exact flow of a Gaussian is affine: x_1 = z ends at MU + STD z. Samples match MU (to the sampling
    error of 20000 draws, ~0.01) and STD within 2% (measured: at most 1.4%), and every endpoint lies within
    0.08 STD of its exact image (measured: at most 0.06)."""
    out = sample_toy(method, steps, noise, interpolant)  # (N, 4)
    assert (out.mean(0) - MU).abs().max() < 0.03
    assert ((out.std(0) - STD).abs() / STD).max() < 0.02
    assert ((out - (MU + STD * noise)).abs() / STD).max() < 0.08


def test_heun_beats_euler_at_equal_network_evaluations(noise):
    """Heun with K steps evaluates 2K - 1 times (its last step is Euler): against Euler with 2K - 1 steps
    on the exact field, its endpoints are much closer to the exact map and its std is much closer to STD."""
    exact = MU + STD * noise
    for heun_steps, euler_bound, heun_bound in ((5, 0.9, 0.35), (10, 0.45, 0.1)):
        euler = sample_toy("euler", 2 * heun_steps - 1, noise)
        heun = sample_toy("heun", heun_steps, noise)
        euler_error, heun_error = (euler - exact).abs().max(), (heun - exact).abs().max()
        # Measured: 5 steps (9 evaluations) euler 0.96, heun 0.30; 10 steps (19) euler 0.47, heun 0.089.
        assert euler_error > euler_bound and heun_error < heun_bound and heun_error < euler_error / 3
        euler_std, heun_std = (euler.std(0) - STD).abs().max(), (heun.std(0) - STD).abs().max()
        assert heun_std < euler_std / 2


def test_heun_evaluates_2k_minus_1_times_on_grid_times():
    flow = FlowMatching(sample_method="heun", num_steps=4)
    seen: list[float] = []

    def model(x, t):
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    flow.sample(model, torch.zeros(2, 4))
    assert seen == [1000.0, 750.0, 750.0, 500.0, 500.0, 250.0, 250.0]
    assert flow.timestep_map.tolist() == [250.0, 500.0, 750.0, 1000.0]


@pytest.mark.parametrize("interpolant", ["linear", "gvp"])
def test_sde_sampler_reaches_the_target_distribution(noise, interpolant):
    """Euler-Maruyama with the score from the velocity keeps the marginals: mean and std of 20000 samples
    (measured with 200 steps: std within 1.2%)."""
    out = sample_toy("sde", 200, noise, interpolant)  # (N, 4)
    assert (out.mean(0) - MU).abs().max() < 0.03
    assert ((out.std(0) - STD).abs() / STD).max() < 0.03
    # Stochastic: the endpoints are not the ODE's (a deterministic sampler would be within ~0.1).
    assert (out - (MU + STD * noise)).abs().mean() > 0.2


def test_sde_with_one_seed_per_sample_is_batch_independent(noise):
    flow = FlowMatching(sample_method="sde", num_steps=10)
    field = exact_velocity(flow)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    full = flow.sample(field, noise[:4], generator=gens)
    part = flow.sample(field, noise[2:4], generator=[torch.Generator().manual_seed(i) for i in (2, 3)])
    torch.testing.assert_close(full[2:], part)


############################################################################
#                             Training objective                           #
############################################################################


@pytest.mark.parametrize("interpolant", ["linear", "gvp"])
def test_training_loss_is_the_velocity_mse_and_lowest_at_the_exact_field(interpolant):
    torch.manual_seed(0)
    flow = create_flow(interpolant)
    x0 = MU + STD * torch.randn(4096, 4)  # (N, 4)
    noise = torch.randn_like(x0)
    t = flow.sample_timesteps(4096, "cpu")  # (N,)
    exact = flow.training_losses(exact_velocity(flow), x0, t, noise=noise)
    zero = flow.training_losses(lambda x, nt: torch.zeros_like(x), x0, t, noise=noise)
    a, s, da, ds = flow.coefficients(t[:, None])
    target = da * x0 + ds * noise  # (N, 4) the true velocity
    torch.testing.assert_close(zero["loss"], (target**2).mean(1))
    x_t = a * x0 + s * noise
    expected = ((target - exact_velocity(flow)(x_t, 1000 * t)) ** 2).mean(1)
    torch.testing.assert_close(exact["mse"], expected)
    assert torch.equal(exact["loss"], exact["mse"])
    assert exact["loss"].mean() < 0.6 * zero["loss"].mean()
    # The learned-variance half of a 2C output is ignored.
    doubled = flow.training_losses(lambda x, nt: torch.cat([exact_velocity(flow)(x, nt), 7 + x], 1), x0, t,
                                   noise=noise)
    torch.testing.assert_close(doubled["loss"], exact["loss"])
    with pytest.raises(ValueError, match="flow matching reads the velocity from 4 channels"):
        flow.training_losses(lambda x, nt: x[:, :3], x0, t, noise=noise)


def test_training_times_follow_the_configured_distribution_and_ranges():
    torch.manual_seed(0)
    uniform = create_flow(time_sampling="uniform").sample_timesteps(50000, "cpu")
    logit = create_flow(time_sampling="logit_normal", logit_mean=0.5, logit_std=1.0).sample_timesteps(50000, "cpu")
    assert uniform.dtype == torch.float32 and 0 <= float(uniform.min()) and float(uniform.max()) < 1
    assert abs(float(uniform.mean()) - 0.5) < 0.01 and abs(float(uniform.std()) - 12**-0.5) < 0.01
    # logit(t) ~ N(0.5, 1): check the logit's moments.
    logits = torch.log(logit / (1 - logit))
    assert abs(float(logits.mean()) - 0.5) < 0.02 and abs(float(logits.std()) - 1.0) < 0.02
    ranges = TimestepRanges({4: [0.3, 1.0]})
    flow = create_flow()
    t4, t2 = ranges.sample(flow, 20000, "cpu", 4), ranges.sample(flow, 20000, "cpu", 2)
    assert float(t4.min()) >= 0.3 and float(t4.max()) <= 1.0 and float(t2.min()) < 0.05
    quartiles = flow.noise_quartile(torch.tensor([0.0, 0.249, 0.25, 0.6, 0.99, 1.0]))
    assert quartiles.tolist() == [0, 0, 1, 2, 3, 3]


def test_bad_flow_settings_are_one_line_errors():
    for kwargs, match in (({"interpolant": "cosine"}, "unknown interpolant"),
                          ({"time_sampling": "beta"}, "unknown time_sampling"),
                          ({"prediction": "epsilon"}, "set objective.diffusion.prediction=velocity")):
        with pytest.raises(ValueError, match=match):
            create_flow(**kwargs)


def test_flex_objectives_train_under_flow(monkeypatch):
    """Distillation noises with the flow and feeds the network its times (1000 t, with the data loss too);
    the shared objective's MMD loss, which walks DDIM chains, is refused under flow in one line."""
    from functools import partial

    from helpers.models import pretrained_like

    from flexdit_train.models.flex import flexify
    from flexdit_train.training.flex_objectives import DistillModule, FlexSharedModule

    adamw = partial(torch.optim.AdamW, lr=1e-3)
    model = flexify(pretrained_like(), patch_sizes=(2, 4), mode="lora", lora_rank=2)
    calls = record_calls(model, monkeypatch)
    module = DistillModule(model, create_flow(time_sampling="logit_normal"), adamw, teacher="self",
                           data_loss_weight=0.5, timestep_ranges={4: [0.5, 1.0]})
    torch.manual_seed(0)
    t, terms = module.compute_losses({"x": torch.randn(6, 4, 8, 8), "y": torch.randint(0, 5, (6,))}, 4)
    assert t.dtype == torch.float32 and float(t.min()) >= 0.5 and float(t.max()) <= 1.0
    assert [p for _, p in calls] == [2, 4, 4]  # teacher, student, the student's data loss
    assert all(torch.equal(network_t, 1000 * t) for network_t, _ in calls)
    assert terms["loss"].shape == (6,) and torch.isfinite(terms["loss"]).all() and "data" in terms
    shared = flexify(pretrained_like(), patch_sizes=(2, 4), mode="shared")
    with pytest.raises(ValueError, match="with process=flow set objective.mmd.weight=0"):
        FlexSharedModule(shared, create_flow(), adamw, mmd={"weight": 1.0})
    assert FlexSharedModule(shared, create_flow(), adamw, mmd={"weight": 0.0}) is not None


############################################################################
#                      Process record and sampler choice                   #
############################################################################


def test_flow_process_record_picks_flow_samplers_and_refuses_ddpm_ones():
    process = create_flow("gvp", time_sampling="logit_normal").process
    assert process == {"kind": "flow", "interpolant": "gvp", "prediction": "velocity",
                       "time_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0}
    for steps, method, count in (("euler50", "euler", 50), ("heun25", "heun", 25), ("sde100", "sde", 100)):
        sampler = sampling_diffusion(process, steps, learn_sigma=True)
        assert isinstance(sampler, FlowMatching) and sampler.interpolant == "gvp"
        assert sampler.default_sample_method == method and len(sampler.timestep_map) == count
    for steps in ("ddim50", "250", ""):
        with pytest.raises(ValueError) as err:
            sampling_diffusion(process, steps, learn_sigma=True)
        message = str(err.value)
        assert "trained with flow matching" in message and "sampling_steps=euler50" in message
        assert "\n" not in message
    for ddpm in (None, create_diffusion("", prediction="v").process):
        with pytest.raises(ValueError) as err:
            sampling_diffusion(ddpm, "euler50", learn_sigma=True)
        assert "trained with Gaussian diffusion (DDPM)" in str(err.value) and "sampling_steps=ddim50" in str(err.value)


def test_process_mismatch_between_kinds_and_between_flows():
    flow, ddpm = create_flow().process, create_diffusion("").process
    assert process_mismatch(flow, ddpm, "checkpoint x") == (
        "checkpoint x was trained with kind=flow but the objective uses kind=ddpm: set process=flow "
        "(the Hydra group conf/process/)")
    assert "set process=ddpm" in process_mismatch(None, flow, "checkpoint x")
    # The training-time distribution weights the same target: not a mismatch. The interpolant is one.
    assert process_mismatch(flow, create_flow(time_sampling="logit_normal").process, "c") is None
    assert process_mismatch(flow, create_flow("gvp").process, "c").endswith("set objective.diffusion.interpolant=linear")


############################################################################
#                     A tiny DiT through training and sampling             #
############################################################################

SYNTHETIC = ["data=synthetic", "data.input_size=8", "data.in_channels=4", "data.num_classes=10",
             "data.global_batch_size=4"]
TINY_MODEL = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=2"]


def record_calls(model: nn.Module, monkeypatch) -> list[tuple[torch.Tensor, object]]:
    """(timesteps, patch size) of every call of ``model`` from now on."""
    calls, forward = [], model.forward

    def recording_forward(x, t, *args, **cond):
        calls.append((t, cond.get("patch_size")))
        return forward(x, t, *args, **cond)

    monkeypatch.setattr(model, "forward", recording_forward)
    return calls


@pytest.mark.slow
def test_tiny_flexible_dit_trains_records_and_samples_with_flow(tmp_path, monkeypatch):
    from flexdit_train.train import run

    monkeypatch.setenv("FLEXDIT_DATA_CACHE", str(tmp_path / "data_cache"))
    overrides = [*SYNTHETIC, *TINY_MODEL, "model.name=null", "model.learn_sigma=false", "process=flow",
                 "flex=shared", "objective=flex_shared", "objective.timestep_ranges={4: [0.5, 1.0]}",
                 "trainer=cpu", "trainer.max_steps=3", "logger=csv", "callbacks.sample_grid.num_images=2",
                 "callbacks.sample_grid.sampling_steps=euler2"]
    run(compose_train(overrides, tmp_path))
    final = tmp_path / "checkpoints" / "final.ckpt"
    meta = torch.load(final, map_location="cpu", weights_only=True)["flexdit"]
    assert meta["diffusion"] == {"kind": "flow", "interpolant": "linear", "prediction": "velocity",
                                 "time_sampling": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0}
    assert (tmp_path / "samples").is_dir()  # the training callback sampled the grid with euler2

    budget = {"name": "weak_last_50", "mode": "weak_last", "powerful_fraction": 0.5,
              "powerful_fraction_guidance": 0.5}
    sampler = Sampler.from_checkpoint(str(final), budget=budget, steps="euler4", cfg=1.5, device=torch.device("cpu"))
    assert isinstance(sampler.diffusion, FlowMatching) and sampler.diffusion.default_sample_method == "euler"
    calls = record_calls(sampler.model, monkeypatch)
    images = sampler.generate(torch.tensor([1, 2]), seed=0, indices=[0, 1])
    assert images.shape == (2, 4, 8, 8) and torch.isfinite(images).all()
    # weak_last_50 over 4 Euler steps with CFG: 2 native steps (one doubled batch each), then 2 weak steps
    # (conditional and guidance branch both weak: one doubled batch each).
    assert [p for _, p in calls] == [2, 2, 4, 4]

    # Heun: 3 steps, 5 evaluations, each corrector at the next grid point's (here native) patch size.
    heun = Sampler.from_checkpoint(str(final), budget={"name": "static", "mode": "static"}, steps="heun3", cfg=1.0,
                                   device=torch.device("cpu"))
    calls = record_calls(heun.model, monkeypatch)
    assert torch.isfinite(heun.generate(torch.tensor([3]), seed=0, indices=[0])).all()
    assert [p for _, p in calls] == [2] * 5
    assert [float(t[0]) for t, _ in calls] == pytest.approx([1000, 2000 / 3, 2000 / 3, 1000 / 3, 1000 / 3])

    with pytest.raises(ValueError) as err:
        Sampler.from_checkpoint(str(final), budget=budget, steps="ddim4", cfg=1.0, device=torch.device("cpu"))
    assert "trained with flow matching" in str(err.value) and "\n" not in str(err.value)


def test_ddpm_checkpoint_refuses_flow_samplers(tmp_path):
    from flexdit_train.models import DiT, export_safetensors

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    path = export_safetensors(model, tmp_path / "ddpm.safetensors")
    with pytest.raises(ValueError) as err:
        Sampler.from_checkpoint(str(path), budget={"name": "static", "mode": "static"}, steps="euler10", cfg=1.0,
                                device=torch.device("cpu"))
    message = str(err.value)
    assert "trained with Gaussian diffusion (DDPM)" in message and "sampling_steps=ddim50" in message
    assert "\n" not in message


@pytest.mark.slow
def test_mnist_flow_pretrain_composes_and_runs_two_steps(tmp_path, monkeypatch):
    from flexdit_train.train import run

    monkeypatch.setenv("FLEXDIT_DATA_CACHE", str(tmp_path / "data_cache"))
    cfg = compose_train(["+experiment=mnist_flow_pretrain", "trainer.max_steps=2", "logger=csv",
                         "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "data.global_batch_size=4",
                         "data.num_workers=0", "callbacks.sample_grid.num_images=2",
                         "callbacks.sample_grid.sampling_steps=euler2"], tmp_path)
    assert cfg.task_name == "mnist_flow_pretrain" and cfg.objective.diffusion.prediction == "velocity"
    run(cfg)
    meta = torch.load(tmp_path / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)["flexdit"]
    assert meta["diffusion"]["kind"] == "flow" and meta["model_config"]["learn_sigma"] is False

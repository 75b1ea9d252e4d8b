"""sCM / rCM in TrigFlow against closed forms on Gaussian data, and the jvp against finite differences.

For data N(MU, S^2) the probability-flow ODE keeps (x_t - alpha_t MU) / sqrt(alpha_t^2 S^2 + sigma_t^2)
constant, so the consistency function (the ODE's value at sigma = 0) is
f*(x_t) = MU + S (x_t - alpha_t MU) / sqrt(alpha_t^2 S^2 + sigma_t^2) in any schedule. A student whose
x0 output is f* is consistent, and sCM's tangent g (the time derivative of f along the teacher's
ODE) must vanish there at r = 1; METHODS.md Sec. 9's case is MU = 0, S = sigma_d, where the teacher's
F is 0 and f* = x^.
"""

import numpy as np
import pytest
import torch
from scipy.stats import truncnorm
from torch import nn
from toy_repair import assert_repairs_shrunk_ring8

from diffdistill.backbones.loading import Teacher
from diffdistill.denoiser import Denoiser
from diffdistill.methods.scm import normalize_tangent, scm_loss, scm_tangent
from diffdistill.methods.trigflow import (
    LogVarHead,
    TrigFlowTimes,
    check_jvp_supported,
    teacher_tangent,
    trigflow_time,
    trigflow_velocity,
    trigflow_x0,
    use_jvp_attention,
    velocity_and_tangent,
)
from diffdistill.randomness import BatchRandom
from diffdistill.schedules import FlowSchedule, VPSchedule
from diffdistill.scores import ScoreEngine
from diffdistill.toy import SD15_SCHEDULE

SIGMA_D = 0.5
SCHEDULES = {"vp": VPSchedule.from_scheduler_config(SD15_SCHEDULE), "flow": FlowSchedule()}


def coefficients(schedule, timestep):
    t = timestep / schedule.num_train_timesteps if schedule.kind == "flow" else timestep
    return schedule.alpha(t, torch.float64)[:, None], schedule.sigma(t, torch.float64)[:, None], t


class GaussianX0(nn.Module):
    """Tweedie's E[x0 | x_t] for N(mu, std^2) data (the exact teacher), parameter-free, float64."""

    backbone_kind = "plain"

    def __init__(self, schedule, mu, std):
        super().__init__()
        self.schedule, self.mu, self.std = schedule, mu, std

    def forward(self, x, timestep, cond):
        a, s, _ = coefficients(self.schedule, timestep)
        return self.mu + a * self.std**2 * (x - a * self.mu) / (a**2 * self.std**2 + s**2)


class ConsistencyX0(nn.Module):
    """x0 output f*(x_t) of the exact consistency function, times (1 + eps t / t_max) (eps = 0: exact)."""

    backbone_kind = "plain"

    def __init__(self, schedule, mu, std, eps=0.0):
        super().__init__()
        self.schedule, self.mu, self.std, self.eps = schedule, mu, std, eps

    def forward(self, x, timestep, cond):
        a, s, t = coefficients(self.schedule, timestep)
        f = self.mu + self.std * (x - a * self.mu) / (a**2 * self.std**2 + s**2).sqrt()
        return f * (1 + self.eps * t[:, None] / self.schedule.t_max)


def trigflow_batch(schedule, mu, std, n=2000, dim=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = TrigFlowTimes(-1.0, 1.4, 0.002, 80.0, SIGMA_D)(schedule, n, BatchRandom(seed))
    x0 = mu + std * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return torch.cos(s)[:, None] * x0 + torch.sin(s)[:, None] * SIGMA_D * torch.randn(n, dim, generator=g, dtype=torch.float64), s


def tangent_of(schedule, mu, std, eps, n=2000, dim=1):
    teacher = Teacher(None, GaussianX0(schedule, mu, std), "exact", "plain", schedule, "sample", "exact", data_shape=(dim,))
    x_hat, s = trigflow_batch(schedule, mu, std, n, dim)
    dx_ds = teacher_tangent(ScoreEngine(teacher, {}), x_hat, s, {}, None, 1.0, SIGMA_D)
    student = Denoiser(ConsistencyX0(schedule, mu, std, eps), schedule, "sample")
    F_minus, dF = velocity_and_tangent(student, schedule, "sample", x_hat, s, {}, SIGMA_D, dx_ds)
    return scm_tangent(F_minus, dF, x_hat, s, dx_ds, SIGMA_D, 1.0), dx_ds, F_minus


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_methods_md_case_zero_teacher_velocity_gives_zero_tangent(kind):
    """Data N(0, sigma_d^2 I): the teacher's F is 0 and F_theta = (cos s - 1) x^ / (sigma_d sin s) gives g = 0."""
    schedule = SCHEDULES[kind]
    g, dx_ds, F_minus = tangent_of(schedule, 0.0, SIGMA_D, 0.0, dim=3)
    assert dx_ds.abs().max() < 1e-6
    x_hat, s = trigflow_batch(schedule, 0.0, SIGMA_D, dim=3)
    expected_F = (torch.cos(s)[:, None] - 1) * x_hat / (SIGMA_D * torch.sin(s)[:, None])
    torch.testing.assert_close(F_minus, expected_F, rtol=1e-5, atol=1e-6)
    assert g.abs().max() < 1e-6
    perturbed, _, _ = tangent_of(schedule, 0.0, SIGMA_D, 0.1, dim=3)
    assert perturbed.square().mean().sqrt() > 1e-2


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_scm_loss_vanishes_at_the_exact_consistency_function(kind):
    """A non-trivial teacher (MU = 1.5, S = 0.7): g ~ 0 and the loss ~ 0 at f*, clearly positive off it."""
    schedule = SCHEDULES[kind]
    losses = {}
    for eps in (0.0, 0.1):
        g, _, F_minus = tangent_of(schedule, 1.5, 0.7, eps)
        g = normalize_tangent(g, "l2", 0.1)
        losses[eps] = scm_loss(F_minus.clone(), F_minus, g).mean().item()
    assert losses[0.0] < 1e-10 and losses[0.1] > 1e-3, losses


def test_scm_gradient_is_minus_g_through_F():
    """d/dF of e^{-u} mean(F - sg F - g)^2 + u at F = sg F is -2 e^{-u} g / D."""
    F = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    g, u = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    scm_loss(F, F.detach(), g, u).sum().backward()
    torch.testing.assert_close(F.grad, -2 * torch.exp(-u)[:, None] * g / 6)


def test_trigflow_conversion_matches_the_schedule_denoiser():
    """x_t = alpha x0 + sigma eps is x^ = cos s x0 + sin s sigma_d eps scaled by alpha / cos s; D agrees."""
    schedule = SCHEDULES["vp"]
    teacher = Denoiser(GaussianX0(schedule, 1.5, 0.7), schedule, "sample")
    s = torch.tensor([0.2, 0.9, 1.4], dtype=torch.float64)
    x0, eps = torch.randn(3, 1, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
    t = trigflow_time(schedule, s, SIGMA_D)
    alpha, sigma = schedule.alpha(t, torch.float64)[:, None], schedule.sigma(t, torch.float64)[:, None]
    torch.testing.assert_close(sigma / alpha, SIGMA_D * torch.tan(s)[:, None])
    x_hat = torch.cos(s)[:, None] * x0 + torch.sin(s)[:, None] * SIGMA_D * eps
    torch.testing.assert_close(x_hat * alpha / torch.cos(s)[:, None], alpha * x0 + sigma * eps)
    D = trigflow_x0(teacher, schedule, "sample", x_hat, s, {}, SIGMA_D)
    torch.testing.assert_close(D, teacher(alpha * x0 + sigma * eps, t, {}).double(), rtol=1e-5, atol=1e-6)
    F = trigflow_velocity(D, x_hat, s, SIGMA_D)
    torch.testing.assert_close(torch.cos(s)[:, None] * x_hat - SIGMA_D * torch.sin(s)[:, None] * F, D)


def finite_difference(net, schedule, x_hat, s, dx_ds, h=1e-4):
    cos_sin = torch.cos(s) * torch.sin(s)

    def F(x, s):
        return trigflow_velocity(trigflow_x0(net, schedule, "epsilon" if hasattr(net.backbone, "config") else "sample", x, s, cond_of(net, x), SIGMA_D), x, s, SIGMA_D)

    step_x, step_s = h * cos_sin.view(-1, *[1] * (x_hat.ndim - 1)) * dx_ds, h * cos_sin
    with torch.no_grad():
        return (F(x_hat + step_x, s + step_s) - F(x_hat - step_x, s - step_s)) / (2 * h)


def cond_of(net, x):
    if hasattr(net.backbone, "config"):
        return {"encoder_hidden_states": torch.linspace(-1, 1, x.shape[0] * 4 * 32, dtype=torch.float64).view(x.shape[0], 4, 32)}
    return {}


def test_jvp_tangent_equals_a_finite_difference_mlp():
    from diffdistill.toy import MLPDenoiserNet

    schedule = SCHEDULES["vp"]
    torch.manual_seed(0)
    net = Denoiser(MLPDenoiserNet(schedule, 2, 32, 2).double(), schedule, "sample")
    x_hat, s = trigflow_batch(schedule, 0.0, 1.0, n=64, dim=2)
    dx_ds = torch.randn_like(x_hat)
    _, dF = velocity_and_tangent(net, schedule, "sample", x_hat, s, {}, SIGMA_D, dx_ds)
    # h is large enough for the float32 timestep the Denoiser passes on, small enough for the curvature
    torch.testing.assert_close(dF, finite_difference(net, schedule, x_hat, s, dx_ds, h=1e-3), rtol=1e-2, atol=1e-3)


def test_jvp_tangent_equals_a_finite_difference_tiny_unet():
    """Through a diffusers UNet with the math attention that use_jvp_attention installs on CPU."""
    from diffdistill.backbones.tiny import tiny_unet

    schedule = SCHEDULES["vp"]
    backbone = tiny_unet(0).double().eval()
    assert use_jvp_attention(backbone) > 0
    net = Denoiser(backbone, schedule, "epsilon")
    g = torch.Generator().manual_seed(0)
    x_hat, s = 0.5 * torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0.4, 1.2], dtype=torch.float64)
    dx_ds = torch.randn(x_hat.shape, generator=g, dtype=torch.float64)
    F, dF = velocity_and_tangent(net, schedule, "epsilon", x_hat, s, cond_of(net, x_hat), SIGMA_D, dx_ds)
    assert torch.isfinite(dF).all() and dF.abs().max() > 0
    # a random UNet is strongly curved in t: h = 1e-4 is where the central difference has converged
    # (1e-4 relative here) before the float32 timestep the Denoiser passes on quantizes it
    fd = finite_difference(net, schedule, x_hat, s, dx_ds, h=1e-4)
    torch.testing.assert_close(dF, fd, rtol=1e-2, atol=1e-3 * dF.abs().max().item())


def test_jvp_refuses_cpu_autocast_and_checkpointed_gradients():
    from diffdistill.backbones.tiny import tiny_unet

    backbone = tiny_unet(0)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="mixed_precision=no"):
        check_jvp_supported(backbone, torch.device("cpu"))
    backbone.enable_gradient_checkpointing()
    backbone.train()
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        check_jvp_supported(backbone, torch.device("cpu"))
    with torch.no_grad():
        check_jvp_supported(backbone, torch.device("cpu"))  # diffusers skips checkpointing without gradients


def test_bf16_on_cpu_is_a_config_error(tiny_unet_dir):
    from diffdistill.backbones.loading import load_teacher
    from diffdistill.config import ConfigError, TrainConfig
    from diffdistill.methods import build_method

    if torch.cuda.is_available():
        pytest.skip("the check is for CPU runs")
    with pytest.raises(ConfigError, match="mixed_precision=no"):
        build_method({"name": "scm"}, load_teacher(tiny_unet_dir), TrainConfig(mixed_precision="bf16"))


def test_trigflow_times_follow_the_truncated_lognormal():
    """log sigma ~ N(-1, 1.4^2) truncated to the SD1.5 schedule's [0.029, 14.6] (3.5% of the normal's mass
    lies below, 0.4% above): its quantiles and spread against scipy's truncated normal, not just its middle."""
    schedule = SCHEDULES["vp"]
    s = TrigFlowTimes(-1.0, 1.4, 0.002, 80.0, SIGMA_D)(schedule, 20000, BatchRandom(0))
    log_sigma = (SIGMA_D * torch.tan(s)).log().numpy()
    ends = torch.tensor([0.0, 999.0])
    lo, hi = (schedule.sigma(ends, torch.float64) / schedule.alpha(ends, torch.float64)).log().tolist()
    reference = truncnorm((lo + 1.0) / 1.4, (hi + 1.0) / 1.4, loc=-1.0, scale=1.4)
    assert log_sigma.min() >= lo - 1e-9 and log_sigma.max() <= hi + 1e-9
    # a standard error of the std is 0.5% at n = 2e4; p_std 1.3 or 1.5 moves it 7%
    assert abs(log_sigma.std() / reference.std() - 1) < 0.02, (log_sigma.std(), reference.std())
    # each quantile's standard error is at most 0.02 in log sigma here; clamping instead of truncating moves the outer ones by 0.1+
    levels = np.array([0.02, 0.1, 0.25, 0.5, 0.75, 0.9, 0.98])
    np.testing.assert_allclose(np.quantile(log_sigma, levels), reference.ppf(levels), atol=0.06)


def test_logvar_head_starts_at_weight_one():
    head = LogVarHead(SIGMA_D)
    s = torch.tensor([0.1, 0.8, 1.5], dtype=torch.float64)
    assert torch.equal(head(s), torch.zeros(3, dtype=torch.float64))


def toy_rcm(**options):
    from diffdistill.config import TrainConfig
    from diffdistill.methods import build_method
    from diffdistill.toy import ring8, toy_teacher

    teacher = toy_teacher(ring8(), generator_width=16, generator_depth=1, critic_width=16, critic_depth=1)
    return build_method({"name": "rcm", **options}, teacher, TrainConfig())


def test_rcm_phase_rule_and_dmd_term_after_warmup():
    from diffdistill.toy import ring8

    method = toy_rcm(dmd_warmup=3, ratio=2, tangent_warmup=10)
    assert [method.phase(i) for i in range(9)] == ["generator"] * 3 + ["critic", "critic", "generator"] * 2
    batch = {"prompts": [""] * 8, "cond": {}, "uncond": {}, "x0": ring8().sample(8, torch.Generator().manual_seed(0))}
    loss, logs = method.generator_loss({**batch, "rng": BatchRandom(0), "step": 0})
    assert loss.shape == (8,) and "loss_dm" not in logs and logs["tangent_warmup_r"] == 0.0
    loss, logs = method.generator_loss({**batch, "rng": BatchRandom(1), "step": 5})
    assert torch.isfinite(loss).all() and "loss_dm" in logs
    loss, logs = method.critic_loss({**batch, "rng": BatchRandom(2), "step": 4})
    assert loss.shape == (8,) and "loss_fake" in logs
    assert method.phase_nets("generator") == ["generator"] and method.phase_nets("critic") == ["critic"]


@pytest.mark.parametrize("name, steps", [("scm", 300), ("rcm", 250)])
def test_repairs_a_shrunk_ring_to_the_floors(name, steps, tmp_path, one_thread):
    """The method learns, to absolute floors that reject every broken ring8 variant (toy.METHOD_FLOORS, CD's:
    ED <= 0.012, 8/8 modes, masses in [0.7, 1.3], <= 30% between modes, spread <= 1.65; tests/test_toy_learning.py).
    From a consistency warm start on ring8 shrunk to radius 1.8 (600 regression steps on the shrunk teacher's ODE
    trajectories, shared by both cases; it fails the floors, ED 0.037), at the toy settings (TRAIN_DEFAULTS: lr 3e-4;
    sCM with a generator EMA 0.99; rCM's critic at 1e-3, its DMD term after 100 sCM-only steps) one-step samples
    must reach the floors: sCM after 300 steps ED 0.006-0.007, 19-20% between, spread 1.15 (seeds 0, 1); rCM after
    250 ED 0.009, 18%. ~15 s and ~25 s of CPU (the warm start, ~5 s, once). By hand these failed: scm_tangent's sign
    flipped, the update a no-op (the warm start stays shrunk), the teacher's tangent taken from the student."""
    assert_repairs_shrunk_ring8(name, steps, tmp_path)

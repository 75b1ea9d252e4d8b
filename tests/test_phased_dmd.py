"""Phased DMD's subinterval objectives against closed forms on 1-D Gaussians.

Expert samples x_s ~ N(M, V) at the boundary s are noised by the conditional forward process
x_t = alpha_{t|s} x_s + sigma_{t|s} eps, so q_t = N(alpha_{t|s} M, alpha_{t|s}^2 V + sigma_{t|s}^2) and its
Tweedie x0, (x_t + sigma_t^2 grad log q_t) / alpha_t, is linear in x_t: the fake score's target must
regress onto exactly that line, and the generator's gradient must be the gradient of KL(q_t || p_t).
"""

import pytest
import torch
from torch import nn
from toy_repair import assert_repairs_shrunk_ring8

from diffdistill.backbones.loading import Teacher
from diffdistill.denoiser import Denoiser
from diffdistill.methods.phased_dmd import stage_ends
from diffdistill.methods.subinterval import conditional_coefficients, subinterval_dm_grad, subinterval_score_loss, subinterval_x0_target
from diffdistill.randomness import BatchRandom
from diffdistill.schedules import VPSchedule
from diffdistill.scores import ScoreEngine
from diffdistill.toy import SD15_SCHEDULE, ExactDenoiserNet, GaussianMixture

SCHEDULE = VPSchedule.from_scheduler_config(SD15_SCHEDULE)
MU, TAU = 1.5, 0.7  # the teacher's data


def laws(s_value, t_value, m, v):
    """alpha_t, sigma_t, alpha_{t|s}, sigma_{t|s} and q_t's mean and variance, as floats."""
    like = torch.zeros(1, 1, dtype=torch.float64)
    a_t, s_t, a_ts, s_ts = (float(c) for c in conditional_coefficients(SCHEDULE, torch.tensor([float(s_value)]), torch.tensor([float(t_value)]), like))
    return a_t, s_t, a_ts, s_ts, a_ts * m, a_ts**2 * v + s_ts**2


def regression(x, y):
    design = torch.stack([torch.ones_like(x), x], 1)
    return torch.linalg.lstsq(design, y[:, None]).solution.squeeze(1)  # (intercept, slope)


@pytest.mark.parametrize("s, t", [(400.0, 700.0), (200.0, 250.0), (600.0, 980.0)])
def test_subinterval_target_regresses_onto_the_exact_fake_x0(s, t):
    m, v, n = 0.8, 0.5**2, 400_000
    a_t, s_t, a_ts, s_ts, mean_q, var_q = laws(s, t, m, v)
    g = torch.Generator().manual_seed(0)
    x_s = m + v**0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    x_t = a_ts * x_s + s_ts * eps
    target = subinterval_x0_target(x_t, eps, a_t, s_t, s_ts)
    # Tweedie of q_t: (x_t - sigma_t^2 (x_t - mean_q) / var_q) / alpha_t
    exact = torch.tensor([s_t**2 * mean_q / (var_q * a_t), (1 - s_t**2 / var_q) / a_t], dtype=torch.float64)
    fitted = regression(x_t, target)
    residual_sd = (target - fitted[0] - fitted[1] * x_t).std() / n**0.5
    assert (fitted - exact).abs().max() < 6 * residual_sd * (1 + x_t.abs().mean()), (fitted, exact)
    naive = regression(x_t, x_s / float(SCHEDULE.alpha(torch.tensor([s]), torch.float64)))  # x_s taken for data: biased
    assert (naive - exact).abs().max() > 20 * residual_sd * (1 + x_t.abs().mean()), (naive, exact)


def test_subinterval_target_at_the_data_boundary_is_x0():
    x0, eps, t = torch.randn(5, 1, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64), torch.full((5,), 500.0)
    a_t, s_t, a_ts, s_ts = conditional_coefficients(SCHEDULE, None, t, x0)
    torch.testing.assert_close(a_ts, a_t)
    torch.testing.assert_close(s_ts, s_t)
    torch.testing.assert_close(subinterval_x0_target(a_t * x0 + s_t * eps, eps, a_t, s_t, s_ts), x0)


class Affine(nn.Module):
    backbone_kind = "plain"

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(a, dtype=torch.float64)), nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, z, timestep, cond):
        return self.a * z + self.b


class ExactFake(nn.Module):
    """Tweedie's x0 of q_t for expert samples N(b, a^2) at s, under the conditional process (frozen)."""

    backbone_kind = "plain"

    def __init__(self, s, a, b):
        super().__init__()
        self.s, self.a, self.b = s, a, b

    def forward(self, x, timestep, cond):
        a_t, s_t, _, _, mean_q, var_q = laws(self.s, float(timestep[0]), self.b, self.a**2)
        return (x - s_t**2 * (x - mean_q) / var_q) / a_t


def kl_gauss(m1, v1, m2, v2):
    return 0.5 * (torch.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)


@pytest.mark.parametrize("a, b, s, t", [(0.6, 0.2, 400.0, 700.0), (1.1, -0.5, 200.0, 500.0)])
def test_unnormalized_generator_gradient_is_the_subinterval_kl_gradient(a, b, s, t):
    """E[(alpha_t / sigma_t^2) g dx_s/dtheta] = d/dtheta KL(q_t || p_t) with g = alpha_{t|s} (D_fake - D_teacher)."""
    n = 400_000
    teacher = Teacher(None, ExactDenoiserNet(GaussianMixture(torch.tensor([[MU]], dtype=torch.float64), TAU), SCHEDULE), "exact", "plain",
                      SCHEDULE, "sample", "exact", data_shape=(1,))
    expert = Denoiser(Affine(a, b), SCHEDULE, "sample")
    engine = ScoreEngine(teacher, {"critic": Denoiser(ExactFake(s, a, b), SCHEDULE, "sample")})
    rng = BatchRandom(0)
    x_s = expert(rng.randn((n, 1)).double(), torch.zeros(n), {})
    t_vec, s_vec = torch.full((n,), t), torch.full((n,), s)
    grad, _ = subinterval_dm_grad(engine, x_s, s_vec, t_vec, rng.randn((n, 1)).double(), {}, None, 1.0, normalize="none")
    (x_s * grad).sum().backward()
    a_t, s_t, a_ts, s_ts, _, _ = laws(s, t, b, a**2)
    mc = torch.stack([expert.backbone.a.grad, expert.backbone.b.grad]) / n * a_t / s_t**2

    a_, b_ = torch.tensor(a, dtype=torch.float64, requires_grad=True), torch.tensor(b, dtype=torch.float64, requires_grad=True)
    kl_gauss(a_ts * b_, a_ts**2 * a_**2 + s_ts**2, a_t * MU, a_t**2 * TAU**2 + s_t**2).backward()
    expected = torch.stack([a_.grad, b_.grad])
    torch.testing.assert_close(mc, expected, rtol=0.03, atol=3e-3 * expected.abs().max().item())


def toy_phased(max_steps=12, **options):
    from diffdistill.config import TrainConfig
    from diffdistill.methods import build_method
    from diffdistill.toy import ring8, toy_teacher

    teacher = toy_teacher(ring8(), generator_width=16, generator_depth=1, critic_width=16, critic_depth=1)
    return build_method({"name": "phased_dmd", **options}, teacher, TrainConfig(max_steps=max_steps))


def test_stages_run_from_low_to_high_snr_and_train_one_expert_each():
    method = toy_phased(max_steps=12, ratio=2, timesteps=[999, 499])
    assert method.stage_ends == [6, 12] and [method.stage(i) for i in (0, 5, 6, 11, 20)] == [0, 0, 1, 1, 1]
    assert [method.phase(i) for i in range(6)] == ["critic", "critic", "generator"] * 2
    batch = {"prompts": [""] * 8, "cond": {}, "uncond": {}, "rng": BatchRandom(0)}
    loss, logs = method.generator_loss({**batch, "step": 8})
    loss.mean().backward()
    grads = {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters()) for name, net in method.nets.items()}
    assert grads == {"expert_0": False, "critic_0": False, "expert_1": True, "critic_1": False}, grads
    loss, logs = method.critic_loss({**batch, "rng": BatchRandom(1), "step": 2})
    assert loss.shape == (8,) and logs["stage"] == 0.0
    assert stage_ends(3, [1, 1, 2], 100, 6)[:2] == [24, 48]  # whole (critic, critic, ..., generator) cycles


def test_sampling_runs_one_step_per_expert():
    method = toy_phased(timesteps=[999, 666, 333])
    calls = []
    for k in range(3):
        method.nets[f"expert_{k}"].register_forward_hook(lambda m, args, out, k=k: calls.append((k, float(args[1][0]))))
    x = method.sample(torch.randn(4, 2), {}, {}, None, 1.0)
    assert x.shape == (4, 2) and calls == [(0, 999.0), (1, 666.0), (2, 333.0)]


def test_phased_dmd_refuses_the_trainer_ema():
    from diffdistill.config import ConfigError, TrainConfig
    from diffdistill.methods import build_method
    from diffdistill.toy import ring8, toy_teacher

    with pytest.raises(ConfigError, match="ema_decay=0"):
        build_method({"name": "phased_dmd"}, toy_teacher(ring8(), generator_width=16, generator_depth=1, critic_width=16, critic_depth=1), TrainConfig(ema_decay=0.99))


def test_expert_ema_follows_the_current_stage_and_is_what_samples():
    method = toy_phased(max_steps=12, ratio=2, timesteps=[999, 499], expert_ema=0.5)
    assert set(method.ema_targets) == {"ema_0", "ema_1"}
    for p in method.nets["expert_0"].parameters():
        p.data.add_(1.0)
    before = [p.clone() for p in method.nets["ema_0"].parameters()]
    method.after_step(1)  # a critic step: no EMA update
    assert all(torch.equal(a, b) for a, b in zip(before, method.nets["ema_0"].parameters()))
    method.after_step(2)  # stage 0's generator step: ema_0 moves halfway, ema_1 stays
    for a, b, online in zip(before, method.nets["ema_0"].parameters(), method.nets["expert_0"].parameters()):
        torch.testing.assert_close(b, (a + online) / 2)
    assert method.deployed(0) is method.nets["ema_0"] and method.deployed(1) is method.nets["ema_1"]
    calls = []
    method.nets["ema_1"].register_forward_hook(lambda *args: calls.append(1))
    method.sample(torch.randn(3, 2), {}, {}, None, 1.0)
    assert calls == [1]
    with pytest.raises(ValueError, match="expert_ema"):
        toy_phased(expert_ema=1.0)


def test_critic_loss_is_finite_as_t_reaches_the_boundary():
    """At t = s, sigma_{t|s} is 0 and D* divides by it: the weighted loss must stay finite, not NaN."""
    from diffdistill.toy import ring8, toy_teacher

    teacher = toy_teacher(ring8(), generator_width=16, generator_depth=1, critic_width=16, critic_depth=1)
    critic = teacher.denoiser()
    x_s = torch.randn(4, 2)
    s = torch.full((4,), 499.0)
    for weighting in ("eps", "x0"):
        loss = subinterval_score_loss(critic, teacher.schedule, x_s, s, s.clone(), torch.randn(4, 2, dtype=torch.float64), {}, weighting)
        assert torch.isfinite(loss).all(), (weighting, loss)


def test_repairs_a_shrunk_ring_to_the_floors(tmp_path, one_thread):
    """The method learns, to the default toy.Floors (ED <= 0.012, <= 20% between modes, masses and spread in range,
    8/8 modes), which reject every broken ring8 variant (tests/test_toy_learning.py). Each expert starts from a
    consistency warm start on ring8 shrunk to radius 1.8 (600 steps of regression onto its step's endpoint on the
    shrunk teacher's ODE trajectories; ED 0.035, which fails the floors); at the toy settings (METHOD_DEFAULTS: two
    experts 999 -> 749 -> data, expert EMA 0.98; TRAIN_DEFAULTS: lr 1e-4, critic 1e-3) 200 generator steps (100 per
    expert) must reach the floors: ED 0.0056, 15% between, spread 0.89. ~22 s of CPU. By hand these failed: the DM
    gradient's sign flipped, the fake score never trained, the update a no-op (the warm start stays shrunk)."""
    assert_repairs_shrunk_ring8("phased_dmd", 200, tmp_path)

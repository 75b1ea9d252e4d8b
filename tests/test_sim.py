"""SIM's generator gradient against the closed-form gradient of its divergence (1-D Gaussians).

SIM's divergence is E_{x_t ~ pi_t} d(s_p - s_q_theta)(x_t) with pi_t = sg(q_theta,t); in x0 units,
with d the pseudo-Huber distance, D(theta) = E_{x_t ~ sg(q_t)} d(D_r - D_f)(x_t). The closed form
integrates d over the frozen N(m_q, v_q) on a fine grid; only s_q (hence D_f) moves with theta.
"""

import gaussian_1d as g
import pytest
import torch
from toy_repair import assert_repairs_shrunk_ring8

from diffdistill.config import ConfigError, TrainConfig
from diffdistill.methods import build_method
from diffdistill.methods.sid import sid_loss
from diffdistill.methods.sim import pseudo_huber_grad, sim_generator_loss, sim_loss
from diffdistill.randomness import BatchRandom
from diffdistill.toy import ring8, toy_teacher


def x0_gap(x, m_q, v_q, m_p, v_p, alpha, sigma):
    """(D_r - D_f)(x) = sigma^2 / alpha (s_p - s_q)(x)."""
    return sigma**2 / alpha * (-(x - m_p) / v_p + (x - m_q) / v_q)


def sim_divergence(a, b, alpha, sigma, c, frozen: bool = True):
    m_q, v_q, m_p, v_p = g.noised_laws(a, b, alpha, sigma)
    huber = lambda x: (x0_gap(x, m_q, v_q, m_p, v_p, alpha, sigma) ** 2 + c**2).sqrt() - c
    return g.expectation(huber, m_q.detach() if frozen else m_q, v_q.detach() if frozen else v_q)


def sim_per_sample(c):
    return lambda engine, x, t, eps: sim_generator_loss(engine, x, t, eps, {}, None, 1.0, 1.0, c)[0]


@pytest.mark.parametrize("c", [0.1, 1.0])
@pytest.mark.parametrize("a, b, t", [(0.3, 1.0, 200), (1.2, 1.0, 400)])  # q narrower and wider than p; both components large
def test_sim_gradient_is_the_gradient_of_its_divergence(c, a, b, t):
    alpha, sigma = g.coefficients(t)
    mc = g.mc_gradient(a, b, t, sim_per_sample(c))
    expected = g.grad_of(lambda a_, b_: sim_divergence(a_, b_, alpha, sigma, c), a, b)
    assert (expected.abs() > 0.14).all(), expected  # each component is large, so a relative tolerance means something
    # the MC standard error of each component is at most 0.4% of it at n = 4e5: 2% is five of them
    torch.testing.assert_close(mc, expected, rtol=0.02, atol=0.0)
    # and the check can tell SIM's frozen sampling law from a free one, on each component (15-50% apart here)
    free = g.grad_of(lambda a_, b_: sim_divergence(a_, b_, alpha, sigma, c, frozen=False), a, b)
    assert ((mc - free).abs() > 0.1 * free.abs()).all(), (mc, free)


def test_sim_gradient_points_toward_the_target_and_vanishes_only_there():
    a, b, t = 0.5, -0.3, 300
    alpha, sigma = g.coefficients(t)
    mc = g.mc_gradient(a, b, t, sim_per_sample(0.05), n=100_000)
    # the divergence with the sampling law left free: a descent direction for it, too
    free = g.grad_of(lambda a_, b_: sim_divergence(a_, b_, alpha, sigma, 0.05, frozen=False), a, b)
    assert torch.nn.functional.cosine_similarity(mc, free, dim=0) > 0.5
    g.assert_vanishes_only_at_the_target(*g.gradient_at_and_near_the_target(lambda a_, b_: sim_per_sample(0.05), t))


def test_pseudo_huber_derivative_and_its_large_c_limit():
    y = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    c = 0.3
    d = ((y.flatten(1).square().sum(1) + c**2).sqrt() - c).sum()
    (autograd,) = torch.autograd.grad(d, y)
    torch.testing.assert_close(pseudo_huber_grad(y, c), autograd)
    # as c grows, c~ * SIM -> SiD at alpha = 1 (both without normalization)
    x, x0_real, x0_fake = (torch.randn(5, 3, dtype=torch.float64) for _ in range(3))
    big = 1e6
    torch.testing.assert_close(big * 3**0.5 * sim_loss(x, x0_real, x0_fake, big), sid_loss(x, x0_real, x0_fake, 1.0, normalize=False))


def test_sim_method_runs_and_checks_its_options():
    teacher = toy_teacher(ring8(), generator_width=32, generator_depth=2, critic_width=32, critic_depth=2)
    cfg = TrainConfig(teacher="exact:ring8", out="unused")
    method = build_method({"name": "sim", "huber_c": 0.1}, teacher, cfg)
    batch = {"prompts": [""] * 8, "cond": {}, "uncond": {}, "rng": BatchRandom(0), "step": 0}
    loss, logs = method.generator_loss(batch)
    assert loss.shape == (8,) and torch.isfinite(loss).all() and "loss_sim" in logs
    loss, _ = method.critic_loss({**batch, "rng": BatchRandom(1)})
    assert loss.shape == (8,) and torch.isfinite(loss).all()
    with pytest.raises(ConfigError, match="huber_c"):
        build_method({"name": "sim", "huber_c": 0.0}, teacher, cfg)


def test_sim_repairs_a_shrunk_ring8_to_the_floors(tmp_path):
    """The method learns: see tests/toy_repair.py."""
    assert_repairs_shrunk_ring8("sim", 120, tmp_path)

"""SiD's generator gradient against closed-form gradients of the Fisher divergence (1-D Gaussians).

With exact scores, delta = s_p - s_q, c = sigma^4 / alpha^2, F(theta) = E_{x_t ~ q_t} delta^2 and
sid_loss with w = 1, l = (D_r - D_f)(D_f - x) + (1 - alpha_sid)(D_r - D_f)^2:
    E grad l = c/2 [grad F - grad_path F] + (1 - alpha_sid) c grad_path F
where grad_path F is the part of grad F through x_t alone (scores frozen at the current theta) and
grad F - grad_path F the part through s_q's dependence on theta, i.e. the gradient of
E_{x_t ~ sg(q_t)} delta_theta^2 (SIM's form with d = |.|^2). So alpha_sid = 1/2 gives exactly
c/2 grad F, alpha_sid = 1 the frozen-distribution gradient, and the paper's 1.2 a mixture.
"""

import gaussian_1d as g
import numpy as np
import pytest
import torch
from toy_repair import assert_repairs_shrunk_ring8

from diffdistill.config import ConfigError, TrainConfig
from diffdistill.methods import build_method
from diffdistill.methods.dmd import default_range
from diffdistill.methods.sid import SiDTimesteps, sid_generator_loss
from diffdistill.randomness import BatchRandom
from diffdistill.scores import critic_phase_loss
from diffdistill.teachers import resolve_teacher
from diffdistill.toy import ring8, toy_teacher


def score_gap(x, m_q, v_q, m_p, v_p):
    """(s_p - s_q)(x) of two Gaussians."""
    return -(x - m_p) / v_p + (x - m_q) / v_q


def fisher(a, b, alpha, sigma):
    m_q, v_q, m_p, v_p = g.noised_laws(a, b, alpha, sigma)
    return g.expectation(lambda x: score_gap(x, m_q, v_q, m_p, v_p) ** 2, m_q, v_q)


def fisher_path_only(a, b, alpha, sigma):
    """E_{q_t(theta)} of (s_p - s_q)^2 with the scores frozen at the current theta."""
    m_q, v_q, m_p, v_p = g.noised_laws(a, b, alpha, sigma)
    frozen = (m_q.detach(), v_q.detach(), m_p, v_p)
    return g.expectation(lambda x: score_gap(x, *frozen) ** 2, m_q, v_q)


def sid_unnormalized(alpha_sid):
    return lambda engine, x, t, eps: sid_generator_loss(engine, x, t, eps, {}, None, 1.0, 1.0, alpha_sid, normalize=False)[0]


@pytest.mark.parametrize("alpha_sid", [0.5, 1.0, 1.2])
@pytest.mark.parametrize("a, b, t", [(0.5, -0.3, 300), (1.2, 0.4, 600)])
def test_sid_gradient_matches_the_fisher_divergence(alpha_sid, a, b, t):
    alpha, sigma = g.coefficients(t)
    c = sigma**4 / alpha**2
    mc = g.mc_gradient(a, b, t, sid_unnormalized(alpha_sid))
    full = g.grad_of(lambda a_, b_: fisher(a_, b_, alpha, sigma), a, b)
    path = g.grad_of(lambda a_, b_: fisher_path_only(a_, b_, alpha, sigma), a, b)
    expected = c / 2 * (full - path) + (1 - alpha_sid) * c * path
    torch.testing.assert_close(mc, expected, rtol=0.03, atol=3e-3 * expected.abs().max().item())
    if alpha_sid == 0.5:  # the Fisher divergence's own gradient
        torch.testing.assert_close(mc, c / 2 * full, rtol=0.03, atol=3e-3 * full.abs().max().item() * c)


def test_the_two_parts_of_the_fisher_gradient_differ():
    """So the alpha_sid checks above tell the parts apart: the path part alone is a different vector."""
    a, b, t = 0.5, -0.3, 300
    alpha, sigma = g.coefficients(t)
    full = g.grad_of(lambda a_, b_: fisher(a_, b_, alpha, sigma), a, b)
    path = g.grad_of(lambda a_, b_: fisher_path_only(a_, b_, alpha, sigma), a, b)
    assert (full - path).norm() > 0.2 * full.norm() and path.norm() > 0.1 * full.norm()


def test_normalized_sid_descends_the_fisher_divergence_and_vanishes_only_at_the_target():
    a, b, t = 1.2, 0.4, 600
    alpha, sigma = g.coefficients(t)
    normalized = lambda engine, x, t_, eps: sid_generator_loss(engine, x, t_, eps, {}, None, 1.0, 1.0, 1.2)[0]
    mc = g.mc_gradient(a, b, t, normalized, n=100_000)
    expected = g.grad_of(lambda a_, b_: fisher(a_, b_, alpha, sigma), a, b)
    assert torch.nn.functional.cosine_similarity(mc, expected, dim=0) > 0.5
    g.assert_vanishes_only_at_the_target(*g.gradient_at_and_near_the_target(lambda a_, b_: normalized, t))


def sid_sigma_cdf(sigma, t_max=0.8, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """P(sigma_r <= sigma) for SiD's sigma_r = (s_max + (1 - r)(s_min - s_max))^rho, s = sigma^(1/rho), r ~ U(0, t_max)."""
    s_min, s_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return np.clip((np.asarray(sigma) ** (1 / rho) - s_min) / ((s_max - s_min) * t_max), 0, 1)


def test_sid_sigma_sampler_follows_the_papers_distribution():
    """SiD draws sigma in [0.002, 24.4]; SD1.5's VP schedule covers sigma/alpha in [0.029, 14.6], so the
    draws beyond clamp to its ends: 16.4% at t = 0 and 9.5% at t = 999 (from the formula above), and the
    median is 0.963. A uniform t or another rho puts visibly different shares there."""
    schedule = toy_teacher(ring8()).schedule
    t = SiDTimesteps()(schedule, 20000, BatchRandom(0))
    ratio = (schedule.sigma(t, torch.float64) / schedule.alpha(t, torch.float64)).numpy()
    ends = torch.tensor([0.0, 999.0])
    lo, hi = (schedule.sigma(ends, torch.float64) / schedule.alpha(ends, torch.float64)).tolist()
    at_min, at_max = float((t == 0).float().mean()), float((t == schedule.t_max).float().mean())
    # standard errors: 0.26% and 0.21% at n = 2e4
    assert abs(at_min - sid_sigma_cdf(lo)) < 0.01 and abs(at_max - (1 - sid_sigma_cdf(hi))) < 0.01, (at_min, at_max)
    assert abs(np.median(ratio) - 0.963) < 0.06  # the median's standard error is 0.028
    # between the clamps, the empirical CDF against the formula's (Kolmogorov-Smirnov; 0.0096 is its 5% level)
    inside = np.sort(ratio[(t > 0) & (t < schedule.t_max)])
    empirical = at_min + np.arange(1, len(inside) + 1) / len(ratio)
    assert np.abs(empirical - sid_sigma_cdf(inside)).max() < 0.015


def test_sid_uniform_times_end_at_979_as_sid_lsg_draws_them():
    """SiD-LSG draws torch.randint(tmin=20, tmax=980), whose high end is excluded: t in {20..979}, for both losses."""
    teacher = toy_teacher(ring8(), generator_width=8, generator_depth=1, critic_width=8, critic_depth=1)
    method = build_method({"name": "sid", "t_sampler": "uniform"}, teacher, TrainConfig(teacher="exact:ring8", out="unused"))
    for times in (method.loss_times, method.critic_times):
        t = times(teacher.schedule, 20000, BatchRandom(0))
        assert t.min() == 20 and t.max() == 979 and torch.equal(t, t.floor())


def _batch(n=8, seed=0, x0=None):
    batch = {"prompts": [""] * n, "cond": {}, "uncond": {}, "rng": BatchRandom(seed), "step": 0}
    if x0 is not None:
        batch["x0"] = x0
    return batch


def test_sid_method_steps_only_the_generator_and_drops_nan_samples():
    teacher = toy_teacher(ring8(), generator_width=32, generator_depth=2, critic_width=32, critic_depth=2)
    method = build_method({"name": "sid", "alpha": 1.2}, teacher, TrainConfig(teacher="exact:ring8", out="unused"))
    assert method.phase_nets("generator") == ["generator"] and [method.phase(s) for s in range(4)] == ["critic", "generator"] * 2
    critic = method.nets["critic"]
    forward = critic.forward

    def poisoned(x_t, t, cond, output="x0"):  # the fake score returns NaN for the first sample
        out = forward(x_t, t, cond, output)
        return torch.cat([torch.full_like(out[:1], float("nan")), out[1:]])

    critic.forward = poisoned
    loss, logs = method.generator_loss(_batch())
    assert loss.shape == (8,) and torch.isfinite(loss).all() and loss[0] == 0 and logs["nan_dropped"] == 1
    loss.mean().backward()
    grads = [p.grad for p in method.nets["generator"].parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    critic.forward = forward
    loss, logs = method.critic_loss(_batch(seed=1))
    assert loss.shape == (8,) and torch.isfinite(loss).all()


def test_sida_needs_real_images_and_bad_options_are_clear_errors():
    teacher = toy_teacher(ring8(), generator_width=32, generator_depth=2, critic_width=32, critic_depth=2)
    cfg = TrainConfig(teacher="exact:ring8", out="unused")
    method = build_method({"name": "sid", "gan_weight": 1e-3}, teacher, cfg)
    with pytest.raises(ValueError, match="needs real images"):
        method.critic_loss(_batch())
    loss, logs = method.critic_loss(_batch(x0=ring8().sample(8)))
    assert "loss_gan_d" in logs and torch.isfinite(loss).all()
    with pytest.raises(ConfigError, match="t_sampler"):
        build_method({"name": "sid", "t_sampler": "edm"}, teacher, cfg)
    with pytest.raises(ConfigError, match="fake_guidance.*not used by guidance_style=cfg"):
        build_method({"name": "sid", "fake_guidance": 2.0}, teacher, cfg)


def test_sid_repairs_a_shrunk_ring8_to_the_floors(tmp_path):
    """The method learns: see tests/toy_repair.py."""
    assert_repairs_shrunk_ring8("sid", 120, tmp_path)


class _RecordsCond(torch.nn.Module):
    """A fake score that records the conditioning of its update and predicts zeros."""

    def forward(self, x_t, t, cond, output="x0"):
        self.cond = cond
        return torch.zeros_like(x_t)


def test_fake_side_prompt_dropout_replaces_that_share_of_prompts_in_the_critic_update_only():
    n, teacher = 4000, resolve_teacher("tiny:unet")
    cond, uncond = {"encoder_hidden_states": torch.randn(n, 3, 4) + 5}, {"encoder_hidden_states": torch.zeros(n, 3, 4)}
    batch = {"rng": BatchRandom(0), "cond": cond, "uncond": uncond}
    critic, times = _RecordsCond(), default_range(teacher.schedule, 0.02, 0.98)
    critic_phase_loss(critic, teacher, times, torch.randn(n, 4, 2, 2), batch, uncond_prob=0.1)
    seen = critic.cond["encoder_hidden_states"]
    dropped = (seen == 0).flatten(1).all(1)
    assert torch.equal(seen[~dropped], cond["encoder_hidden_states"][~dropped])  # the rest keep their own prompt
    assert abs(dropped.float().mean().item() - 0.1) < 0.015
    critic_phase_loss(critic, teacher, times, torch.randn(n, 4, 2, 2), {**batch, "rng": BatchRandom(0)})
    assert torch.equal(critic.cond["encoder_hidden_states"], cond["encoder_hidden_states"])  # off by default

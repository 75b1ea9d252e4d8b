"""DMD's generator gradient against the closed-form gradient of the KL it descends (1-D Gaussians).

Data N(mu, tau^2), generator x = a z + b, so p_fake = N(b, a^2). At noise level t both noised
laws are Gaussian: q_t = N(alpha b, alpha^2 a^2 + sigma^2), p_t = N(alpha mu, alpha^2 tau^2 + sigma^2),
and the exact x0 estimates come from Tweedie. DMD's Eq. 7 says
    E[(alpha^2 / sigma^2) (D_fake - D_real)(x_t) dx/dtheta] = d/dtheta KL(q_t || p_t).
"""

import gaussian_1d as g
import pytest
import torch

from diffdistill.conditioning import encode_prompts
from diffdistill.config import TrainConfig
from diffdistill.methods import build_method
from diffdistill.methods.dmd import distribution_matching_grad, surrogate_loss
from diffdistill.teachers import resolve_teacher


def dmd_per_sample(normalize):
    """DMD's surrogate: d/dx = g per sample (one element each)."""
    return lambda engine, x, t, eps: surrogate_loss(x, distribution_matching_grad(engine, x, t, eps, {}, None, 1.0, normalize=normalize)[0])


def mc_gradient(a, b, t_value, normalize, n=400_000):
    alpha, sigma = g.coefficients(t_value)
    return g.mc_gradient(a, b, t_value, dmd_per_sample(normalize), n=n), alpha, sigma


def closed_form(a, b, alpha, sigma):
    def kl_q_p(a_, b_):
        m_q, v_q, m_p, v_p = g.noised_laws(a_, b_, alpha, sigma)
        return 0.5 * (torch.log(v_p / v_q) + (v_q + (m_q - m_p) ** 2) / v_p - 1)

    return g.grad_of(kl_q_p, a, b)


@pytest.mark.parametrize("a, b, t", [(0.5, -0.3, 300), (1.2, 0.4, 600), (0.9, 2.5, 100)])
def test_unnormalized_dmd_gradient_is_the_kl_gradient(a, b, t):
    grad, alpha, sigma = mc_gradient(a, b, t, normalize="none")
    expected = closed_form(a, b, alpha, sigma)
    # MC standard error ~ 1e-3 relative at n = 4e5; the tolerance leaves room for it only
    torch.testing.assert_close(grad * alpha**2 / sigma**2, expected, rtol=0.02, atol=2e-3 * expected.abs().max().item())


@pytest.mark.parametrize("a, b, t", [(0.5, -0.3, 300), (1.2, 0.4, 600)])
def test_normalized_dmd_gradient_is_a_descent_direction(a, b, t):
    """DMD2's per-sample 1/mean|x - D_real| reweights samples, so it is no longer the KL's gradient
    (cosine about 0.7 here), but a small step along it must still lower the KL."""
    grad, alpha, sigma = mc_gradient(a, b, t, normalize="sample")
    expected = closed_form(a, b, alpha, sigma)
    assert torch.nn.functional.cosine_similarity(grad, expected, dim=0) > 0.3


def test_gradient_vanishes_only_at_the_target():
    g.assert_vanishes_only_at_the_target(*g.gradient_at_and_near_the_target(lambda a, b: dmd_per_sample("sample"), 500))


def test_dm_term_runs_in_float32_under_bf16_autocast():
    """dm_precision=fp32 (the default): the DM term's passes ignore the run's bf16 autocast and convert
    to x0 in float64, so the gradient is the one computed without autocast, bit for bit; "autocast"
    computes it in bf16, visibly different near t = T."""
    teacher = resolve_teacher("tiny:unet")
    method = build_method({"name": "dmd2", "guidance": 1.75}, teacher, TrainConfig())
    with torch.no_grad():  # a critic that differs from the teacher, as a trained one does
        for p in method.nets["critic"].parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, *teacher.latent_shape, generator=g), torch.randn(2, *teacher.latent_shape, generator=g)
    t, cond, uncond = torch.tensor([980.0, 980.0]), encode_prompts(teacher.pipe, ["a cat", "a dog"]), encode_prompts(teacher.pipe, ["", ""])
    args = (method.engine, x, t, eps, cond, uncond, 1.75)
    reference, _ = distribution_matching_grad(*args, precision="fp32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, _ = distribution_matching_grad(*args, precision="fp32")
        rounded, _ = distribution_matching_grad(*args, precision="autocast")
    assert torch.equal(full, reference)
    assert (rounded - reference).norm() > 1e-3 * reference.norm()
    with pytest.raises(ValueError, match="dm_precision"):
        distribution_matching_grad(*args, precision="fp16")

"""The diffusion-GAN head as the project trains it: with known real and generated densities, its logit must
estimate log p_t / q_t (the logistic loss's optimum), not log q_t / p_t. (tests/test_fdistill.py checks that
f-distill's weights read their density ratio from it.)"""

import torch
from known_densities import M_Q, S_Q, log_ratio, sample_p, slope_and_correlation, teacher_of_p, train_critic_phase, use_fixed_generator

from diffdistill.config import TrainConfig
from diffdistill.methods import build_method


def noised_mixture(schedule, n: int = 2000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n points of p and n of q, noised at t ~ U{100..200} (the critic range the head was trained on)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([sample_p(n, seed), (M_Q + S_Q * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()])
    t = 100 + (torch.rand(2 * n, generator=g) * 101).floor()
    alpha, sigma = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    return alpha * x + sigma * torch.randn(x.shape, generator=g), t


def test_dmd2_gan_logit_estimates_the_log_density_ratio_of_real_to_generated():
    teacher = teacher_of_p()
    spec = {"name": "dmd2", "guidance": 1.0, "gan_weight": 1e-3, "gan_critic_weight": 1.0, "critic_t_range": [0.1, 0.2], "critic_loss": "x0"}
    method = build_method(spec, teacher, TrainConfig(teacher="exact:p", out="unused"))
    use_fixed_generator(method)
    train_critic_phase(method)
    n = 2000
    x_t, t = noised_mixture(teacher.schedule, n)
    with torch.no_grad():
        logits = method.engine.gan_logits(x_t, t, {})
    exact = log_ratio(x_t, t, teacher.schedule)
    slope, correlation = slope_and_correlation(logits, exact)
    # measured: slope 0.91, correlation 0.97 (the head saturates in q's far tail, where log p/q reaches -16);
    # a logit of the other sign scores -0.91 and -0.97
    assert correlation > 0.9 and 0.7 < slope < 1.3, (slope, correlation)
    assert logits[:n].mean() > 0.5 and logits[n:].mean() < -0.5  # real above zero, generated below

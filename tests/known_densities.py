"""Real data p = N(M_P, S_P^2 I) and a fixed generator whose samples are q = N(M_Q, S_Q^2 I), in 2-D, for checks of
what a GAN discriminator learns (not a test file). Both stay Gaussian under x_t = alpha_t x + sigma_t eps, so
log p_t(x) / q_t(x) is known in closed form at every noise level.
"""

import torch
from torch import nn

from diffdistill.backbones.loading import Teacher
from diffdistill.denoiser import Denoiser
from diffdistill.randomness import BatchRandom
from diffdistill.toy import ExactDenoiserNet, GaussianMixture, MLPDenoiserNet, ring8, toy_teacher

M_P, S_P = torch.tensor([0.8, 0.0], dtype=torch.float64), 0.5
M_Q, S_Q = torch.tensor([-0.4, 0.3], dtype=torch.float64), 0.8


class FixedGaussianGenerator(nn.Module):
    """x = M_Q + S_Q z: a generator whose law q is known and does not move."""

    backbone_kind = "plain"

    def forward(self, z, timestep, cond):
        return (M_Q + S_Q * z.double()).to(z.dtype)


def teacher_of_p() -> Teacher:
    """The exact teacher of p with small MLP student and critic (the critic's features feed the GAN head)."""
    schedule = toy_teacher(ring8()).schedule
    return Teacher(None, ExactDenoiserNet(GaussianMixture(M_P[None], S_P), schedule), "exact", "plain", schedule, "sample", "exact:p",
                   make_student=lambda: MLPDenoiserNet(schedule, 2, 32, 2), make_critic=lambda: MLPDenoiserNet(schedule, 2, 64, 2),
                   data_shape=(2,))


def use_fixed_generator(method) -> None:
    method.nets["generator"] = Denoiser(FixedGaussianGenerator(), method.schedule, "sample")


def sample_p(n: int, seed: int) -> torch.Tensor:
    return (M_P + S_P * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).float()


def log_ratio(x_t: torch.Tensor, t: torch.Tensor, schedule) -> torch.Tensor:
    """log p_t(x_t) - log q_t(x_t) for N(alpha M, (alpha^2 S^2 + sigma^2) I), per sample."""
    alpha, sigma = schedule.alpha(t, torch.float64)[:, None], schedule.sigma(t, torch.float64)[:, None]

    def log_density(mean, std):
        var = alpha**2 * std**2 + sigma**2
        return (-(x_t.double() - alpha * mean).square() / (2 * var) - 0.5 * torch.log(2 * torch.pi * var)).sum(1)

    return log_density(M_P, S_P) - log_density(M_Q, S_Q)


def train_critic_phase(method, steps: int = 150, n: int = 128, lr: float = 5e-3) -> None:
    """Adam on the method's own critic loss (fake score + discriminator), real images from p."""
    params = [p for name in method.phase_nets("critic") for p in method.nets[name].parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        batch = {"prompts": [""] * n, "cond": {}, "uncond": {}, "rng": BatchRandom(step), "step": step, "x0": sample_p(n, 10_000 + step)}
        loss, _ = method.critic_loss(batch)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()


def slope_and_correlation(estimate: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """Least-squares slope of ``estimate`` on ``exact`` and their correlation."""
    estimate, exact = estimate.double() - estimate.double().mean(), exact.double() - exact.double().mean()
    return float((estimate * exact).sum() / exact.square().sum()), float(torch.corrcoef(torch.stack([estimate, exact]))[0, 1])

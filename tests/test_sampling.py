"""``ddim_sample`` against diffusers' DDIM and against the exact probability-flow ODE of Gaussian data.

For data N(MU, S^2 I) and x_t = alpha_t x0 + sigma_t eps, the ODE keeps u = (x_t - alpha_t MU) / sqrt(alpha_t^2 S^2 + sigma_t^2)
constant, so the exact trajectory from x_T is known at every t; the exact denoiser is Tweedie's
E[x0 | x_t] = MU + alpha_t S^2 (x_t - alpha_t MU) / (alpha_t^2 S^2 + sigma_t^2).
"""

import torch
from diffusers import DDIMScheduler

from diffdistill.denoiser import Denoiser
from diffdistill.sampling import ddim_sample
from diffdistill.schedules import VPSchedule
from diffdistill.toy import SD15_SCHEDULE, ExactDenoiserNet, GaussianMixture, ring8

SCHEDULE = VPSchedule.from_scheduler_config(SD15_SCHEDULE)
MU, S = torch.tensor([[1.5, -0.5]], dtype=torch.float64), 0.7


def exact_denoiser(mixture: GaussianMixture) -> Denoiser:
    return Denoiser(ExactDenoiserNet(mixture, SCHEDULE), SCHEDULE, "sample")


def noise(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


def test_ddim_sample_is_diffusers_ddim():
    """Four trailing steps on ring8's (nonlinear) exact denoiser, against DDIMScheduler.step with eta = 0 and the
    same alphas; with set_alpha_to_one its last step returns the x0 prediction, as ddim_sample's does."""
    denoiser, x_T = exact_denoiser(ring8()), noise()
    ours = ddim_sample(denoiser, x_T, SCHEDULE.sampling_timesteps(4), {})
    scheduler = DDIMScheduler(**SD15_SCHEDULE, prediction_type="sample", clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == SCHEDULE.sampling_timesteps(4)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x0 = denoiser(x, torch.full((len(x),), float(t)), {})
        x = scheduler.step(x0, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def exact_x0_at(t_value: float, x_T: torch.Tensor) -> torch.Tensor:
    """Tweedie's x0 at time t of the exact ODE trajectory that starts at x_T at t = 999."""
    alpha_T, sigma_T = (c(torch.tensor([999.0]), torch.float64).item() for c in (SCHEDULE.alpha, SCHEDULE.sigma))
    alpha, sigma = (c(torch.tensor([t_value]), torch.float64).item() for c in (SCHEDULE.alpha, SCHEDULE.sigma))
    u = (x_T.double() - alpha_T * MU) / (alpha_T**2 * S**2 + sigma_T**2) ** 0.5
    x_t = alpha * MU + (alpha**2 * S**2 + sigma**2) ** 0.5 * u
    return MU + alpha * S**2 * (x_t - alpha * MU) / (alpha**2 * S**2 + sigma**2)


def test_ddim_sample_converges_to_the_exact_ode_solution():
    """DDIM is Euler's method in (x / alpha, sigma / alpha): its error against the exact trajectory (read as the
    x0 prediction at its last timestep) shrinks about 1.7x per doubling of steps here (0.059 at 50, 0.034 at 100).
    A sampler that follows another ODE, or none, stays put."""
    denoiser, x_T = exact_denoiser(GaussianMixture(MU, S)), noise()
    errors = []
    for steps in (50, 100):
        timesteps = SCHEDULE.sampling_timesteps(steps)
        errors.append((ddim_sample(denoiser, x_T, timesteps, {}).double() - exact_x0_at(timesteps[-1], x_T)).abs().max().item())
    assert errors[1] < 0.04 and errors[1] < 0.65 * errors[0], errors

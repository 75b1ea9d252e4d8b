"""1-D Gaussians with exact scores, for closed-form checks of generator gradients (not a test file).

Data p = N(MU, TAU^2); generator x = a z + b, so q = N(b, a^2). At noise level t, under
x_t = alpha x + sigma eps, both stay Gaussian: q_t = N(alpha b, alpha^2 a^2 + sigma^2) and
p_t = N(alpha MU, alpha^2 TAU^2 + sigma^2). The teacher and the fake score are the exact Tweedie
denoisers of p and of the current q: the teacher through the project's mixture code, the fake score
written out here from the generator's own parameters, read at each call without gradient (a frozen
function of x_t), so that D_f = D_r at the target is something two computations agree on.
"""

import torch
from torch import nn

from diffdistill.backbones.loading import Teacher
from diffdistill.denoiser import Denoiser
from diffdistill.randomness import BatchRandom
from diffdistill.schedules import VPSchedule
from diffdistill.scores import ScoreEngine
from diffdistill.toy import SD15_SCHEDULE, ExactDenoiserNet, GaussianMixture

MU, TAU = 1.5, 0.7
SCHEDULE = VPSchedule.from_scheduler_config(SD15_SCHEDULE)


class Affine(nn.Module):
    backbone_kind = "plain"

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(a, dtype=torch.float64)), nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, z, timestep, cond):
        return self.a * z + self.b


class GeneratorTweedie(nn.Module):
    """E[x0 | x_t] under the generator's current law N(b, a^2): b + alpha a^2 (x_t - alpha b) / (alpha^2 a^2 + sigma^2)."""

    backbone_kind = "plain"

    def __init__(self, generator: Affine):
        super().__init__()
        self.generator = [generator]  # a reference, not a submodule: the fake score has no parameters of its own

    def forward(self, x_t, timestep, cond):
        a, b = (p.detach() for p in (self.generator[0].a, self.generator[0].b))
        alpha, sigma = SCHEDULE.alpha(timestep, torch.float64)[:, None], SCHEDULE.sigma(timestep, torch.float64)[:, None]
        return b + alpha * a**2 * (x_t - alpha * b) / (alpha**2 * a**2 + sigma**2)


def gaussian(mean: float, std: float) -> GaussianMixture:
    return GaussianMixture(torch.tensor([[mean]], dtype=torch.float64), std)


def exact_engine(a: float, b: float):
    """(generator Denoiser, ScoreEngine) with the exact teacher of N(MU, TAU^2) and the exact fake score of the generator's N(b, a^2)."""
    teacher = Teacher(None, ExactDenoiserNet(gaussian(MU, TAU), SCHEDULE), "exact", "plain", SCHEDULE, "sample", "exact", data_shape=(1,))
    generator = Denoiser(Affine(a, b), SCHEDULE, "sample")
    critic = Denoiser(GeneratorTweedie(generator.backbone), SCHEDULE, "sample")
    return generator, ScoreEngine(teacher, {"generator": generator, "critic": critic})


def coefficients(t_value: float) -> tuple[float, float]:
    t = torch.tensor([float(t_value)])
    return SCHEDULE.alpha(t, torch.float64).item(), SCHEDULE.sigma(t, torch.float64).item()


def mc_gradient(a: float, b: float, t_value: float, per_sample_loss, n: int = 400_000, seed: int = 0) -> torch.Tensor:
    """Monte-Carlo d/d(a, b) of E[per_sample_loss(engine, x, t, eps)] with x = a z + b (common random numbers)."""
    generator, engine = exact_engine(a, b)
    rng = BatchRandom(seed)
    z, eps = rng.randn((n, 1)).double(), rng.randn((n, 1)).double()
    x = generator(z, torch.zeros(n), {})
    loss = per_sample_loss(engine, x, torch.full((n,), float(t_value)), eps)
    assert loss.shape == (n,)
    loss.sum().backward()
    params = generator.backbone
    return torch.stack([params.a.grad, params.b.grad]) / n


def noised_laws(a, b, alpha: float, sigma: float):
    """(m_q, v_q, m_p, v_p) of q_t and p_t; a, b may be tensors with grad."""
    return alpha * b, alpha**2 * a**2 + sigma**2, alpha * MU, alpha**2 * TAU**2 + sigma**2


def log_normal_pdf(x, m, v):
    return -0.5 * (x - m) ** 2 / v - 0.5 * torch.log(2 * torch.pi * torch.as_tensor(v, dtype=torch.float64))


def expectation(fn, m, v, width: float = 14.0, points: int = 40001):
    """E_{x ~ N(m, v)}[fn(x)] by the trapezoid rule on m +- width sd; differentiable in m and v."""
    u = torch.linspace(-width, width, points, dtype=torch.float64)
    x = m + v.sqrt() * u
    density = torch.exp(-0.5 * u**2) / (2 * torch.pi) ** 0.5
    return torch.trapezoid(density * fn(x), u)


def grad_of(objective, a: float, b: float) -> torch.Tensor:
    """d/d(a, b) of objective(a, b), with a and b as float64 leaves."""
    a_, b_ = torch.tensor(a, dtype=torch.float64, requires_grad=True), torch.tensor(b, dtype=torch.float64, requires_grad=True)
    objective(a_, b_).backward()
    return torch.stack([a_.grad, b_.grad])


NEAR = (0.8 * TAU, MU + 0.2)  # off the target in both spread and mean


def gradient_at_and_near_the_target(per_sample_loss_at, t_value: float, n: int = 20_000) -> tuple[torch.Tensor, torch.Tensor]:
    """MC gradients at the target (a, b) = (TAU, MU) and at NEAR; ``per_sample_loss_at(a, b)`` gives the loss."""
    at = mc_gradient(TAU, MU, t_value, per_sample_loss_at(TAU, MU), n=n)
    return at, mc_gradient(*NEAR, t_value, per_sample_loss_at(*NEAR), n=n)


def assert_vanishes_only_at_the_target(at: torch.Tensor, near: torch.Tensor) -> None:
    """Near the target each component is clearly nonzero (a method blind to the fake score gives 0 there);
    at it, with the fake score computed apart from the teacher, only float32 rounding of D_r is left."""
    assert (near.abs() > 0.02).all(), near
    assert at.abs().max() < 1e-5 * near.abs().min(), (at, near)

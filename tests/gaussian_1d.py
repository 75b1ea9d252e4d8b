"""1-D Gaussians with exact scores, for closed-form checks of generator gradients (not a test file).

Data p = N(MU, TAU^2); generator x = a z + b, so q = N(b, a^2). At noise level t, under
x_t = alpha x + sigma eps, both stay Gaussian: q_t = N(alpha b, alpha^2 a^2 + sigma^2) and
p_t = N(alpha MU, alpha^2 TAU^2 + sigma^2). The teacher and the fake score are the exact Tweedie
denoisers of p and of the current q (the fake score as a frozen function: no parameters).
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


def gaussian(mean: float, std: float) -> GaussianMixture:
    return GaussianMixture(torch.tensor([[mean]], dtype=torch.float64), std)


def exact_engine(a: float, b: float):
    """(generator Denoiser, ScoreEngine) with the exact teacher of N(MU, TAU^2) and exact fake score of N(b, a^2)."""
    teacher = Teacher(None, ExactDenoiserNet(gaussian(MU, TAU), SCHEDULE), "exact", "plain", SCHEDULE, "sample", "exact", data_shape=(1,))
    generator = Denoiser(Affine(a, b), SCHEDULE, "sample")
    critic = Denoiser(ExactDenoiserNet(gaussian(b, abs(a)), SCHEDULE), SCHEDULE, "sample")
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

"""DMD's generator gradient against the closed-form gradient of the KL it descends (1-D Gaussians).

Data N(mu, tau^2), generator x = a z + b, so p_fake = N(b, a^2). At noise level t both noised
laws are Gaussian: q_t = N(alpha b, alpha^2 a^2 + sigma^2), p_t = N(alpha mu, alpha^2 tau^2 + sigma^2),
and the exact x0 estimates come from Tweedie. DMD's Eq. 7 says
    E[(alpha^2 / sigma^2) (D_fake - D_real)(x_t) dx/dtheta] = d/dtheta KL(q_t || p_t).
"""

import pytest
import torch
from torch import nn

from diffdistill.backbones.loading import Teacher
from diffdistill.conditioning import encode_prompts
from diffdistill.config import TrainConfig
from diffdistill.denoiser import Denoiser
from diffdistill.methods import build_method
from diffdistill.methods.dmd import distribution_matching_grad, surrogate_loss
from diffdistill.randomness import BatchRandom
from diffdistill.schedules import VPSchedule
from diffdistill.scores import ScoreEngine
from diffdistill.teachers import resolve_teacher
from diffdistill.toy import SD15_SCHEDULE, ExactDenoiserNet, GaussianMixture

MU, TAU = 1.5, 0.7


class Affine(nn.Module):
    backbone_kind = "plain"

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(a, dtype=torch.float64)), nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, z, timestep, cond):
        return self.a * z + self.b


def kl_gauss(m1, v1, m2, v2):
    return 0.5 * (torch.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)


def setup(a, b):
    schedule = VPSchedule.from_scheduler_config(SD15_SCHEDULE)
    gauss = lambda m, s: GaussianMixture(torch.tensor([[m]], dtype=torch.float64), s)
    teacher = Teacher(None, ExactDenoiserNet(gauss(MU, TAU), schedule), "exact", "plain", schedule, "sample", "exact", data_shape=(1,))
    generator = Denoiser(Affine(a, b), schedule, "sample")
    critic = Denoiser(ExactDenoiserNet(gauss(b, abs(a)), schedule), schedule, "sample")  # exact fake score
    return schedule, teacher, generator, ScoreEngine(teacher, {"generator": generator, "critic": critic})


def mc_gradient(a, b, t_value, normalize, n=400_000, seed=0):
    schedule, teacher, generator, engine = setup(a, b)
    rng = BatchRandom(seed)
    z = rng.randn((n, 1)).double()
    x = generator(z, torch.zeros(n), {})
    t = torch.full((n,), float(t_value))
    g, _ = distribution_matching_grad(engine, x, t, rng.randn((n, 1)).double(), {}, None, 1.0, normalize=normalize)
    loss = surrogate_loss(x, g).sum()  # d/dx = g per sample (one element each)
    loss.backward()
    alpha, sigma = schedule.alpha(t[:1], torch.float64).item(), schedule.sigma(t[:1], torch.float64).item()
    params = generator.backbone
    return torch.stack([params.a.grad, params.b.grad]) / n, alpha, sigma


def closed_form(a, b, alpha, sigma):
    a_, b_ = torch.tensor(a, dtype=torch.float64, requires_grad=True), torch.tensor(b, dtype=torch.float64, requires_grad=True)
    kl = kl_gauss(alpha * b_, alpha**2 * a_**2 + sigma**2, alpha * MU, alpha**2 * TAU**2 + sigma**2)
    kl.backward()
    return torch.stack([a_.grad, b_.grad])


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


def test_gradient_vanishes_at_the_target():
    grad, _, _ = mc_gradient(TAU, MU, 500, normalize="sample")
    assert grad.abs().max() < 1e-12


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

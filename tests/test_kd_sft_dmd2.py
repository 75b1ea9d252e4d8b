"""kd, sft and dmd2 at the method level: each loss against its definition, computed here by hand on tiny nets.

* kd: L = ||G(z, T) - ODE_teacher(z)||^2 on stored pairs, and the pairs are the teacher's ODE endpoints;
* sft: L = ||F(alpha x0 + sigma eps, t) - v||^2 with v = alpha eps - sigma x0 for a v-prediction backbone;
* dmd2: L_G = L_DM + lambda_G softplus(-l(x~)) and L_F = ||D_f(x_t) - x||^2 + lambda_D [softplus(l(x~_fake)) + softplus(-l(x~_real))].

Where a loss draws noise or times, the hand computation draws them from a BatchRandom of the same seed in the
order the method does (written out below), so a value that matches is the same formula on the same draws.
"""

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from diffdistill.backbones.loading import Teacher
from diffdistill.config import TrainConfig
from diffdistill.methods import build_method
from diffdistill.randomness import BatchRandom
from diffdistill.sampling import ddim_sample
from diffdistill.toy import SD15_SCHEDULE, ExactDenoiserNet, GaussianMixture, MLPDenoiserNet, ring8, toy_teacher

ABAR = DDPMScheduler(**SD15_SCHEDULE).alphas_cumprod.double()  # diffusers' table, not the project's schedule
MU, S = torch.tensor([[1.5, -0.5]], dtype=torch.float64), 0.7
TINY = {"generator_width": 32, "generator_depth": 2, "critic_width": 32, "critic_depth": 2}


def coefficients(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) as columns: sqrt(abar), sqrt(1 - abar), abar interpolated linearly between integer t."""
    abar = torch.from_numpy(np.interp(t.double().numpy(), np.arange(len(ABAR)), ABAR.numpy()))[:, None]
    return abar.sqrt(), (1 - abar).sqrt()


def batch(n: int, seed: int, x0: torch.Tensor | None = None) -> dict:
    out = {"prompts": [""] * n, "cond": {}, "uncond": {}, "rng": BatchRandom(seed), "step": 0}
    return out if x0 is None else {**out, "x0": x0}


# ---------------------------------------------------------------- kd


def exact_ode_x0(x_T: torch.Tensor, t_last: float) -> torch.Tensor:
    """Tweedie's x0 at t_last on the exact ODE trajectory of N(MU, S^2 I) data from x_T at t = 999."""
    (alpha_T,), (sigma_T,) = coefficients(torch.tensor([999.0]))
    (alpha,), (sigma,) = coefficients(torch.tensor([t_last]))
    u = (x_T.double() - alpha_T * MU) / (alpha_T**2 * S**2 + sigma_T**2).sqrt()
    x_t = alpha * MU + (alpha**2 * S**2 + sigma**2).sqrt() * u
    return MU + alpha * S**2 * (x_t - alpha * MU) / (alpha**2 * S**2 + sigma**2)


def gaussian_teacher() -> Teacher:
    """The exact teacher of N(MU, S^2 I) with a small MLP student."""
    schedule = toy_teacher(ring8()).schedule
    return Teacher(None, ExactDenoiserNet(GaussianMixture(MU, S), schedule), "exact", "plain", schedule, "sample", "exact:gauss",
                   make_student=lambda: MLPDenoiserNet(schedule, 2, 32, 2), data_shape=(2,))


def test_kd_regresses_the_student_on_the_teacher_ode_endpoint_of_its_own_noise():
    teacher = gaussian_teacher()
    method = build_method({"name": "kd", "pairs": 3, "ode_steps": 100}, teacher, TrainConfig(teacher="exact:gauss", out="unused"))
    pairs, timesteps = method.pairs, teacher.schedule.sampling_timesteps(100)
    # the targets are the teacher's DDIM ODE run from each pair's own noise, and so near the exact ODE's endpoint
    # (DDIM's error at 100 steps is 0.034 here; a pair's noise taken from another pair is off by O(1))
    torch.testing.assert_close(pairs.target, ddim_sample(teacher.denoiser(), pairs.noise, timesteps, {}))
    assert (pairs.target.double() - exact_ode_x0(pairs.noise, timesteps[-1])).abs().max() < 0.05
    # each sample's loss is ||G(z_j, 999) - y_j||^2 (mean over coordinates) for one pair j, never a mixed pair
    generator = method.nets["generator"]
    out = generator(pairs.noise, torch.full((3,), 999.0), {})
    crossed = (out[:, None] - pairs.target[None]).square().mean(-1)  # [j, k]: student on noise j against target k
    per_pair, mixed = crossed.diagonal(), crossed.detach()[~torch.eye(3, dtype=torch.bool)]
    assert (per_pair.detach()[:, None] - mixed[None]).abs().min() > 1e-5  # so a value names its pair, or a mixed one
    loss, logs = method.generator_loss(batch(32, seed=0))
    which = (loss[:, None] - per_pair.detach()[None]).abs().argmin(1)
    torch.testing.assert_close(loss, per_pair[which])
    assert set(which.tolist()) == {0, 1, 2}
    assert abs(logs["loss_reg"] - loss.mean().item()) < 1e-6
    # the gradient is the hand loss's, and reaches the student
    expected = torch.autograd.grad(per_pair[which].mean(), list(generator.parameters()))
    loss.mean().backward()
    for p, e in zip(generator.parameters(), expected):
        torch.testing.assert_close(p.grad, e)


# ---------------------------------------------------------------- sft


class RecordingNet(nn.Module):
    """A tiny plain backbone that keeps what it was called with (x_t and the model timestep)."""

    backbone_kind = "plain"

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 2))

    def forward(self, x, timestep, cond):
        self.seen = (x.detach().clone(), timestep.detach().clone())
        return self.net(torch.cat([x, timestep[:, None] / 1000], 1))


def test_sft_is_the_denoising_loss_in_the_backbones_prediction_type():
    """A v-prediction backbone: the target is v = alpha eps - sigma x0 at x_t = alpha x0 + sigma eps, eps ~ N(0, I)
    independent of x0, t ~ U[0, 999]; eps is read back from the x_t the backbone saw."""
    n, schedule = 4096, toy_teacher(ring8()).schedule
    teacher = Teacher(None, RecordingNet(), "exact", "plain", schedule, "v_prediction", "tiny", data_shape=(2,))
    method = build_method({"name": "sft"}, teacher, TrainConfig(teacher="tiny", out="unused"))
    x0 = ring8().sample(n, torch.Generator().manual_seed(0)).double()
    loss, _ = method.generator_loss(batch(n, seed=1, x0=x0.float()))
    student = method.nets["generator"].backbone
    x_t, t = (v.double() for v in student.seen)
    alpha, sigma = coefficients(t)
    eps = (x_t - alpha * x0) / sigma
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05 and abs(np.corrcoef(eps[:, 0], x0[:, 0])[0, 1]) < 0.05
    assert t.min() < 5 and t.max() > 994 and abs(t.median() - 499.5) < 25
    v = alpha * eps - sigma * x0
    with torch.no_grad():
        prediction = student.net(torch.cat([x_t, t[:, None] / 1000], 1).float()).double()
    torch.testing.assert_close(loss.double(), (prediction - v).square().mean(1), rtol=1e-4, atol=1e-6)
    loss.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.backbone.parameters())


# ---------------------------------------------------------------- dmd2


def dmd2(gan_weight: float = 0.3, gan_critic_weight: float = 0.7):
    teacher = toy_teacher(ring8(), **TINY)
    method = build_method({"name": "dmd2", "guidance": 1.0, "gan_weight": gan_weight, "gan_critic_weight": gan_critic_weight},
                          teacher, TrainConfig(teacher="exact:ring8", out="unused"))
    return teacher, method


def noised(x: torch.Tensor, rng: BatchRandom, t_hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t ~ U{0..t_hi} (DMD2's integer ranges), then alpha_t x + sigma_t eps: one rand, one randn, in that order."""
    t = (rng.rand((len(x),)) * (t_hi + 1)).floor().clamp(max=t_hi)
    alpha, sigma = coefficients(t)
    return alpha * x.double() + sigma * rng.randn_like(x).double(), t


def test_dmd2_generator_loss_is_the_dm_term_plus_gan_weight_times_the_generators_gan_loss():
    n, (teacher, method) = 16, dmd2()
    generator, critic, logits_of = method.nets["generator"], method.nets["critic"], method.engine.gan_logits
    loss, logs = method.generator_loss(batch(n, seed=3))
    # by hand, the draws in order: z; t ~ U{20..980}; eps; t~ ~ U{0..999}; eps~
    rng = BatchRandom(3)
    x = generator(rng.randn((n, 2)), torch.full((n,), 999.0), {})
    t = 20 + (rng.rand((n,)) * 961).floor()
    alpha, sigma = coefficients(t)
    x_t = alpha * x.detach().double() + sigma * rng.randn((n, 2)).double()
    with torch.no_grad():
        d_real, d_fake = teacher.denoiser()(x_t, t, {}).double(), critic(x_t, t, {}).double()
    g = (d_fake - d_real) / (x.detach().double() - d_real).abs().mean(1, keepdim=True)  # DMD2's per-sample normalization
    dm = 0.5 * (x - (x - g).detach()).square().mean(1)                                  # gradient g / numel, value 0.5 mean g^2
    x_tilde, t_tilde = noised(x, rng, 999)
    gan = F.softplus(-logits_of(x_tilde.float(), t_tilde, {}))
    torch.testing.assert_close(loss.double(), dm + 0.3 * gan.double(), rtol=1e-5, atol=1e-7)
    assert abs(logs["loss_gan_g"] - gan.mean().item()) < 1e-5
    # the generator's gradient is that of the hand loss; the DM term sends none to the critic (only the GAN term does)
    generator_grads = torch.autograd.grad((dm + 0.3 * gan).mean(), list(generator.parameters()), retain_graph=True)
    critic_grads = torch.autograd.grad(0.3 * gan.mean(), list(critic.parameters()), allow_unused=True)  # the head reads no output layer
    loss.mean().backward()
    for p, e in zip([*generator.parameters(), *critic.parameters()], [*generator_grads, *critic_grads]):
        assert (p.grad is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(p.grad, e.to(p.grad.dtype), rtol=1e-4, atol=1e-7)


def test_dmd2_critic_loss_is_the_fake_score_loss_plus_the_discriminator_loss():
    n, (_, method) = 16, dmd2()
    generator, critic, head, logits_of = method.nets["generator"], method.nets["critic"], method.nets["gan_head"], method.engine.gan_logits
    real = ring8().sample(n, torch.Generator().manual_seed(4))
    loss, logs = method.critic_loss(batch(n, seed=5, x0=real))
    # by hand, the draws in order: z; (t, eps) of the fake-score loss; (t~, eps~) of the fake, then of the real images
    rng = BatchRandom(5)
    with torch.no_grad():
        x = generator(rng.randn((n, 2)), torch.full((n,), 999.0), {})
    x_t, t = noised(x, rng, 999)
    fake_score = (critic(x_t.float(), t, {}) - x).square().mean(1)  # the toy predicts x0, so "native" is x0-MSE
    (fake_tilde, t_fake), (real_tilde, t_real) = noised(x, rng, 999), noised(real, rng, 999)
    disc = F.softplus(logits_of(fake_tilde.float(), t_fake, {})) + F.softplus(-logits_of(real_tilde.float(), t_real, {}))
    torch.testing.assert_close(loss, fake_score + 0.7 * disc, rtol=1e-5, atol=1e-6)
    assert abs(logs["loss_fake"] - fake_score.mean().item()) < 1e-5 and abs(logs["loss_gan_d"] - disc.mean().item()) < 1e-5
    loss.mean().backward()
    assert all(p.grad is None for p in generator.parameters())  # the critic phase trains on detached samples
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [*critic.parameters(), *head.parameters()])

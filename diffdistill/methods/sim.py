"""SIM: Score Implicit Matching (Luo et al., NeurIPS 2024, "One-Step Diffusion Distillation through
Score Implicit Matching").

SIM minimizes a general score divergence  integral w(t) E_{x_t ~ pi_t} d(s_p(x_t) - s_q_theta(x_t)) dt
with the sampling law held fixed, pi_t = sg(q_theta,t). Its gradient is that of a tractable loss
(the score-implicit-matching identity, Tweedie's score identity in the SiD paper):

    L = d'(y)^T [ s_q,sg(x_t) - grad log q(x_t | x0) ],     y = s_p(x_t) - s_q,sg(x_t),

with the gradient flowing through **every** x_t input (the teacher, the fake score and d') but
never into the fake score's weights. In x0 form (s_p - s_q = alpha (D_r - D_f) / sigma^2,
s_q - grad log q(x_t|x0) = alpha (D_f - x) / sigma^2) and with SIM's pseudo-Huber distance
d(y) = sqrt(|y|^2 + c^2) - c taken on y = D_r - D_f (the x0 difference; a score-space c maps to
c sigma^2 / alpha), the per-sample loss is

    L = [ (D_r - D_f) / sqrt(||D_r - D_f||^2 + c~^2) ]^T (D_f - x),    c~ = c sqrt(numel),

i.e. the weight w(t) = sigma^2 / alpha in score units. tests/test_sim.py checks that its expected
gradient is grad_theta E_{x_t ~ sg(q_t)} d(D_r - D_f) in closed form (sign plus). With d = |.|^2
this is SiD's loss at alpha = 1; as c grows, c~ L tends to it.
**Not verified** (the paper's equations were not retrieved; see METHODS.md Sec. 6): c, w(t), the
t range, guidance and learning rates. The generator takes noise at t = t_max as DMD2's does; the
fake score trains by denoising score matching. ``gan_weight`` > 0 adds DMD2's GAN term on real images
(:class:`~diffdistill.methods.adversarial.GANTerm`), which the paper does not have.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffdistill.generator import backward_simulation, check_timesteps, sample_student, student_denoiser
from diffdistill.guidance import guidance_from_options
from diffdistill.methods.adversarial import GANTerm, drop_nonfinite
from diffdistill.methods.base import register_method
from diffdistill.methods.dmd import default_range
from diffdistill.schedules import add_noise
from diffdistill.scores import ScoreEngine, critic_phase_loss, make_critic


def pseudo_huber_grad(y: torch.Tensor, c: float) -> torch.Tensor:
    """d'(y) = y / sqrt(||y||^2 + c^2) of d(y) = sqrt(||y||^2 + c^2) - c, the norm over each sample."""
    norm2 = y.flatten(1).square().sum(1)
    return y / (norm2 + c**2).sqrt().view(-1, *([1] * (y.ndim - 1)))


def sim_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, huber_c: float) -> torch.Tensor:
    """Per-sample d'(D_r - D_f)^T (D_f - x) with c~ = huber_c sqrt(numel); D_r, D_f keep their graph to x_t."""
    c = huber_c * x[0].numel() ** 0.5
    return (pseudo_huber_grad(x0_real - x0_fake, c) * (x0_fake - x)).flatten(1).sum(1)


def sim_generator_loss(engine: ScoreEngine, x, t, eps, cond, uncond, w_real, w_fake, huber_c: float):
    """x_t = alpha_t x + sigma_t eps; D_r^{w_real}, D_f^{w_fake} with gradient through x_t; :func:`sim_loss`.

    Returns the per-sample loss with non-finite samples dropped (as for SiD), and how many were dropped.
    """
    if x.requires_grad:
        x.register_hook(torch.nan_to_num)
    x_t = add_noise(engine.teacher_denoiser.schedule, x, eps, t)
    x0_real = engine.real(x_t, t, cond, uncond, w_real, grad=True)
    x0_fake = engine.fake(x_t, t, cond, uncond, w_fake, grad=True)
    finite = torch.stack([v.detach().flatten(1).isfinite().all(1) for v in (x, x0_real, x0_fake)]).all(0)
    keep = finite.view(-1, *([1] * (x.ndim - 1)))
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    x, x0_real, x0_fake = (torch.where(keep, v, zero) for v in (x, x0_real, x0_fake))
    return torch.where(finite, sim_loss(x, x0_real, x0_fake, huber_c), zero), int((~finite).sum())


@dataclass
class SIMOptions:
    huber_c: float = 0.1                   # pseudo-Huber c per element of D_r - D_f (c~ = c sqrt(numel)); not verified
    guidance_style: str = "cfg"            # cfg | fake_cfg | random | lsg | zero_cfg | anti_cfg (diffdistill.guidance)
    guidance: float = 1.0                  # teacher w
    fake_guidance: float = 1.0             # fake-score w in the generator loss
    fake_train_guidance: float = 1.0       # fake-score w while training it
    guidance_range: list[float] | None = None        # random: per-sample teacher w ~ U[lo, hi]
    fake_guidance_range: list[float] | None = None   # random: per-sample fake w ~ U[lo, hi]
    timesteps: list[float] | None = None   # generator timesteps; None: one step from the schedule's end
    dm_t_range: list[float] = field(default_factory=lambda: [0.02, 0.98])      # loss t, 1000ths of the schedule
    critic_t_range: list[float] = field(default_factory=lambda: [0.0, 0.999])  # fake-score t
    critic_loss: str = "native"            # native (eps-MSE for SD) | x0
    critic_lora_rank: int = 0              # 0: full copy of the teacher as the fake score
    student_lora_rank: int = 0             # >0: the student is LoRA adapters on the teacher's frozen weights
    ratio: int = 1                         # fake-score updates per generator update
    gan_weight: float = 0.0                # DMD2's GAN term on real images (not in the SIM paper); 0: data-free SIM
    gan_critic_weight: float = 1e-2        # weight of the discriminator loss added to the fake score's
    gan_features: str = "critic"           # critic (the fake score's encoder) | teacher


class SIM:
    phases = ("generator", "critic")

    def __init__(self, options: SIMOptions, teacher):
        if options.ratio < 1:
            raise ValueError(f"method.ratio={options.ratio}: need at least one fake-score update per generator update")
        if options.huber_c <= 0:
            raise ValueError(f"method.huber_c={options.huber_c}: the pseudo-Huber c must be positive")
        self.options, self.teacher, self.schedule = options, teacher, teacher.schedule
        self.guidance = guidance_from_options(options)
        self.timesteps = check_timesteps(self.schedule, options.timesteps or [self.schedule.t_max])
        self.default_sample_steps = len(self.timesteps)
        self.nets = {"generator": student_denoiser(teacher, options.student_lora_rank), "critic": make_critic(teacher, options.critic_lora_rank)}
        self.gan = GANTerm(options, teacher, self.nets, "SIM")
        self.engine = ScoreEngine(teacher, self.nets, gan_name=self.gan.head, gan_features=options.gan_features)
        self.loss_times = default_range(self.schedule, *options.dm_t_range)
        self.critic_times = default_range(self.schedule, *options.critic_t_range)

    def phase(self, step: int) -> str:
        return "generator" if step % (self.options.ratio + 1) == self.options.ratio else "critic"

    def phase_nets(self, phase: str) -> list[str]:
        return ["generator"] if phase == "generator" else ["critic", *self.gan.nets]

    def _student(self, batch, n):
        return backward_simulation(self.nets["generator"], self.schedule, self.timesteps, batch["cond"], batch["rng"], (n, *self.teacher.latent_shape))

    def generator_loss(self, batch):
        rng, n = batch["rng"], len(batch["prompts"])
        x = self._student(batch, n)
        t = self.loss_times(self.schedule, n, rng).to(x.device)
        w_real, w_fake = self.guidance.draw(n, rng)
        loss, dropped = sim_generator_loss(self.engine, x, t, rng.randn_like(x), batch["cond"], batch["uncond"], w_real, w_fake, self.options.huber_c)
        logs = {"loss_sim": loss.mean().item(), "nan_dropped": float(dropped)}
        return self.gan.generator_term(loss, logs, self.engine, self.critic_times, x, batch), logs

    def critic_loss(self, batch):
        with torch.no_grad():
            x = self._student(batch, len(batch["prompts"]))
        loss = critic_phase_loss(self.nets["critic"], self.teacher, self.critic_times, x, batch, self.options.critic_loss, self.guidance.fake_train)
        loss, dropped = drop_nonfinite(loss)
        logs = {"loss_fake": loss.mean().item(), "nan_dropped": float(dropped)}
        return self.gan.discriminator_term(loss, logs, self.engine, self.critic_times, x, batch), logs

    def sample(self, noise, cond, uncond, steps, guidance, generator=None):
        return sample_student(self.nets["generator"], self.schedule, self.timesteps, noise, cond, generator)


@register_method("sim", SIMOptions)
def build_sim(options: SIMOptions, teacher, train_cfg, prompts) -> SIM:
    return SIM(options, teacher)

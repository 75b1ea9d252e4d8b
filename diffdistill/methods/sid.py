"""SiD: Score identity Distillation (Zhou et al., ICML 2024), with SiD-LSG guidance and SiDA's GAN term.

SiD minimizes a model-based Fisher divergence between the teacher's and the generator's noised
distributions, E_{x_t ~ q_t} ||s_p(x_t) - s_q(x_t)||^2, using Tweedie's score identity to replace
the intractable s_q where it is differentiated. In x0 form (official ``training/sid_loss.py`` and
the SiD-LSG training loop), with x = G(z), x_t = alpha_t x + sigma_t eps, and both denoisers
evaluated **with gradient through x_t** (never into the teacher's weights; only the generator is
stepped in this phase):

    w   = sg(mean_CHW |x - D_r(x_t)|).clamp(min=1e-5)
    l   = sum_CHW (D_r - D_f) * [(D_r - x) - alpha (D_r - D_f)] / w
        = sum_CHW (D_r - D_f) * (D_f - x) / w  +  (1 - alpha) ||D_r - D_f||^2 / w

alpha = 1.2 in the paper (SiD-LSG's SD1.5 script: 1.0). With w = 1 and exact scores, c = sigma_t^4 / alpha_t^2
and F = E_{q_t} ||s_p - s_q||^2, the expected gradient is (tests/test_sid.py, in closed form)

    c/2 (grad F - grad_path F) + (1 - alpha) c grad_path F

where grad_path F moves x_t with both scores frozen. So alpha = 1/2 descends the Fisher divergence
exactly; alpha = 1 gives the gradient of E_{x_t ~ sg(q_t)} ||s_p - s_q_theta||^2, the sampling law
held fixed (SIM's form with d = ||.||^2), whose part through the explicit -x alone is the DMD
direction D_f - D_r; alpha = 1.2 is the paper's empirical choice (on the 2-D toy it diverged: its
(1 - alpha) path term rewards disagreement along x_t; alpha = 1 learned, see toy.METHOD_DEFAULTS).

Samples with a non-finite D_r, D_f or x are dropped (loss 0) and the gradient reaching x goes
through ``nan_to_num``, as the official code filters and cleans. Data-free: real images are only
read by the optional SiDA term (Zhou et al., ICLR 2025), a DMD2-style diffusion GAN here: SiDA's own
discriminator reads the fake score's encoder with no new parameters and its weights were not
retrieved, so this term is not verified against it.

Noise levels: SiD's r ~ U(0, 0.8), sigma = (sigma_max^(1/7) + (1 - r)(sigma_min^(1/7) - sigma_max^(1/7)))^7
with (0.002, 80), mapped to our schedule's t at the same sigma/alpha; or U over a range of t
(SiD-LSG for SD: U{20 .. 979}). The generator's input is sigma_{t_init} z at t_init (SiD-LSG:
t_init = 625, x_init = sigma_625 z in EDM units, i.e. sigma_t z in VP units), not bare z. The fake
score trains by denoising score matching, one update before each generator update."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffdistill.generator import check_timesteps, generate, sample_student, student_denoiser
from diffdistill.guidance import guidance_from_options
from diffdistill.methods.adversarial import GANTerm, drop_nonfinite
from diffdistill.methods.base import register_method
from diffdistill.methods.dmd import default_range
from diffdistill.schedules import add_noise
from diffdistill.scores import ScoreEngine, critic_phase_loss, make_critic


@dataclass
class SiDTimesteps:
    """SiD's noise levels: EDM's Karras spacing (rho = 7) read at 1 - r, r ~ U(0, t_max), as sigma/alpha."""

    t_max: float = 0.8             # SiD's tmax / 1000: sigma in [0.002, 24.4]
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __call__(self, schedule, n: int, rng) -> torch.Tensor:
        r = rng.rand((n,)).double() * self.t_max
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        sigma = (hi + (1 - r) * (lo - hi)) ** self.rho
        return schedule.t_from_snr_ratio(sigma).float()


def sid_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, alpha: float, normalize: bool = True) -> torch.Tensor:
    """Per-sample SiD generator loss sum_CHW (D_r - D_f)[(D_r - x) - alpha (D_r - D_f)] / w.

    ``x0_real`` and ``x0_fake`` must carry their graph to x_t (and x_t to x); ``normalize=False`` sets w = 1.
    """
    diff = x0_real - x0_fake
    loss = (diff * ((x0_real - x) - alpha * diff)).flatten(1).sum(1)
    if normalize:
        loss = loss / (x - x0_real).detach().abs().flatten(1).mean(1).clamp_min(1e-5)
    return loss


def sid_generator_loss(engine: ScoreEngine, x, t, eps, cond, uncond, w_real, w_fake, alpha: float, normalize: bool = True):
    """x_t = alpha_t x + sigma_t eps; D_r^{w_real}, D_f^{w_fake} with gradient through x_t; :func:`sid_loss`.

    Returns the per-sample loss with non-finite samples dropped, and how many were dropped.
    """
    if x.requires_grad:
        x.register_hook(torch.nan_to_num)  # a dropped sample's NaN must not reach the generator's weights
    x_t = add_noise(engine.teacher_denoiser.schedule, x, eps, t)
    x0_real = engine.real(x_t, t, cond, uncond, w_real, grad=True)
    x0_fake = engine.fake(x_t, t, cond, uncond, w_fake, grad=True)
    finite = torch.stack([v.detach().flatten(1).isfinite().all(1) for v in (x, x0_real, x0_fake)]).all(0)
    keep = finite.view(-1, *([1] * (x.ndim - 1)))
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    x, x0_real, x0_fake = (torch.where(keep, v, zero) for v in (x, x0_real, x0_fake))
    loss = torch.where(finite, sid_loss(x, x0_real, x0_fake, alpha, normalize), zero)
    return loss, int((~finite).sum())


def student_with_scaled_input(generator, schedule, timesteps, cond, rng, shape, input_scale: float) -> torch.Tensor:
    """DMD2's backward simulation (k ~ U{0..K-1} no-grad steps, then one with gradient) from input_scale * z."""
    k = rng.shared_randint(0, len(timesteps)) if len(timesteps) > 1 else 0
    noise = rng.randn(shape) * input_scale
    return generate(generator, schedule, timesteps, noise, cond, rng, steps_with_grad_from=k, num_steps=k + 1)


@dataclass
class SiDOptions:
    alpha: float = 1.2                     # SiD's alpha (1.2 in the paper; SiD-LSG SD1.5: 1.0)
    guidance_style: str = "cfg"            # cfg | fake_cfg | random | lsg | zero_cfg | anti_cfg (diffdistill.guidance)
    guidance: float = 1.0                  # teacher w (SiD-LSG kappa_4)
    fake_guidance: float = 1.0             # fake-score w in the generator loss (kappa_2 = kappa_3)
    fake_train_guidance: float = 1.0       # fake-score w while training it (kappa_1)
    guidance_range: list[float] | None = None        # random: per-sample teacher w ~ U[lo, hi]
    fake_guidance_range: list[float] | None = None   # random: per-sample fake w ~ U[lo, hi]
    timesteps: list[float] | None = None   # generator timesteps; None: one step from the schedule's end
    scale_input: bool = True               # feed sigma_{t_0} z (SiD-LSG's x_init), not z
    t_sampler: str = "sid"                 # sid (SiD's sigma schedule) | uniform (over dm_t_range)
    sid_t_max: float = 0.8                 # SiD's tmax / 1000, for t_sampler=sid
    # SiD-LSG's torch.randint(20, 980) excludes its high end: U{20..979}, i.e. 0.979 here (our upper end is inclusive)
    dm_t_range: list[float] = field(default_factory=lambda: [0.02, 0.979])     # t_sampler=uniform, 1000ths of the schedule
    critic_t_range: list[float] = field(default_factory=lambda: [0.02, 0.979])  # fake-score t (SiD-LSG: U{20..979})
    critic_loss: str = "native"            # native (eps-MSE, SiD-LSG) | x0
    critic_lora_rank: int = 0              # 0: full copy of the teacher as the fake score
    student_lora_rank: int = 0             # >0: the student is LoRA adapters on the teacher's frozen weights
    ratio: int = 1                         # fake-score updates per generator update (SiD: 1, fake first)
    normalize: bool = True                 # per-sample 1 / sg(mean|x - D_r|); false: w = 1
    critic_uncond_prob: float = 0.0        # fake-score updates only: share of prompts replaced by "" (SiD-LSG: 0.1)
    gan_weight: float = 0.0                # SiDA: weight of softplus(-l) on the generator; 0: data-free SiD
    gan_critic_weight: float = 1e-2        # weight of the discriminator loss added to the fake score's
    gan_features: str = "critic"           # critic (SiDA reads the fake score's encoder) | teacher


class SiD:
    phases = ("generator", "critic")

    def __init__(self, options: SiDOptions, teacher):
        if options.ratio < 1:
            raise ValueError(f"method.ratio={options.ratio}: need at least one fake-score update per generator update")
        if options.t_sampler not in ("sid", "uniform"):
            raise ValueError(f"method.t_sampler={options.t_sampler!r}: choose sid or uniform")
        self.options, self.teacher, self.schedule = options, teacher, teacher.schedule
        self.guidance = guidance_from_options(options)
        self.timesteps = check_timesteps(self.schedule, options.timesteps or [self.schedule.t_max])
        self.default_sample_steps = len(self.timesteps)
        self.input_scale = float(self.schedule.sigma(torch.tensor([self.timesteps[0]]))) if options.scale_input else 1.0
        self.nets = {"generator": student_denoiser(teacher, options.student_lora_rank), "critic": make_critic(teacher, options.critic_lora_rank)}
        self.gan = GANTerm(options, teacher, self.nets, "SiDA")
        self.engine = ScoreEngine(teacher, self.nets, gan_name=self.gan.head, gan_features=options.gan_features)
        self.loss_times = SiDTimesteps(options.sid_t_max) if options.t_sampler == "sid" else default_range(self.schedule, *options.dm_t_range)
        self.critic_times = default_range(self.schedule, *options.critic_t_range)

    def phase(self, step: int) -> str:
        """``ratio`` fake-score steps, then one generator step (SiD's loop updates the fake score first)."""
        return "generator" if step % (self.options.ratio + 1) == self.options.ratio else "critic"

    def phase_nets(self, phase: str) -> list[str]:
        return ["generator"] if phase == "generator" else ["critic", *self.gan.nets]

    def _student(self, batch, n):
        return student_with_scaled_input(self.nets["generator"], self.schedule, self.timesteps, batch["cond"], batch["rng"],
                                         (n, *self.teacher.latent_shape), self.input_scale)

    def generator_loss(self, batch):
        rng, n = batch["rng"], len(batch["prompts"])
        x = self._student(batch, n)
        t = self.loss_times(self.schedule, n, rng).to(x.device)
        w_real, w_fake = self.guidance.draw(n, rng)
        loss, dropped = sid_generator_loss(self.engine, x, t, rng.randn_like(x), batch["cond"], batch["uncond"], w_real, w_fake,
                                           self.options.alpha, self.options.normalize)
        logs = {"loss_sid": loss.mean().item(), "nan_dropped": float(dropped)}
        return self.gan.generator_term(loss, logs, self.engine, self.critic_times, x, batch), logs

    def critic_loss(self, batch):
        n = len(batch["prompts"])
        with torch.no_grad():
            x = self._student(batch, n)
        loss = critic_phase_loss(self.nets["critic"], self.teacher, self.critic_times, x, batch, self.options.critic_loss, self.guidance.fake_train,
                                 self.options.critic_uncond_prob)
        loss, dropped = drop_nonfinite(loss)
        logs = {"loss_fake": loss.mean().item(), "nan_dropped": float(dropped)}
        return self.gan.discriminator_term(loss, logs, self.engine, self.critic_times, x, batch), logs

    def sample(self, noise, cond, uncond, steps, guidance, generator=None):
        return sample_student(self.nets["generator"], self.schedule, self.timesteps, noise * self.input_scale, cond, generator)


@register_method("sid", SiDOptions)
def build_sid(options: SiDOptions, teacher, train_cfg, prompts) -> SiD:
    return SiD(options, teacher)

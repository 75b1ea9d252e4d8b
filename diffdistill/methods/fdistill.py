"""f-distill: one-step diffusion distillation by f-divergence distribution matching (Xu et al. 2025,
"One-step Diffusion Models with f-Divergence Distribution Matching").

The generator descends D_f(p_t || q_t) = E_{q_t} f(p_t / q_t) between the teacher's and the
generator's noised distributions. Its gradient (Sec. 3 of the paper) is the DMD gradient weighted by
h(r) = f''(r) r^2 at the density ratio r = p_t(x_t) / q_t(x_t):

    grad_theta D_f = E[ h(r) (s_q - s_p)(x_t) dx_t/dtheta ] = E[ h(r) (alpha^2 / sigma^2)(D_f - D_r) dx/dtheta ]

(tests/test_fdistill.py checks this in closed form for every f below). r is read from a
discriminator: trained with the logistic loss on real and generated samples, its logit tends to
log p_t / q_t, so r = clamp(exp(clamp(l, -10, 10)), 0.1, 20), detached. As in the official
implementation (NVlabs FastGen ``methods/distribution_matching/f_distill.py``): r is normalized by its
mean within 10 equal t-bins, h by its batch mean, and each sample's DM term by mean|x - D_r^w|:

    g = h(r) / (mean h + 1e-6) * (D_f - D_r^w) / (mean_CHW |x - D_r^w| + 1e-6)
    L = L_VSD(x, g) + lambda_G softplus(-l(x_t)),    lambda_G = 1e-3

The discriminator (a GAN head on critic or teacher features) trains in the critic phase with the
fake score, as DMD2's does; it needs real images. f = rkl (h = 1) with no GAN is DMD's reverse KL,
and without normalization, Diff-Instruct's integral KL (``methods/diff_instruct.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from diffdistill.generator import backward_simulation, check_timesteps, sample_student, student_denoiser
from diffdistill.guidance import guidance_from_options
from diffdistill.methods.adversarial import GANTerm, drop_nonfinite
from diffdistill.methods.base import register_method
from diffdistill.methods.dmd import default_range
from diffdistill.schedules import add_noise
from diffdistill.scores import ScoreEngine, critic_phase_loss, make_critic

# f (the divergence E_q f(p/q), up to affine terms) and its weight h, h(r) = f''(r) r^2 up to a constant factor
F_DIVERGENCES: dict[str, tuple[Callable, Callable]] = {
    "rkl": (lambda r: -torch.log(r), lambda r: torch.ones_like(r)),                                    # reverse KL, KL(q || p)
    "kl": (lambda r: r * torch.log(r), lambda r: r),                                                   # forward KL, KL(p || q)
    "js": (lambda r: 0.5 * (r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2)), lambda r: 1 - 1 / (1 + r)),  # Jensen-Shannon (x 2)
    "sf": (lambda r: (1 + r) * torch.log((1 + r) / (2 * r)), lambda r: 1 / (1 + r)),                   # softened reverse KL
    "neyman": (lambda r: 1 / r - 1, lambda r: 1 / r.clamp_min(1e-8)),                                 # Neyman chi^2 (x 1/2)
    "sh": (lambda r: (r.sqrt() - 1) ** 2, lambda r: r.sqrt()),                                         # squared Hellinger (x 2)
    "jf": (lambda r: (r - 1) * torch.log(r), lambda r: 1 + r),                                         # Jeffreys
}


def density_ratio_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """r = clamp(exp(clamp(l, -10, 10)), 0.1, 20), detached: a logistic discriminator's l -> log p/q."""
    return logits.detach().clamp(-10, 10).exp().clamp(0.1, 20)


def normalize_ratio_by_t(r: torch.Tensor, t: torch.Tensor, t_min: float, t_max: float, bins: int = 10) -> torch.Tensor:
    """r / (mean of r over the samples in the same of ``bins`` equal bins of [t_min, t_max] + 1e-6)."""
    index = ((t.double() - t_min) / (t_max - t_min) * bins).floor().long().clamp(0, bins - 1)
    sums = torch.zeros(bins, dtype=r.dtype, device=r.device).index_add_(0, index, r)
    counts = torch.zeros(bins, dtype=r.dtype, device=r.device).index_add_(0, index, torch.ones_like(r))
    return r / (sums[index] / counts[index] + 1e-6)


def weighted_dm_grad(engine: ScoreEngine, x, t, eps, cond, uncond, w_real, w_fake, weight: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """g = weight * (D_f^{w_fake} - D_r^{w_real}) [/ (mean_CHW |x - D_r^{w_real}| + 1e-6)] at x_t, without gradient."""
    with torch.no_grad():
        x_t = add_noise(engine.teacher_denoiser.schedule, x.detach(), eps, t)
        x0_real = engine.real(x_t, t, cond, uncond, w_real)
        x0_fake = engine.fake(x_t, t, cond, uncond, w_fake, grad=False)
        per_sample = weight.to(x0_real.dtype)
        if normalize:
            per_sample = per_sample / ((x.detach() - x0_real).abs().flatten(1).mean(1) + 1e-6)
        return torch.nan_to_num((x0_fake - x0_real) * per_sample.view(-1, *([1] * (x.ndim - 1))))


def dm_surrogate(x: torch.Tensor, grad: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per-sample loss whose x-gradient is g / numel ("mean", FastGen's VSD) or g ("sum", Diff-Instruct)."""
    loss = 0.5 * (x - (x - grad).detach()).square().flatten(1)
    return loss.mean(1) if reduction == "mean" else loss.sum(1)


@dataclass
class FDistillOptions:
    divergence: str = "js"                 # rkl | kl | js | sf | neyman | sh | jf (FastGen's default: js)
    guidance_style: str = "cfg"            # cfg | fake_cfg | random | lsg | zero_cfg | anti_cfg (diffdistill.guidance)
    guidance: float = 1.75                 # teacher w (SD1.5, as DMD2)
    fake_guidance: float = 1.0             # fake-score w in the generator loss
    fake_train_guidance: float = 1.0       # fake-score w while training it
    guidance_range: list[float] | None = None        # random: per-sample teacher w ~ U[lo, hi]
    fake_guidance_range: list[float] | None = None   # random: per-sample fake w ~ U[lo, hi]
    timesteps: list[float] | None = None   # generator timesteps; None: one step from the schedule's end
    ratio: int = 5                         # critic (and discriminator) updates per generator update (FastGen SD15: 9, student_update_freq 10)
    dm_t_range: list[float] = field(default_factory=lambda: [0.001, 0.999])   # DM term t (FastGen: U[0.001, 0.999])
    critic_t_range: list[float] = field(default_factory=lambda: [0.0, 0.999])  # critic and GAN noising t (FastGen: [0.001, 0.999])
    gan_weight: float = 1e-3               # lambda_G on softplus(-l) for the generator; 0: no GAN term
    gan_critic_weight: float = 1e-2        # weight of the discriminator loss added to the critic's
    gan_features: str = "critic"           # critic (DMD2) | teacher (FastGen)
    ratio_normalization: bool = True       # r / (mean r in its t-bin)
    ratio_bins: int = 10                   # equal t-bins for that normalization
    weight_normalization: bool = True      # h / (mean h + 1e-6)
    normalize: bool = True                 # per-sample 1 / (mean|x - D_r^w| + 1e-6), as DMD2
    reduction: str = "mean"                # mean (VSD: dL/dx = g / numel) | sum (Diff-Instruct: dL/dx = g)
    critic_loss: str = "native"            # native (eps-MSE for SD) | x0
    critic_lora_rank: int = 0              # 0: full copy of the teacher as critic
    student_lora_rank: int = 0             # >0: the student is LoRA adapters on the teacher's frozen weights


class FDistill:
    phases = ("generator", "critic")

    def __init__(self, options: FDistillOptions, teacher):
        if options.divergence not in F_DIVERGENCES:
            raise ValueError(f"method.divergence={options.divergence!r}: choose one of {', '.join(F_DIVERGENCES)}")
        if options.ratio < 1:
            raise ValueError(f"method.ratio={options.ratio}: need at least one critic update per generator update")
        if options.reduction not in ("mean", "sum"):
            raise ValueError(f"method.reduction={options.reduction!r}: choose mean or sum")
        self.options, self.teacher, self.schedule = options, teacher, teacher.schedule
        self.guidance = guidance_from_options(options)
        self.h = F_DIVERGENCES[options.divergence][1]
        self.timesteps = check_timesteps(self.schedule, options.timesteps or [self.schedule.t_max])
        self.default_sample_steps = len(self.timesteps)
        self.nets = {"generator": student_denoiser(teacher, options.student_lora_rank), "critic": make_critic(teacher, options.critic_lora_rank)}
        self.needs_ratio = options.divergence != "rkl"
        self.gan = GANTerm(options, teacher, self.nets, f"f-distill ({options.divergence})", keep_head=self.needs_ratio,
                           instead="method.divergence=rkl with method.gan_weight=0")
        self.engine = ScoreEngine(teacher, self.nets, gan_name=self.gan.head, gan_features=options.gan_features)
        self.dm_times = default_range(self.schedule, *options.dm_t_range)
        self.critic_times = default_range(self.schedule, *options.critic_t_range)
        self.density_ratio: Callable | None = None  # (x_t, t, cond) -> r; replaces the discriminator (tests: the exact ratio)

    def phase(self, step: int) -> str:
        return "generator" if step % (self.options.ratio + 1) == self.options.ratio else "critic"

    def phase_nets(self, phase: str) -> list[str]:
        return ["generator"] if phase == "generator" else ["critic", *self.gan.nets]

    def _student(self, batch, n):
        return backward_simulation(self.nets["generator"], self.schedule, self.timesteps, batch["cond"], batch["rng"], (n, *self.teacher.latent_shape))

    def weights(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """h(r) after the paper's ratio (per t-bin) and weight normalizations."""
        if self.options.ratio_normalization:
            r = normalize_ratio_by_t(r, t, self.schedule.t_min, self.schedule.t_max, self.options.ratio_bins)
        h = self.h(r)
        return h / (h.mean() + 1e-6) if self.options.weight_normalization else h

    def generator_loss(self, batch):
        rng, n, cond = batch["rng"], len(batch["prompts"]), batch["cond"]
        x = self._student(batch, n)
        t = self.dm_times(self.schedule, n, rng).to(x.device)
        w_real, w_fake = self.guidance.draw(n, rng)
        eps = rng.randn_like(x)
        logits = None
        if self.gan.head:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.gan.weight > 0):  # graph to x for the GAN term
                logits = self.engine.gan_logits(add_noise(self.schedule, x, eps, t), t, cond)
        if self.density_ratio is not None:
            r = self.density_ratio(add_noise(self.schedule, x.detach(), eps, t), t, cond)
        else:
            r = density_ratio_from_logits(logits) if self.needs_ratio else torch.ones(n, device=x.device)
        h = self.weights(r.to(x.device, torch.float32), t)
        grad = weighted_dm_grad(self.engine, x, t, eps, cond, batch["uncond"], w_real, w_fake, h, self.options.normalize)
        loss = dm_surrogate(x, grad, self.options.reduction)
        logs = {"loss_dm": loss.mean().item(), "ratio_mean": float(r.float().mean()), "h_max": float(h.max())}
        if self.gan.weight > 0:  # the GAN term on the logits the ratio came from (same x_t), not a fresh noising
            gan = torch.nn.functional.softplus(-logits)
            loss = loss + self.gan.weight * gan
            logs["loss_gan_g"] = gan.mean().item()
        return loss, logs

    def critic_loss(self, batch):
        n = len(batch["prompts"])
        with torch.no_grad():
            x = self._student(batch, n)
        loss = critic_phase_loss(self.nets["critic"], self.teacher, self.critic_times, x, batch, self.options.critic_loss, self.guidance.fake_train)
        loss, dropped = drop_nonfinite(loss)
        logs = {"loss_fake": loss.mean().item(), "nan_dropped": float(dropped)}
        return self.gan.discriminator_term(loss, logs, self.engine, self.critic_times, x, batch), logs

    def sample(self, noise, cond, uncond, steps, guidance, generator=None):
        return sample_student(self.nets["generator"], self.schedule, self.timesteps, noise, cond, generator)


@register_method("fdistill", FDistillOptions)
def build_fdistill(options: FDistillOptions, teacher, train_cfg, prompts) -> FDistill:
    return FDistill(options, teacher)

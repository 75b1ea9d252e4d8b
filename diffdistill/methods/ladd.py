"""LADD: Latent Adversarial Diffusion Distillation (Sauer et al. 2024, "Fast High-Resolution Image
Synthesis with Latent Adversarial Diffusion Distillation", SD3-Turbo).

A purely adversarial distillation: no distribution-matching term, no regression term. The
discriminator is the frozen teacher used as a feature network plus small trainable heads, one on
each of several of its blocks (LADD's "generative features"), conditioned on the noise level and the
pooled prompt. Student samples x = G(z) and "real" samples y are re-noised, x~ = alpha_t x +
sigma_t eps with their own t and eps, t = sigmoid(N(m, s^2)) (logit-normal; the paper's m = 1,
s = 1 puts most mass at high noise, where the feedback is about global structure), the teacher runs
on x~ and head k reads block k's features F_k(x~):

    heads:      L_D = sum_k max(0, 1 - D_k(F_k(y~), t, c)) + max(0, 1 + D_k(F_k(x~), t, c))   (hinge)
    generator:  L_G = - sum_k D_k(F_k(x~), t, c)

The generator's gradient reaches x through the teacher's forward pass; the teacher's weights are
never trained (frozen, not in any optimizer). "Real" samples are the teacher's own (LADD's synthetic
data: a pool of teacher DDIM ODE samples with their prompts, made once at the start; ``real:
teacher``), or dataset latents (``real: data``).

**Loss: hinge** by default, the loss of ADD (Sauer et al. 2023, whose discriminator LADD moves into
latent space): its heads stop pushing once a logit is past the margin, so with an expressive frozen
feature network under them the logits do not run away, and the generator's -D keeps a constant
gradient scale. ``loss: nonsaturating`` is the logistic loss FastGen's LADD uses
(``fastgen/methods/distribution_matching/ladd.py``: softplus(-D) for the student, softplus(D_fake) +
softplus(-D_real) for the heads). Heads update ``ratio`` times per generator update (FastGen:
``student_update_freq`` 5, i.e. 4:1; 2 for Wan).

**Unverified here** (the paper's text was not retrieved; FastGen read, not run): that LADD's heads
use the hinge loss; the logit-normal's m = 1, s = 1 (recalled, and "shifted toward high noise" in our
formula sheet); the exact head architecture (ours: a per-token MLP with additive conditioning)
and which blocks they read (ours: every block by default); whether the logit-normal applies before
or after SD3's timestep shift (ours: the schedule's shift is applied to it, as for SD3 training
times). Few-step students take their inputs by backward simulation (DMD2), where ADD, LADD and
FastGen noise real samples to the student's timesteps. No R1 penalty (FastGen's optional approximate R1).
The teacher runs its whole forward pass even past the last block the heads read (FastGen stops early).
On the toy (``diffdistill.toy``, ring8) it needs a kd warm start, 4:1 and a low generator lr: see benchmarks/toy2d.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffdistill.conditioning import cond_cat
from diffdistill.generator import backward_simulation, check_timesteps, sample_student, student_denoiser
from diffdistill.methods.adversarial import (
    GAN_LOSSES,
    build_discriminator_heads,
    discriminator_adversarial_loss,
    generator_adversarial_loss,
    noised,
    pooled_text,
    require_real_images,
)
from diffdistill.methods.base import register_method
from diffdistill.methods.dmd import make_regression_pairs
from diffdistill.schedules import LogitNormalTimesteps
from diffdistill.scores import LayerTaps

REAL_SOURCES = ("teacher", "data")


@dataclass
class LADDOptions:
    timesteps: list[float] | None = None   # student timesteps; None: one step from the schedule's end (999 / 1.0)
    ratio: int = 1                         # head updates per generator update (FastGen: 4)
    loss: str = "hinge"                    # hinge (ADD, LADD) | nonsaturating (FastGen's LADD)
    t_mean: float = 1.0                    # re-noising t = sigmoid(N(t_mean, t_std^2)) x t_max (flow: then shifted); LADD m = 1
    t_std: float = 1.0                     # LADD s = 1
    feature_layers: list[int] | None = None  # teacher blocks the heads read (UNet: down blocks then mid block); None: all
    head_width: int = 128                  # hidden width of each head's MLP
    real: str = "teacher"                  # teacher (LADD's synthetic data) | data (the dataset's latents)
    teacher_samples: int = 1024            # real=teacher: pool of teacher ODE samples, made once at the start
    teacher_steps: int = 25                # DDIM steps of the teacher ODE that makes them
    guidance: float = 1.0                  # teacher CFG w for them, uncond + w (cond - uncond)


class LADD:
    phases = ("generator", "critic")

    def __init__(self, options: LADDOptions, teacher, prompts: list[str] | None = None, seed: int = 0):
        if options.ratio < 1:
            raise ValueError(f"method.ratio={options.ratio}: need at least one head update per generator update")
        if options.loss not in GAN_LOSSES:
            raise ValueError(f"method.loss={options.loss!r}: choose one of {', '.join(GAN_LOSSES)}")
        if options.real not in REAL_SOURCES:
            raise ValueError(f"method.real={options.real!r}: choose one of {', '.join(REAL_SOURCES)}")
        self.options, self.teacher, self.schedule = options, teacher, teacher.schedule
        self.timesteps = check_timesteps(self.schedule, options.timesteps or [self.schedule.t_max])
        self.default_sample_steps = len(self.timesteps)
        self.teacher_denoiser = teacher.denoiser()  # frozen: requires_grad off, in no optimizer
        self.nets = {"generator": student_denoiser(teacher), "heads": build_discriminator_heads(teacher, options.feature_layers, options.head_width)}
        self.times = LogitNormalTimesteps(options.t_mean, options.t_std)
        self.pool = make_regression_pairs(teacher, prompts or [""], options.teacher_samples, options.teacher_steps, options.guidance,
                                          seed) if options.real == "teacher" else None

    def phase(self, step: int) -> str:
        """``ratio`` head updates, then one generator update."""
        return "generator" if step % (self.options.ratio + 1) == self.options.ratio else "critic"

    def phase_nets(self, phase: str) -> list[str]:
        return ["generator"] if phase == "generator" else ["heads"]

    def logits(self, x: torch.Tensor, cond: dict, rng, grad: bool = True) -> torch.Tensor:
        """Head logits (n, heads) on the frozen teacher's features at x~ = alpha_t x + sigma_t eps,
        t ~ the re-noising distribution; ``grad``: keep the graph through the teacher to x."""
        x_t, t = noised(self.schedule, self.times, x, rng)
        taps = LayerTaps(self.teacher_denoiser.backbone, self.options.feature_layers)
        with torch.set_grad_enabled(grad), taps.reading():
            self.teacher_denoiser(x_t, t, cond)
        return self.nets["heads"](taps.values, t, pooled_text(cond, len(x), x.device))

    def _student(self, batch, n):
        return backward_simulation(self.nets["generator"], self.schedule, self.timesteps, batch["cond"], batch["rng"], (n, *self.teacher.latent_shape))

    def _real(self, batch, n, rng) -> tuple[torch.Tensor, dict]:
        """Real samples with their own prompts: drawn from the teacher's pool, or the batch's data."""
        if self.pool is None:
            return require_real_images(batch, "LADD", "method.real=teacher"), batch["cond"]
        index = rng.randint(0, len(self.pool.target), (n,)).cpu()
        return self.pool.target[index].to(rng.device), {k: v[index.to(v.device)].to(rng.device) for k, v in self.pool.cond.items()}

    def generator_loss(self, batch):
        x = self._student(batch, len(batch["prompts"]))
        fake = self.logits(x, batch["cond"], batch["rng"])
        loss = generator_adversarial_loss(fake, self.options.loss)
        return loss, {"loss_adv_g": loss.mean().item(), "fake_logit": fake.mean().item()}

    def critic_loss(self, batch):
        rng, n = batch["rng"], len(batch["prompts"])
        with torch.no_grad():
            x = self._student(batch, n)
        real, real_cond = self._real(batch, n, rng)
        # one teacher pass and one heads call on both halves (each sample its own t and eps): under DDP the
        # heads run forward once per backward
        fake_logits, real_logits = self.logits(torch.cat([x, real.to(x.dtype)]), cond_cat(batch["cond"], real_cond), rng, grad=False).chunk(2)
        loss = discriminator_adversarial_loss(real_logits, fake_logits, self.options.loss)
        return loss, {"loss_adv_d": loss.mean().item(), "real_logit": real_logits.mean().item(), "fake_logit": fake_logits.mean().item()}

    def sample(self, noise, cond, uncond, steps, guidance, generator=None):
        return sample_student(self.nets["generator"], self.schedule, self.timesteps, noise, cond, generator)


@register_method("ladd", LADDOptions)
def build_ladd(options: LADDOptions, teacher, train_cfg, prompts) -> LADD:
    return LADD(options, teacher, prompts, train_cfg.seed)

"""DMD2: Improved Distribution Matching Distillation (Yin et al., NeurIPS 2024).

Differences from DMD (Sec. 4): no regression loss; a two time-scale update rule, ``ratio``
critic updates per generator update (10 for SD1.5, 5 for SDXL and ImageNet); a GAN loss whose
classifier reads the critic's bottleneck features at diffusion-noised inputs; and few-step
students trained by backward simulation. Optionally (``regression_warmup``) the generator first
regresses on teacher ODE pairs alone, as DMD2's one-step SDXL student starts (Sec. 5.2). In our notation:

    generator:  L_G = L_DM + lambda_G * softplus(-l(x~_fake))                      (Eq. 6 / Sec. 4.3)
    critic:     L_F = DSM(F; sg(G(z))) + lambda_D * [softplus(l(x~_fake)) + softplus(-l(x~_real))]

with x~ = alpha_t x + sigma_t eps', t ~ U over the critic's range. Settings from the paper and
its official code (``main/sd_guidance.py``, ``main/train_sd.py``): SD1.5 guidance 1.75 in
``uncond + w (cond - uncond)``, lambda_G 1e-3, lambda_D 1e-2, DM term t in U{20..980}, critic t
in U{0..999}, AdamW lr 1e-5 for both nets, grad-norm clip 10, 500 warm-up steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffdistill.generator import backward_simulation, check_timesteps, sample_student, student_denoiser
from diffdistill.methods.adversarial import GANTerm
from diffdistill.methods.base import register_method
from diffdistill.methods.dmd import default_range, distribution_matching_grad, make_regression_pairs, regression_loss, surrogate_loss
from diffdistill.scores import ScoreEngine, critic_phase_loss, make_critic


@dataclass
class DMD2Options:
    guidance: float = 1.75                 # teacher CFG w (SD1.5: 1.75, SDXL: 8)
    timesteps: list[float] | None = None   # student timesteps; None: one step from the schedule's end (999 / 1.0)
    ratio: int = 10                        # critic updates per generator update (SD1.5: 10; SDXL, ImageNet: 5)
    dm_t_range: list[float] = field(default_factory=lambda: [0.02, 0.98])      # DM term t, 1000ths of the schedule
    critic_t_range: list[float] = field(default_factory=lambda: [0.0, 0.999])  # critic and GAN noising t
    gan_weight: float = 0.0                # lambda_G on the generator (SD1.5 stage 2: 1e-3; SDXL 5e-3); 0: no GAN
    gan_critic_weight: float = 1e-2        # lambda_D on the classifier's loss, added to the critic's
    gan_features: str = "critic"           # critic (DMD2) | teacher (FastGen)
    gan_head: str = "pooled"               # pooled (global pooling, any feature shape) | patch (DMD2's SD1.5 head: a logit per patch)
    critic_loss: str = "native"            # native (eps-MSE for SD, as DMD2) | x0
    critic_lora_rank: int = 0              # 0: full copy of the teacher as critic
    student_lora_rank: int = 0             # >0: the student is LoRA adapters on the teacher's frozen weights
    normalize: str = "sample"              # DM gradient normalization: sample (DMD2) | batch | none
    dm_precision: str = "fp32"             # the DM term's passes: fp32 (outside autocast, x0 in float64; DMD2) | autocast
    regression_warmup: int = 0             # first steps: generator only, regressing on teacher ODE pairs (DMD's Eq. 9 loss); 0: none
    regression_pairs: int = 1024           # noise -> teacher ODE sample pairs for the warm-up, made once at the start
    regression_steps: int = 25             # DDIM steps (at ``guidance``) of the teacher ODE that makes them


class DMD2:
    phases = ("generator", "critic")

    def __init__(self, options: DMD2Options, teacher, prompts: list[str] | None = None, seed: int = 0):
        if options.ratio < 1:
            raise ValueError(f"method.ratio={options.ratio}: need at least one critic update per generator update")
        if options.regression_warmup and (options.timesteps or [None])[1:]:
            raise ValueError("method.regression_warmup regresses a one-step student; drop it, or train one step (no timesteps list)")
        self.options, self.teacher, self.schedule = options, teacher, teacher.schedule
        timesteps = options.timesteps or [self.schedule.t_max]
        self.timesteps = check_timesteps(self.schedule, timesteps)
        self.default_sample_steps = len(self.timesteps)
        self.nets = {"generator": student_denoiser(teacher, options.student_lora_rank), "critic": make_critic(teacher, options.critic_lora_rank)}
        self.gan = GANTerm(options, teacher, self.nets, "DMD2")
        self.engine = ScoreEngine(teacher, self.nets, gan_name=self.gan.head, gan_features=options.gan_features)
        self.dm_times = default_range(self.schedule, *options.dm_t_range)
        self.critic_times = default_range(self.schedule, *options.critic_t_range)
        self.pairs = make_regression_pairs(teacher, prompts or [""], options.regression_pairs, options.regression_steps, options.guidance,
                                           seed) if options.regression_warmup else None

    def phase(self, step: int) -> str:
        """Generator steps through the regression warm-up; then ``ratio`` critic steps and one generator
        step (DMD2's TTUR as data, not a flag)."""
        step -= self.options.regression_warmup
        return "generator" if step < 0 or step % (self.options.ratio + 1) == self.options.ratio else "critic"

    def phase_nets(self, phase: str) -> list[str]:
        return ["generator"] if phase == "generator" else ["critic", *self.gan.nets]

    def _student(self, batch, n):
        return backward_simulation(self.nets["generator"], self.schedule, self.timesteps, batch["cond"], batch["rng"], (n, *self.teacher.latent_shape))

    def generator_loss(self, batch):
        rng, n = batch["rng"], len(batch["prompts"])
        if batch["step"] < self.options.regression_warmup:
            loss = regression_loss(self.nets["generator"], self.pairs, self.timesteps[0], rng, n)
            return loss, {"loss_reg": loss.mean().item()}
        x = self._student(batch, n)
        t = self.dm_times(self.schedule, n, rng).to(x.device)
        grad, logs = distribution_matching_grad(self.engine, x, t, rng.randn_like(x), batch["cond"], batch["uncond"], self.options.guidance,
                                                self.options.normalize, self.options.dm_precision)
        loss = surrogate_loss(x, grad)
        logs["loss_dm"] = loss.mean().item()
        return self.gan.generator_term(loss, logs, self.engine, self.critic_times, x, batch), logs

    def critic_loss(self, batch):
        n = len(batch["prompts"])
        with torch.no_grad():
            x = self._student(batch, n)
        loss = critic_phase_loss(self.nets["critic"], self.teacher, self.critic_times, x, batch, self.options.critic_loss)
        logs = {"loss_fake": loss.mean().item()}
        return self.gan.discriminator_term(loss, logs, self.engine, self.critic_times, x, batch), logs

    def sample(self, noise, cond, uncond, steps, guidance, generator=None):
        return sample_student(self.nets["generator"], self.schedule, self.timesteps, noise, cond, generator)


@register_method("dmd2", DMD2Options)
def build_dmd2(options: DMD2Options, teacher, train_cfg, prompts) -> DMD2:
    return DMD2(options, teacher, prompts, train_cfg.seed)

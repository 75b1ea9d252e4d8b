"""DMD: Distribution Matching Distillation (Yin et al., CVPR 2024).

The generator descends a t-weighted reverse KL between its noised distribution and the teacher's,
KL(p_fake,t || p_real,t), whose gradient is (Eq. 7) E[ w_t alpha_t (s_fake - s_real)(x_t) dx/dtheta ].
In x0 form, with DMD2's normalization (its ``compute_distribution_matching_loss``):

    g = (D_fake(x_t) - D_real^w(x_t)) / mean_CHW |x - D_real^w(x_t)|        (both without gradient)
    L_DM = 0.5 * mean((x - sg(x - g))^2)    so that  dL_DM/dx = g / numel

plus a regression loss (Eq. 9) on noise->image pairs from the teacher's deterministic ODE
sampler, generated once and kept: L_reg = MSE(G(z_ref), y_ref) (the paper uses LPIPS in pixel
space; we use MSE on latents, since LPIPS weights cannot be fetched here).
The fake score trains by denoising score matching on generator samples, one update per
generator update.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from diffdistill.conditioning import encode_prompts
from diffdistill.generator import backward_simulation, check_timesteps, sample_student, student_denoiser
from diffdistill.methods.adversarial import GANTerm
from diffdistill.methods.base import register_method
from diffdistill.randomness import derive_seed
from diffdistill.sampling import ddim_sample
from diffdistill.schedules import UniformTimesteps, add_noise
from diffdistill.scores import ScoreEngine, critic_phase_loss, make_critic


def default_range(schedule, lo_frac: float, hi_frac: float):
    """DMD2's ranges are given in 1000ths of the schedule: U{20..980} for VP, U[0.02, 0.98] for flow."""
    if schedule.kind == "vp":
        return UniformTimesteps(round(lo_frac * schedule.num_train_timesteps), round(hi_frac * schedule.num_train_timesteps), integer=True)
    return UniformTimesteps(lo_frac, hi_frac)


NORMALIZATIONS = ("sample", "batch", "none")


def distribution_matching_grad(engine: ScoreEngine, x, t, eps, cond, uncond, guidance, normalize: str = "sample",
                               precision: str = "fp32") -> tuple[torch.Tensor, dict]:
    """g = (D_fake - D_real^w) / mean|x - D_real^w| at x_t = alpha_t x + sigma_t eps, without gradient.

    ``normalize``: "sample" divides each sample by its own mean_CHW |x - D_real^w| (DMD/DMD2);
    "batch" by the batch average of it (less noise amplification in low dimension, where one
    sample's mean over few coordinates is itself noisy); "none" leaves g = D_fake - D_real^w,
    sigma_t^2 / alpha_t times (s_fake - s_real)(x_t): the form whose expectation is a KL gradient.

    ``precision``: "fp32" runs the two passes outside the run's autocast (the critic in its float32
    weights, the teacher in ``teacher_dtype``) and converts to x0 in float64, as DMD2 computes this
    term: near t = T an eps prediction is multiplied by sigma/alpha ~ 13, and bf16 rounding of it is
    then a few percent of D_fake - D_real. "autocast" runs them in the run's mixed precision.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}: choose one of {', '.join(NORMALIZATIONS)}")
    if precision not in DM_PRECISIONS:
        raise ValueError(f"dm_precision={precision!r}: choose one of {', '.join(DM_PRECISIONS)}")
    full = precision == "fp32"
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False) if full else contextlib.nullcontext():
        x_data, eps = (x.detach().double(), eps.double()) if full else (x.detach(), eps)  # float64 x_t: x0 converted in float64
        x_t = add_noise(engine.teacher_denoiser.schedule, x_data, eps, t)
        x0_real = engine.real(x_t, t, cond, uncond, guidance)
        x0_fake = engine.fake(x_t, t, cond, grad=False)
        grad = x0_fake - x0_real
        if normalize != "none":
            weight = (x_data - x0_real).abs().flatten(1).mean(1)
            weight = (weight if normalize == "sample" else weight.mean().expand_as(weight)).clamp_min(1e-8)
            grad = grad / weight.view(-1, *([1] * (x.ndim - 1)))
        grad = torch.nan_to_num(grad).to(x.dtype)
    return grad, {"dm_grad_norm": grad.flatten(1).norm(dim=1).mean().item()}


DM_PRECISIONS = ("fp32", "autocast")


def surrogate_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Per-sample 0.5 * mean((x - sg(x - g))^2): its gradient in x is g / numel (the "VSD surrogate")."""
    return 0.5 * (x - (x - grad).detach()).square().flatten(1).mean(1)


@dataclass
class RegressionPairs:
    noise: torch.Tensor
    target: torch.Tensor
    cond: dict


@torch.no_grad()
def make_regression_pairs(teacher, prompts: list[str], count: int, steps: int, guidance: float, seed: int) -> RegressionPairs:
    """Noise -> image pairs from the teacher's deterministic DDIM ODE sampler (DMD Sec. 3.3)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "regression-pairs"))
    chosen = [prompts[i] for i in torch.randint(len(prompts), (count,), generator=g).tolist()]
    noise = torch.randn((count, *teacher.latent_shape), generator=g)
    device = next(teacher.backbone.parameters(), torch.zeros(())).device
    cond = encode_prompts(teacher.pipe, chosen, device) if teacher.pipe is not None else {}
    uncond = encode_prompts(teacher.pipe, [""] * count, device) if teacher.pipe is not None and guidance != 1.0 else None
    timesteps = teacher.schedule.sampling_timesteps(steps)
    target = torch.cat([
        ddim_sample(teacher.denoiser(), noise[i : i + 64].to(device), timesteps, _rows(cond, i), _rows(uncond, i) if uncond else None, guidance)
        for i in range(0, count, 64)
    ])
    return RegressionPairs(noise, target.cpu(), cond)


def _rows(cond: dict, start: int, size: int = 64) -> dict:
    return {k: v[start : start + size] for k, v in cond.items()}


def regression_loss(generator, pairs: RegressionPairs, t_init: float, rng, n: int) -> torch.Tensor:
    """Per-sample MSE of the one-step student on a random minibatch of teacher ODE pairs."""
    index = rng.randint(0, len(pairs.noise), (n,)).cpu()
    noise = pairs.noise[index].to(rng.device)
    cond = {k: v[index].to(rng.device) for k, v in pairs.cond.items()}
    x = generator(noise, torch.full((n,), t_init, device=rng.device), cond)
    return (x - pairs.target[index].to(rng.device)).square().flatten(1).mean(1)


@dataclass
class DMDOptions:
    guidance: float = 3.0                  # teacher CFG w in uncond + w (cond - uncond) (DMD's COCO model; not verified)
    t_init: float | None = None            # the generator's timestep; None: the schedule's end (999 / 1.0)
    regression_weight: float = 0.25        # lambda_reg (DMD Eq. 9; not verified)
    regression_pairs: int = 256            # teacher ODE pairs kept in memory
    regression_steps: int = 50             # DDIM steps of the teacher ODE sampler
    dm_t_range: list[float] = field(default_factory=lambda: [0.02, 0.98])     # DM term t, in 1000ths of the schedule
    critic_t_range: list[float] = field(default_factory=lambda: [0.0, 0.999])  # critic t (DMD: all of 0..999)
    critic_loss: str = "native"            # native (eps-MSE for SD) | x0
    critic_lora_rank: int = 0              # 0: full copy of the teacher as critic
    student_lora_rank: int = 0             # >0: the student is LoRA adapters on the teacher's frozen weights
    normalize: str = "sample"              # DM gradient normalization: sample (DMD) | batch | none
    dm_precision: str = "fp32"             # the DM term's passes: fp32 (outside autocast, x0 in float64; DMD2) | autocast
    gan_weight: float = 0.0                # DMD2's GAN term on real images (not in DMD); 0: none
    gan_critic_weight: float = 1e-2        # weight of the discriminator loss added to the critic's
    gan_features: str = "critic"           # critic (DMD2) | teacher (FastGen)


class DMD:
    phases = ("generator", "critic")
    default_sample_steps = 1

    def __init__(self, options: DMDOptions, teacher, prompts: list[str], seed: int):
        self.options, self.teacher, self.schedule = options, teacher, teacher.schedule
        t_init = self.schedule.t_max if options.t_init is None else options.t_init
        self.timesteps = check_timesteps(self.schedule, [t_init])
        self.nets = {"generator": student_denoiser(teacher, options.student_lora_rank), "critic": make_critic(teacher, options.critic_lora_rank)}
        self.gan = GANTerm(options, teacher, self.nets, "DMD")
        self.engine = ScoreEngine(teacher, self.nets, gan_name=self.gan.head, gan_features=options.gan_features)
        self.dm_times = default_range(self.schedule, *options.dm_t_range)
        self.critic_times = default_range(self.schedule, *options.critic_t_range)
        self.pairs = make_regression_pairs(teacher, prompts, options.regression_pairs, options.regression_steps, options.guidance, seed) if options.regression_weight > 0 else None

    def phase(self, step: int) -> str:
        return "generator" if step % 2 == 0 else "critic"  # DMD: one fake-score update per generator update

    def phase_nets(self, phase: str) -> list[str]:
        return ["generator"] if phase == "generator" else ["critic", *self.gan.nets]

    def _student(self, batch, n):
        return backward_simulation(self.nets["generator"], self.schedule, self.timesteps, batch["cond"], batch["rng"], (n, *self.teacher.latent_shape))

    def generator_loss(self, batch):
        rng, n = batch["rng"], len(batch["prompts"])
        x = self._student(batch, n)
        t = self.dm_times(self.schedule, n, rng).to(x.device)
        grad, logs = distribution_matching_grad(self.engine, x, t, rng.randn_like(x), batch["cond"], batch["uncond"], self.options.guidance,
                                                self.options.normalize, self.options.dm_precision)
        loss = surrogate_loss(x, grad)
        logs["loss_dm"] = loss.mean().item()
        if self.pairs is not None:
            reg = regression_loss(self.nets["generator"], self.pairs, self.timesteps[0], rng, n)
            loss = loss + self.options.regression_weight * reg
            logs["loss_reg"] = reg.mean().item()
        return self.gan.generator_term(loss, logs, self.engine, self.critic_times, x, batch), logs

    def critic_loss(self, batch):
        with torch.no_grad():
            x = self._student(batch, len(batch["prompts"]))
        loss = critic_phase_loss(self.nets["critic"], self.teacher, self.critic_times, x, batch, self.options.critic_loss)
        logs = {"loss_fake": loss.mean().item()}
        return self.gan.discriminator_term(loss, logs, self.engine, self.critic_times, x, batch), logs

    def sample(self, noise, cond, uncond, steps, guidance, generator=None):
        return sample_student(self.nets["generator"], self.schedule, self.timesteps, noise, cond, generator)


@register_method("dmd", DMDOptions)
def build_dmd(options: DMDOptions, teacher, train_cfg, prompts) -> DMD:
    return DMD(options, teacher, prompts, train_cfg.seed)

"""Phased DMD: few-step distribution matching by score matching within subintervals (Fan et al. 2025).

The student's K timesteps t_0 > t_1 > ... > t_{K-1} split the noise range into K subintervals with
boundaries s_k = t_{k+1} (s_{K-1} = data). Expert k maps x_{t_k} to x_{s_k} with one deterministic
DDIM step from its x0-like output D_k:

    x_{s_k} = alpha_{s_k} D_k + sigma_{s_k} (x_{t_k} - alpha_{t_k} D_k) / sigma_{t_k}      (x_0 = D_{K-1})

Training is progressive, from low to high SNR: during stage k only expert k learns (earlier experts
are frozen and produce its inputs, later ones are not used yet), with its own fake score initialized
from the teacher. Expert k's samples x_s (s = s_k) are matched to the teacher's marginal at s through
their noised laws at every t > s, using the conditional forward process

    x_t = alpha_{t|s} x_s + sigma_{t|s} eps,   alpha_{t|s} = alpha_t / alpha_s,   sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2.

**Generator** (the reverse KL of q_t and p_t within the subinterval): its gradient in
x_s is alpha_{t|s} alpha_t (D_fake - D_teacher^w)(x_t) / sigma_t^2; as DMD does, we drop the t weight
alpha_t / sigma_t^2 and divide by mean|x_s / alpha_s - D_teacher^w| (DMD2's normalizer at s = data).

**Fake score** (score matching within the subinterval): q_t's score is E[grad log q(x_t | x_s) | x_t]
= E[-eps / sigma_{t|s} | x_t], so an unbiased x0 target is

    D* = (x_t - sigma_t^2 eps / sigma_{t|s}) / alpha_t          (at s = data: the usual x0)

and the critic regresses it with weight (sigma_{t|s} alpha_t / sigma_t^2)^2 ("eps": sigma_{t|s}^2 times
the squared score error, bounded as t -> s; at s = data the usual eps-MSE) or (sigma_{t|s} / sigma_t)^2
("x0": x0-MSE at s = data). The target x_s / alpha_s (treating x_s as data) is biased.

No official code was available; this follows the paper's summary and our own derivation
(``tests/test_phased_dmd.py`` checks the target and the gradient in closed form). Experts are separate
full copies of the teacher (nets ``expert_k``), as are the fake scores (``critic_k``, or LoRA).
With ``expert_ema`` > 0 each expert keeps an EMA (``ema_k``, checkpointed with the run): the frozen
earlier experts feed later stages through their EMA and sampling uses the EMAs, so a stage trains on
the inputs the deployed chain produces.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from diffdistill.ema import lerp_parameters
from diffdistill.generator import check_timesteps, student_denoiser
from diffdistill.methods.base import register_method
from diffdistill.methods.dmd import surrogate_loss
from diffdistill.methods.subinterval import WEIGHTINGS, subinterval_dm_grad, subinterval_score_loss
from diffdistill.param import append_dims
from diffdistill.scores import ScoreEngine, make_critic


def expert_step(expert, schedule, x, t: float, s: float | None, cond):
    """x_s = alpha_s D + sigma_s (x - alpha_t D) / sigma_t: one deterministic (DDIM) step of expert k."""
    n = x.shape[0]
    t_vec = torch.full((n,), t, device=x.device)
    x0 = expert(x, t_vec, cond)
    if s is None:
        return x0
    alpha_t, sigma_t = append_dims(schedule.alpha(t_vec), x.ndim), append_dims(schedule.sigma(t_vec), x.ndim)
    s_vec = torch.full((n,), s, device=x.device)
    alpha_s, sigma_s = append_dims(schedule.alpha(s_vec), x.ndim), append_dims(schedule.sigma(s_vec), x.ndim)
    return alpha_s * x0 + sigma_s * (x - alpha_t * x0) / sigma_t


# ---- the method --------------------------------------------------------------------------------


@dataclass
class PhasedDMDOptions:
    guidance: float = 1.0                  # teacher CFG w in u + w (c - u)
    timesteps: list[float] | None = None   # the K student timesteps, one expert each; None: 2 steps, the schedule's spacing
    stage_split: list[float] | None = None  # share of max_steps for each expert's stage (low SNR first); None: equal
    ratio: int = 5                         # fake-score updates per generator update (the paper: 5:1)
    dm_t_range: list[float] = field(default_factory=lambda: [0.02, 0.98])  # DM term t, 1000ths of the schedule, above s
    critic_weighting: str = "eps"          # eps: sigma_{t|s}^2 |score error|^2 | x0: x0-MSE at s = data
    critic_lora_rank: int = 0              # 0: full copies of the teacher as fake scores
    normalize: str = "sample"              # DM gradient normalization: sample (DMD2) | batch | none
    expert_ema: float = 0.0                # EMA decay of each expert, used for sampling and later stages; 0: none


class PhasedDMD:
    phases = ("generator", "critic")

    def __init__(self, options: PhasedDMDOptions, teacher, train_cfg):
        if options.ratio < 1:
            raise ValueError(f"method.ratio={options.ratio}: need at least one critic update per generator update")
        if getattr(train_cfg, "ema_decay", 0) > 0:
            raise ValueError("phased_dmd keeps one net per expert (expert_k) and the trainer's EMA follows a single "
                             "'generator': set ema_decay=0 and method.expert_ema instead")
        if not 0 <= options.expert_ema < 1:
            raise ValueError(f"method.expert_ema={options.expert_ema}: an EMA decay in [0, 1)")
        if options.critic_weighting not in WEIGHTINGS:
            raise ValueError(f"method.critic_weighting={options.critic_weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
        self.options, self.teacher, self.schedule = options, teacher, teacher.schedule
        self.timesteps = check_timesteps(self.schedule, options.timesteps or self.schedule.sampling_timesteps(2))
        self.boundaries = self.timesteps[1:] + [None]  # s_k = t_{k+1}; None is data
        self.default_sample_steps = len(self.timesteps)
        self.stage_ends = stage_ends(len(self.timesteps), options.stage_split, train_cfg.max_steps, options.ratio + 1)
        self.nets = {}
        for k in range(len(self.timesteps)):
            self.nets[f"expert_{k}"] = student_denoiser(teacher)
            self.nets[f"critic_{k}"] = make_critic(teacher, options.critic_lora_rank, share_teacher=False)  # one LoRA set per base
        self.engines = [ScoreEngine(teacher, self.nets, critic_name=f"critic_{k}") for k in range(len(self.timesteps))]
        self.ema_targets = {}
        if options.expert_ema > 0:
            for k in range(len(self.timesteps)):
                self.nets[f"ema_{k}"] = self.ema_targets[f"ema_{k}"] = copy.deepcopy(self.nets[f"expert_{k}"]).requires_grad_(False)

    def stage(self, step: int) -> int:
        """The expert being trained at this step (0 = lowest SNR)."""
        return next((k for k, end in enumerate(self.stage_ends) if step < end), len(self.stage_ends) - 1)

    def phase(self, step: int) -> str:
        return "generator" if step % (self.options.ratio + 1) == self.options.ratio else "critic"

    def phase_nets(self, phase: str) -> list[str]:
        prefix = "expert" if phase == "generator" else "critic"
        return [f"{prefix}_{k}" for k in range(len(self.timesteps))]  # only the current stage's net gets gradients

    def deployed(self, k: int):
        """Expert k as sampling uses it: its EMA when kept, else the trained net."""
        net = self.nets.get(f"ema_{k}", self.nets[f"expert_{k}"])
        return getattr(net, "module", net)

    def after_step(self, step: int) -> None:
        """After a generator update, the current stage's EMA follows its expert."""
        if self.options.expert_ema == 0 or self.phase(step) != "generator":
            return
        k = self.stage(step)
        expert = self.nets[f"expert_{k}"]
        lerp_parameters(self.nets[f"ema_{k}"], getattr(expert, "module", expert), self.options.expert_ema)

    def _samples(self, batch, k: int) -> torch.Tensor:
        """x_{s_k}: frozen (deployed) experts 0..k-1 without gradient, then expert k's step (with gradient if enabled)."""
        rng, n = batch["rng"], len(batch["prompts"])
        x = rng.randn((n, *self.teacher.latent_shape))
        with torch.no_grad():
            for i in range(k):
                x = expert_step(self.deployed(i), self.schedule, x, self.timesteps[i], self.boundaries[i], batch["cond"])
        return expert_step(self.nets[f"expert_{k}"], self.schedule, x, self.timesteps[k], self.boundaries[k], batch["cond"])

    def _times_above(self, s, n, rng, device, lo_frac=0.0, hi_frac=1.0):
        """t ~ U(max(s, lo), hi] in the schedule's units (strictly above the boundary s)."""
        span = self.schedule.t_max - self.schedule.t_min
        lo = max(self.schedule.t_min + lo_frac * span, s if s is not None else self.schedule.t_min)
        hi = self.schedule.t_min + hi_frac * span
        return (hi - (hi - lo) * rng.rand((n,))).to(device)

    def generator_loss(self, batch):
        k, rng = self.stage(batch["step"]), batch["rng"]
        x_s = self._samples(batch, k)
        t = self._times_above(self.boundaries[k], x_s.shape[0], rng, x_s.device, *self.options.dm_t_range)
        grad, logs = subinterval_dm_grad(self.engines[k], x_s, self.boundaries[k], t, rng.randn_like(x_s), batch["cond"], batch["uncond"],
                                         self.options.guidance, self.options.normalize)
        loss = surrogate_loss(x_s, grad)
        logs.update(loss_dm=loss.mean().item(), stage=float(k))
        return loss, logs

    def critic_loss(self, batch):
        k, rng = self.stage(batch["step"]), batch["rng"]
        with torch.no_grad():
            x_s = self._samples(batch, k)
        t = self._times_above(self.boundaries[k], x_s.shape[0], rng, x_s.device)
        eps = rng.randn_like(x_s).to(torch.float64)
        loss = subinterval_score_loss(self.nets[f"critic_{k}"], self.schedule, x_s, self.boundaries[k], t, eps, batch["cond"], self.options.critic_weighting)
        return loss, {"loss_fake": loss.mean().item(), "stage": float(k)}

    @torch.no_grad()
    def sample(self, noise, cond, uncond, steps, guidance, generator=None):
        """Each step with its own expert; deterministic after the initial noise (``generator`` is not drawn from)."""
        x = noise
        for k, (t, s) in enumerate(zip(self.timesteps, self.boundaries)):
            x = expert_step(self.deployed(k), self.schedule, x, t, s, cond)
        return x


def stage_ends(num_experts: int, split: list[float] | None, max_steps: int, quantum: int) -> list[int]:
    """Cumulative stage ends, rounded to whole (critic..., generator) cycles of ``quantum`` steps."""
    split = split or [1.0] * num_experts
    if len(split) != num_experts or any(f <= 0 for f in split):
        raise ValueError(f"method.stage_split={split}: give {num_experts} positive shares, one per expert")
    total, ends, acc = sum(split), [], 0.0
    for share in split:
        acc += share / total
        ends.append(int(round(acc * max_steps / quantum)) * quantum)
    ends[-1] = max(ends[-1], max_steps)
    return ends


@register_method("phased_dmd", PhasedDMDOptions)
def build_phased_dmd(options: PhasedDMDOptions, teacher, train_cfg, prompts) -> PhasedDMD:
    return PhasedDMD(options, teacher, train_cfg)


__all__ = ["PhasedDMD", "PhasedDMDOptions", "expert_step"]

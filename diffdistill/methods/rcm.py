"""rCM: sCM with a distribution-matching long skip (Zheng et al. 2025).

**rCM** adds DMD's reverse-KL gradient on the student's own (backward-simulated) samples as a
"long-skip" regularizer after an sCM-only warmup, and a fake score trained on those samples:
``ratio`` critic updates per generator update (rCM: student every 5th iteration), the DMD term
weighted by ``dmd_weight``. rCM's own loss is 100 sum(F - F- - g)^2 + 1.0 sum(G - sg(G - g_DMD))^2;
in our reductions (mean over elements, 0.5 mean for the DMD surrogate) that ratio is dmd_weight 0.02.
Where we differ from rCM's code (``rcm/models/t2v_model_distill_rcm.py``): its warmup scales the first
term of g by sqrt(1 - r^2 sin^2 s) and only the x_t part of the second by r (ours: the whole second
term by r; equal at r = 1); its DMD term, fake score and backward simulation draw TrigFlow times from
p_D, a shifted uniform (u ~ U[0, 1), s = 5u / (1 + 4u), sigma/alpha = s / (1 - s) = 5u / (1 - u)):
ours with ``dm_time_shift: 5`` for the DMD term and fake score (else uniform ``dm_t_range`` /
``critic_t_range``), while backward simulation keeps the student's fixed ``timesteps``; its
backward simulation takes K = (student update mod 4) + 1 steps in turn, ours K ~ U{1..4}; its fake
score trains on sum (G - D_f)^2 / sin^2 s. Its guidance is u + w (c - u), our convention, since the
"fix cfg" commits of 2026-02-20 (before: c + w (c - u)), so its w = 5 is our 5.

The sCM term (g, F-, the tangent warmup): :mod:`diffdistill.methods.scm`; the DMD term and the fake
score: :mod:`diffdistill.methods.dmd`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffdistill.generator import backward_simulation
from diffdistill.methods.base import register_method
from diffdistill.methods.dmd import default_range, distribution_matching_grad, surrogate_loss
from diffdistill.methods.scm import SCM, SCMOptions, scd_terms
from diffdistill.schedules import ShiftedUniformTimesteps
from diffdistill.scores import fake_score_loss, make_critic


@dataclass
class RCMOptions(SCMOptions):
    dmd_weight: float = 0.02               # the DMD term's weight (rCM's 1 against 100 on the sCM term, in our reductions)
    dmd_warmup: int = 1000                 # sCM-only steps before the DMD term and the fake score start (rCM: 1000)
    dmd_guidance: float | None = None      # teacher w of the DMD term; None: ``guidance``
    ratio: int = 4                         # critic updates per generator update after the warmup (rCM: student every 5th)
    dm_t_range: list[float] = field(default_factory=lambda: [0.02, 0.98])      # DMD term t, 1000ths of the schedule
    critic_t_range: list[float] = field(default_factory=lambda: [0.0, 0.999])  # fake score t
    dm_time_shift: float = 0.0             # >0: rCM's shifted times (sigma/alpha = s u / (1 - u)) for the DMD term and fake score
                                           # instead of the two uniform ranges (rCM: 5); 0: the ranges
    critic_loss: str = "native"            # native | x0
    critic_lora_rank: int = 0              # 0: full copy of the teacher as fake score
    normalize: str = "sample"              # DMD gradient normalization: sample (rCM: mean|G - D_real|) | batch | none
    adaptive_weighting: bool = False       # rCM weights the sCM term by a constant
    tangent_warmup: int = 1000


class RCM:
    """sCM plus DMD2's distribution-matching term and fake score (rCM, Zheng et al. 2025)."""

    phases = ("generator", "critic")

    def __init__(self, options: RCMOptions, teacher, train_cfg):
        if options.ratio < 1:
            raise ValueError(f"method.ratio={options.ratio}: need at least one critic update per generator update")
        self.scm = SCM(options, teacher, train_cfg)
        self.options, self.teacher, self.schedule = options, teacher, teacher.schedule
        self.timesteps, self.default_sample_steps = self.scm.timesteps, self.scm.default_sample_steps
        self.nets = self.scm.nets
        self.nets["critic"] = make_critic(teacher, options.critic_lora_rank)
        self.engine = self.scm.engine
        if options.dm_time_shift > 0:
            self.dm_times = self.critic_times = ShiftedUniformTimesteps(options.dm_time_shift)
        else:
            self.dm_times = default_range(self.schedule, *options.dm_t_range)
            self.critic_times = default_range(self.schedule, *options.critic_t_range)

    def phase(self, step: int) -> str:
        """sCM alone for ``dmd_warmup`` steps, then ``ratio`` critic updates and one generator update."""
        if step < self.options.dmd_warmup:
            return "generator"
        return "generator" if (step - self.options.dmd_warmup) % (self.options.ratio + 1) == self.options.ratio else "critic"

    def phase_nets(self, phase: str) -> list[str]:
        return self.scm.phase_nets(phase) if phase == "generator" else ["critic"]

    def _student(self, batch, n):
        return backward_simulation(self.nets["generator"], self.schedule, self.timesteps, batch["cond"], batch["rng"], (n, *self.teacher.latent_shape))

    def generator_loss(self, batch):
        loss, logs = scd_terms(self.scm, batch)
        if batch["step"] >= self.options.dmd_warmup and self.options.dmd_weight > 0:
            rng, n = batch["rng"], loss.shape[0]
            x = self._student(batch, n)
            t = self.dm_times(self.schedule, n, rng).to(x.device)
            w = self.options.guidance if self.options.dmd_guidance is None else self.options.dmd_guidance
            grad, dm_logs = distribution_matching_grad(self.engine, x, t, rng.randn_like(x), batch["cond"], batch["uncond"], w, self.options.normalize)
            dmd = surrogate_loss(x, grad)
            loss = loss + self.options.dmd_weight * dmd
            logs.update(dm_logs, loss_dm=dmd.mean().item())
        return loss, logs

    def critic_loss(self, batch):
        rng, n = batch["rng"], len(batch["prompts"])
        with torch.no_grad():
            x = self._student(batch, n)
        t = self.critic_times(self.schedule, n, rng).to(x.device)
        loss = fake_score_loss(self.nets["critic"], self.schedule, self.teacher.prediction_type, x, t, rng.randn_like(x), batch["cond"], self.options.critic_loss)
        return loss, {"loss_fake": loss.mean().item()}

    def sample(self, noise, cond, uncond, steps, guidance, generator=None):
        return self.scm.sample(noise, cond, uncond, steps, guidance, generator)


@register_method("rcm", RCMOptions)
def build_rcm(options: RCMOptions, teacher, train_cfg, prompts) -> RCM:
    return RCM(options, teacher, train_cfg)

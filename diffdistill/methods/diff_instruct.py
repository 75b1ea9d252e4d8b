"""Diff-Instruct (Luo et al., NeurIPS 2023), the integral-KL special case of the engine.

Diff-Instruct minimizes the integral KL  integral w(t) KL(q_t || p_t) dt  between the generator's and
the teacher's noised distributions, with EDM's sigma ~ LogNormal(-1.2, 1.2) and w = sigma^2
(official ``training/di_loss.py``: L = sum_CHW (D_f - D_r) x / batch, both denoisers without
gradient, no normalization). That is f-distill with f = reverse KL (h = 1), every normalization off,
a summed reduction (dL/dx = D_f - D_r) and log-normal t, so it is built from
:class:`~diffdistill.methods.fdistill.FDistill` here, not rewritten.

Uni-Instruct (Wang et al., NeurIPS 2025) expands the f-divergence family along the diffusion and
writes its gradient as a weighted sum of a Diff-Instruct part and a SIM part; it recovers as
special cases Diff-Instruct and DMD (integral reverse KL; DMD2 adds a GAN), f-distill (an f-divergence
on noised distributions), SIM (general score divergences) and SiD (the Fisher divergence), so every
distribution-matching method in this package (dmd, dmd2, diff_instruct, fdistill, sim, sid) sits in
its family; kd and sft do not.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffdistill.guidance import guidance_from_options
from diffdistill.methods.base import register_method
from diffdistill.methods.fdistill import FDistill, FDistillOptions
from diffdistill.schedules import LogNormalTimesteps


@dataclass
class DiffInstructOptions:
    p_mean: float = -1.2                   # log sigma ~ N(p_mean, p_std^2), sigma = sigma_t / alpha_t (EDM)
    p_std: float = 1.2
    guidance_style: str = "cfg"            # cfg | fake_cfg | random | lsg | zero_cfg | anti_cfg (diffdistill.guidance)
    guidance: float = 1.0                  # teacher w (Diff-Instruct: none)
    fake_guidance: float = 1.0             # fake-score w in the generator loss
    fake_train_guidance: float = 1.0       # fake-score w while training it
    guidance_range: list[float] | None = None        # random: per-sample teacher w ~ U[lo, hi]
    fake_guidance_range: list[float] | None = None   # random: per-sample fake w ~ U[lo, hi]
    timesteps: list[float] | None = None   # generator timesteps; None: one step from the schedule's end
    ratio: int = 1                         # fake-score updates per generator update (Diff-Instruct: 1)
    critic_loss: str = "native"            # native (eps-MSE for SD) | x0
    critic_lora_rank: int = 0              # 0: full copy of the teacher as the fake score
    student_lora_rank: int = 0             # >0: the student is LoRA adapters on the teacher's frozen weights
    gan_weight: float = 0.0                # DMD2's GAN term on real images (not in Diff-Instruct); 0: data-free
    gan_critic_weight: float = 1e-2        # weight of the discriminator loss added to the fake score's
    gan_features: str = "critic"           # critic (the fake score's encoder) | teacher


@register_method("diff_instruct", DiffInstructOptions)
def build_diff_instruct(options: DiffInstructOptions, teacher, train_cfg, prompts) -> FDistill:
    method = FDistill(FDistillOptions(
        divergence="rkl", gan_weight=options.gan_weight, gan_critic_weight=options.gan_critic_weight, gan_features=options.gan_features,
        ratio_normalization=False, weight_normalization=False, normalize=False, reduction="sum",
        timesteps=options.timesteps, ratio=options.ratio, critic_loss=options.critic_loss, critic_lora_rank=options.critic_lora_rank,
        student_lora_rank=options.student_lora_rank,
    ), teacher)
    method.guidance = guidance_from_options(options)
    method.dm_times = method.critic_times = LogNormalTimesteps(options.p_mean, options.p_std)
    return method

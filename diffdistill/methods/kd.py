"""Knowledge distillation baseline (Luhman & Luhman 2021): regress the one-step student on the
teacher's deterministic ODE noise -> sample pairs, ``L = ||G(z) - ODE_teacher(z)||^2``.

No critic, no distribution matching: the row every method in a benchmark is read against.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffdistill.generator import check_timesteps, sample_student, student_denoiser
from diffdistill.methods.base import register_method
from diffdistill.methods.dmd import make_regression_pairs, regression_loss


@dataclass
class KDOptions:
    guidance: float = 1.0                  # teacher CFG used to make the pairs
    t_init: float | None = None            # the student's timestep; None: the schedule's end
    pairs: int = 1024                      # teacher ODE pairs kept in memory
    ode_steps: int = 50                    # DDIM steps of the teacher ODE sampler
    student_lora_rank: int = 0             # >0: the student is LoRA adapters on the teacher's frozen weights


class KD:
    phases = ("generator",)
    default_sample_steps = 1

    def __init__(self, options: KDOptions, teacher, prompts, seed: int):
        self.options, self.teacher, self.schedule = options, teacher, teacher.schedule
        self.timesteps = check_timesteps(self.schedule, [self.schedule.t_max if options.t_init is None else options.t_init])
        self.nets = {"generator": student_denoiser(teacher, options.student_lora_rank)}
        self.pairs = make_regression_pairs(teacher, prompts, options.pairs, options.ode_steps, options.guidance, seed)

    def phase(self, step: int) -> str:
        return "generator"

    def phase_nets(self, phase: str) -> list[str]:
        return ["generator"]

    def generator_loss(self, batch):
        loss = regression_loss(self.nets["generator"], self.pairs, self.timesteps[0], batch["rng"], len(batch["prompts"]))
        return loss, {"loss_reg": loss.mean().item()}

    def critic_loss(self, batch):
        raise RuntimeError("kd has no critic phase")

    def sample(self, noise, cond, uncond, steps, guidance, generator=None):
        return sample_student(self.nets["generator"], self.schedule, self.timesteps, noise, cond, generator)


@register_method("kd", KDOptions)
def build_kd(options: KDOptions, teacher, train_cfg, prompts) -> KD:
    return KD(options, teacher, prompts, train_cfg.seed)

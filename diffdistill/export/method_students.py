"""What each method's student is at export: which saved nets hold it, its timesteps, how many steps
it samples by default, the backbone its weights load into, and what its sampler adds on top.

* Most methods (dmd, dmd2, kd, sid, ...): one ``generator`` net; ``timesteps`` or ``t_init``.
* ``cd``: one ``generator`` that is an LCM consistency function (:mod:`diffdistill.methods.lcm_student`):
  its UNet carries the guidance input ``time_cond_proj_dim``, its sampler applies LCM's boundary
  condition, and it samples K steps out of its N-point grid (LCMScheduler's spacing).
* ``phased_dmd``: one net per expert (``expert_k``, or its EMA ``ema_k``), each running one
  deterministic (DDIM) step of the chain (:mod:`diffdistill.methods.phased_dmd`).
* ``meanflow``: one ``generator`` with a second time input h = t - r. Its K-step sampler (K =
  ``method.sample_steps``) steps uniformly in flow time, so h = t_max / K at every step: that constant
  input folds into a bias (:func:`~diffdistill.backbones.interval_embed.fold_interval_input`) and the
  student becomes the teacher's class again. Its step z_r = z_t - (t - r) u is DDIM's deterministic step
  (u = (z - x0)/t), which FlowMatchEuler (not stochastic) runs for flow teachers, and which at K = 1 is
  x0 itself (a VP teacher's LCMScheduler step); a VP teacher's K > 1 times are no integer timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffdistill.export.errors import ExportError
from diffdistill.generator import check_timesteps
from diffdistill.methods.base import method_options
from diffdistill.methods.consistency import skip_grid
from diffdistill.methods.lcm_student import ConsistencyFunction, guidance_embedding, guidance_student
from diffdistill.methods.meanflow import flow_frame, flow_range, interval_student


@dataclass
class Consistency:
    """LCM's boundary condition and guidance input, as cd's sampler applies them."""

    embedding_dim: int        # time_cond_proj_dim; 0: no guidance input (w is baked in)
    guidance: float           # the w an export samples with (pipelines take it as guidance_scale)
    guidance_range: tuple     # the w range the student was trained on
    sigma_data: float
    timestep_scaling: float

    def wrap(self, denoiser) -> torch.nn.Module:
        return ConsistencyFunction(denoiser, self.embedding_dim, self.guidance, self.sigma_data, self.timestep_scaling)


@dataclass
class StudentSpec:
    nets: list                # per backbone, in sampling order: (raw state name, EMA state name)
    timesteps: list           # the timesteps K-step sampling picks from (by index, as LCMScheduler does)
    default_steps: int
    template: torch.nn.Module | None = None   # the module the weights load into; None: the teacher's backbone
    consistency: Consistency | None = None
    experts: bool = False     # one backbone per timestep (phased_dmd)
    interval: torch.Tensor | None = None  # meanflow: the embedding of its constant h, folded into the weights; steps deterministically


def student_timesteps(method_spec: dict, schedule) -> list[float]:
    """The student's own timesteps from its method options: ``timesteps`` (DMD2, SiD), ``t_init``
    (DMD, KD), else one step from the schedule's end. Methods that train no few-step student
    (``sft`` fine-tunes the teacher itself) are refused."""
    name, options = method_options(method_spec)
    listed = getattr(options, "timesteps", None)
    if isinstance(listed, list) and listed:
        timesteps = listed
    elif hasattr(options, "t_init") or (hasattr(options, "timesteps") and listed is None):
        t_init = getattr(options, "t_init", None)
        timesteps = [schedule.t_max if t_init is None else t_init]
    else:
        raise ExportError(
            f"method {name!r} trains no few-step student (it fine-tunes the teacher, sampled with the teacher's "
            "own many-step scheduler); export a distillation run (dmd, dmd2, kd, sid, ...)"
        )
    return check_timesteps(schedule, timesteps)


def _cd(options, teacher, cfg) -> StudentSpec:
    lo, hi = (list(options.guidance) * 2)[:2] if len(options.guidance) == 1 else options.guidance
    if options.guidance_embedding_dim > 0:
        w = cfg.sample_guidance if lo <= cfg.sample_guidance <= hi else (lo + hi) / 2  # a w inside the trained range
    else:
        w = lo  # no guidance input: the sampler conditions on nothing, and the run's w is baked in
    consistency = Consistency(options.guidance_embedding_dim, float(w), (lo, hi), options.sigma_data, options.timestep_scaling)
    template = guidance_student(teacher, options.guidance_embedding_dim, "zero").backbone  # the teacher plus cond_proj
    if options.timesteps:
        timesteps = check_timesteps(teacher.schedule, options.timesteps)
        return StudentSpec([("net-generator", "ema-generator")], timesteps, len(timesteps), template, consistency)
    grid, _ = skip_grid(teacher.schedule, options.ode_grid)  # K steps are read from the whole reversed grid
    timesteps = [float(t) for t in grid.flip(0)]
    return StudentSpec([("net-generator", "ema-generator")], timesteps, min(options.sample_steps, len(timesteps)), template, consistency)


def _phased(options, teacher) -> StudentSpec:
    timesteps = check_timesteps(teacher.schedule, options.timesteps or teacher.schedule.sampling_timesteps(2))
    nets = [(f"net-expert_{k}", f"ema-ema_{k}") for k in range(len(timesteps))]  # ema_k (an EMA target, saved as ema-ema_k): what sampling deploys
    return StudentSpec(nets, timesteps, len(timesteps), experts=True)


def _meanflow(options, teacher) -> StudentSpec:
    k, schedule = options.sample_steps, teacher.schedule
    if schedule.kind != "flow" and k > 1:
        raise ExportError(f"this meanflow student samples {k} steps at uniform flow times, which on a VP teacher are no integer "
                          "timesteps (diffusers' schedulers need them): export a run trained with method.sample_steps=1, or sample with diffdistill")
    hi = flow_range(schedule)[1]
    times = torch.linspace(hi, 0.0, k + 1, dtype=torch.float64)[:-1]
    timesteps = [schedule.t_max] + [float(t) for t in flow_frame(schedule, times[1:])[0]]  # the first is the schedule's end
    interval = guidance_embedding(torch.tensor([hi / k * options.interval_scale / 1000], dtype=torch.float64), options.interval_embedding_dim)
    template = interval_student(teacher, options.interval_embedding_dim).backbone
    return StudentSpec([("net-generator", "ema-generator")], timesteps, k, template, interval=interval)


def student_spec(method_spec: dict, teacher, cfg) -> StudentSpec:
    name, options = method_options(method_spec)
    if name == "meanflow":
        return _meanflow(options, teacher)
    if name == "cd":
        return _cd(options, teacher, cfg)
    if name == "phased_dmd":
        return _phased(options, teacher)
    timesteps = student_timesteps(method_spec, teacher.schedule)
    return StudentSpec([("net-generator", "ema-generator")], timesteps, len(timesteps))

"""sCM: continuous-time consistency distillation in TrigFlow (Lu & Song 2024).

TrigFlow, the teacher's ODE dx^/ds and the student's velocity F: :mod:`diffdistill.methods.trigflow`.

**sCD** (sCM's continuous-time objective with its tangent warmup, tangent normalization and adaptive weighting):

    dx^/ds  = (cos s x^ - D_teacher^w) / sin s                        teacher ODE, guided
    g       = -cos^2 s (sigma_d F- - dx^/ds) - r cos s sin s (x^ + sigma_d dF-/ds)
    g      <- g / (||g|| + c)                                           c = 0.1
    L       = e^{-u(s)} mean(F_theta - F- - g)^2 + u(s)                 u: the adaptive-weight head

F- = sg(F_theta); dF-/ds is the total derivative along the teacher's ODE, one ``torch.func.jvp`` of
the student with tangents cos s sin s (dx^/ds, 1) (sCM Sec. 5.1); r rises from 0 to 1 over
``tangent_warmup`` steps. The gradient of L at F = F- is -(2/D) e^{-u} g^T dF/dtheta, the
continuous-time consistency gradient with the prior weighting 1/(sigma_d tan s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffdistill.generator import check_timesteps, sample_student, student_denoiser
from diffdistill.methods.base import register_method
from diffdistill.methods.trigflow import (
    LogVarHead,
    TrigFlowTimes,
    check_jvp_precision,
    teacher_tangent,
    trigflow_velocity,
    trigflow_x0,
    use_jvp_attention,
    velocity_and_tangent,
)
from diffdistill.param import append_dims
from diffdistill.scores import ScoreEngine

TANGENT_NORMS = ("l2", "rms", "none")


# ---- the loss ----------------------------------------------------------------------------------


def scm_tangent(F_minus, dF_scaled, x_hat, s, dx_ds, sigma_data: float, r: float) -> torch.Tensor:
    """g = -cos^2 s (sigma_d F- - dx^/ds) - r (cos s sin s x^ + sigma_d cos s sin s dF-/ds).

    ``dF_scaled`` is cos s sin s dF-/ds, as :func:`velocity_and_tangent` returns it; r is the tangent
    warmup, 0 -> 1 (sCM).
    """
    cos, sin = (append_dims(v, x_hat.ndim) for v in (torch.cos(s), torch.sin(s)))
    return -cos**2 * (sigma_data * F_minus - dx_ds) - r * (cos * sin * x_hat + sigma_data * dF_scaled)


def normalize_tangent(g: torch.Tensor, kind: str = "l2", c: float = 0.1) -> torch.Tensor:
    """sCM's tangent normalization g / (||g|| + c) (``l2``, the paper and rCM's code); ``rms`` divides by
    ||g|| / sqrt(D) + c instead (FastGen); ``none`` leaves g."""
    if kind not in TANGENT_NORMS:
        raise ValueError(f"tangent_norm={kind!r}: choose one of {', '.join(TANGENT_NORMS)}")
    if kind == "none":
        return g
    norm = g.flatten(1).norm(dim=1)
    if kind == "rms":
        norm = norm / math.sqrt(g[0].numel())
    return g / append_dims(norm + c, g.ndim)


def scm_loss(F, F_minus, g, logvar: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample e^{-u} mean(F - F- - g)^2 + u (sCM's adaptive weighting, w = -u), or the plain mean."""
    squared = (F - F_minus - g).square().flatten(1).mean(1)
    return squared if logvar is None else torch.exp(-logvar) * squared + logvar


# ---- the method --------------------------------------------------------------------------------


@dataclass
class SCMOptions:
    guidance: float = 1.0                  # teacher CFG w in u + w (c - u) for dx^/ds (rCM: 5 in the same form)
    sigma_data: float = 0.5                # TrigFlow's sigma_d, the data's std (sCM: 0.5 on EDM2's std-0.5 latents; rCM and SD latents: 1.0)
    p_mean: float = -1.0                   # training sigma = sigma_d tan s ~ lognormal(p_mean, p_std) (sCM, Appendix G)
    p_std: float = 1.4
    sigma_min: float = 0.002               # the lognormal's truncation, intersected with the schedule's range
    sigma_max: float = 80.0
    tangent_warmup: int = 10000            # steps over which r rises from 0 to 1 (sCM: 10k; rCM: 1000)
    tangent_norm: str = "l2"               # l2: g / (||g|| + c) (sCM, rCM) | rms: ||g|| / sqrt(D) (FastGen) | none
    tangent_norm_c: float = 0.1
    adaptive_weighting: bool = True        # learned e^{-u(s)} weight and + u (sCM); false: weight 1
    timesteps: list[float] | None = None   # sampling timesteps in the schedule's units; None: one step from its end


class SCM:
    phases = ("generator",)

    def __init__(self, options: SCMOptions, teacher, train_cfg):
        check_jvp_precision(train_cfg)
        self.options, self.teacher, self.schedule = options, teacher, teacher.schedule
        self.timesteps = check_timesteps(self.schedule, options.timesteps or [self.schedule.t_max])
        self.default_sample_steps = len(self.timesteps)
        self.nets = {"generator": student_denoiser(teacher)}
        use_jvp_attention(self.nets["generator"].backbone)
        if options.adaptive_weighting:
            self.nets["logvar"] = LogVarHead(options.sigma_data)
        self.engine = ScoreEngine(teacher, self.nets)
        self.times = TrigFlowTimes(options.p_mean, options.p_std, options.sigma_min, options.sigma_max, options.sigma_data)
        normalize_tangent(torch.zeros(1, 1), options.tangent_norm)  # validates the option now

    def phase(self, step: int) -> str:
        return "generator"

    def phase_nets(self, phase: str) -> list[str]:
        return [k for k in ("generator", "logvar") if k in self.nets]

    def generator_loss(self, batch):
        return scd_terms(self, batch)

    def critic_loss(self, batch):
        raise RuntimeError("sCM has no critic phase")

    def sample(self, noise, cond, uncond, steps, guidance, generator=None):
        return sample_student(self.nets["generator"], self.schedule, self.timesteps, noise, cond, generator)


def scd_terms(method, batch) -> tuple[torch.Tensor, dict]:
    """The sCD loss of one batch: data noised in TrigFlow, teacher tangent, student jvp, g, L."""
    if "x0" not in batch:
        raise ValueError("sCM distills on noised data: set data.source to imagefolder or digits")
    o, schedule, rng = method.options, method.schedule, batch["rng"]
    x0 = batch["x0"].to(torch.float64)
    s = method.times(schedule, x0.shape[0], rng)
    cos, sin = (append_dims(v, x0.ndim) for v in (torch.cos(s), torch.sin(s)))
    x_hat = cos * x0 + sin * o.sigma_data * rng.randn_like(batch["x0"]).to(torch.float64)
    with torch.no_grad():
        dx_ds = teacher_tangent(method.engine, x_hat, s, batch["cond"], batch["uncond"], o.guidance, o.sigma_data)
    student = method.nets["generator"]
    F_minus, dF = velocity_and_tangent(student, schedule, method.teacher.prediction_type, x_hat, s, batch["cond"], o.sigma_data, dx_ds)
    r = min(1.0, batch["step"] / o.tangent_warmup) if o.tangent_warmup > 0 else 1.0
    g = normalize_tangent(scm_tangent(F_minus, dF, x_hat, s, dx_ds, o.sigma_data, r), o.tangent_norm, o.tangent_norm_c)
    F = trigflow_velocity(trigflow_x0(student, schedule, method.teacher.prediction_type, x_hat, s, batch["cond"], o.sigma_data), x_hat, s, o.sigma_data)
    logvar = method.nets["logvar"](s) if "logvar" in method.nets else None
    loss = scm_loss(F, F_minus, g, logvar)
    logs = {"loss_scm": loss.mean().item(), "tangent_norm": g.flatten(1).norm(dim=1).mean().item(), "tangent_warmup_r": r}
    return loss.float(), logs


@register_method("scm", SCMOptions)
def build_scm(options: SCMOptions, teacher, train_cfg, prompts) -> SCM:
    return SCM(options, teacher, train_cfg)

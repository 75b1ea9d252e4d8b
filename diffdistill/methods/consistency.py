"""CD: latent consistency distillation, as LCM does it (Luo et al. 2023; Song et al. 2023).

The student is a consistency function with the boundary condition built in (Song et al.'s skip parameterization, as LCM uses it):

    f_theta(x, t, w) = c_skip(t) x + c_out(t) D_theta(x, t, w)
    c_skip(t) = sigma_d^2 / ((lam t)^2 + sigma_d^2),   c_out(t) = lam t / sqrt((lam t)^2 + sigma_d^2)

with t the model timestep, sigma_d = 0.5 and lam = 10 (LCM's "timestep scaling"), so f(x, 0) = x.
One step (LCM's latent consistency distillation, as the diffusers script ``train_lcm_distill_sd_wds.py`` runs it):

    tau_i = (i + 1) T / N - 1 (SD: 19, 39, ..., 999),  t_n = max(tau_i - k, 0),  k = T / N = 20
    w ~ U[w_min, w_max];   x = alpha_tau x0 + sigma_tau eps   (x0: a data batch)
    x_n = Phi(x, tau -> t_n; D_teacher^w)     teacher ODE step: DDIM, Euler or Heun
    L = d(f_theta(x, tau, w), sg f_target(x_n, t_n, w))     (the consistency distillation loss)

d is the pseudo-Huber mean(sqrt(delta^2 + c^2) - c) with c = 0.001, or L2. ``f_target`` is an EMA
of the student (decay 0.95); the trainer calls :meth:`ConsistencyDistillation.after_step` after
each optimizer step to move it, and checkpoints it with the run (``ema_targets``).

Guidance: LCM samples omega ~ U[5, 15] in its ``c + omega (c - u)`` form, which is our
``u + w (c - u)`` with w = omega + 1, so our default range is [6, 16]. The student sees omega = w - 1
through LCM's sinusoidal embedding, an input a UNet student gets with PyTorch's default Linear
initialization as diffusers' script does, or at zero so that it starts as the teacher
(``guidance_embedding_init``, :mod:`diffdistill.methods.lcm_student`). Backbones without such an input
take one fixed w.
The teacher's ODE step Phi: :mod:`diffdistill.methods.teacher_ode`.

Sampling (LCMScheduler): ``steps`` timesteps evenly taken from the reversed grid (4 steps: 999, 759,
499, 259), each step f(x_t, t) re-noised with fresh noise to the next.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from diffdistill.ema import lerp_parameters
from diffdistill.generator import check_timesteps, sample_student
from diffdistill.methods.base import register_method
from diffdistill.methods.lcm_student import ConsistencyFunction, consistency_output, guidance_student, with_guidance
from diffdistill.methods.teacher_ode import teacher_ode_step
from diffdistill.schedules import add_noise
from diffdistill.scores import ScoreEngine

DISTANCES = ("huber", "l2")


# ---- the loss ----------------------------------------------------------------------------------


def consistency_distance(f: torch.Tensor, target: torch.Tensor, distance: str = "huber", huber_c: float = 1e-3) -> torch.Tensor:
    """Per-sample mean of LCM's elementwise pseudo-Huber sqrt(delta^2 + c^2) - c, or of delta^2."""
    delta = (f - target).float()
    if distance == "huber":
        return (torch.sqrt(delta.square() + huber_c**2) - huber_c).flatten(1).mean(1)
    if distance == "l2":
        return delta.square().flatten(1).mean(1)
    raise ValueError(f"distance={distance!r}: choose one of {', '.join(DISTANCES)}")


# ---- LCM's time grid ---------------------------------------------------------------------------


def skip_grid(schedule, num_points: int) -> tuple[torch.Tensor, float]:
    """LCM's teacher grid and skip k: VP tau_i = (i+1) T/N - 1 (19, 39, ..., 999), k = T/N; flow tau_i = (i+1)/N, k = 1/N."""
    if schedule.kind == "vp":
        k = schedule.num_train_timesteps // num_points
        return torch.arange(1, num_points + 1, dtype=torch.float64) * k - 1, float(k)
    return torch.arange(1, num_points + 1, dtype=torch.float64) / num_points * schedule.t_max, schedule.t_max / num_points


def lcm_timesteps(grid: torch.Tensor, steps: int) -> list[float]:
    """LCMScheduler's spacing: the reversed grid read at floor(linspace(0, N, steps)) (4 steps: 999, 759, 499, 259)."""
    if not 1 <= steps <= len(grid):
        raise ValueError(f"{steps} sampling steps on a {len(grid)}-point grid: choose 1 to {len(grid)}")
    index = torch.linspace(0, len(grid), steps + 1, dtype=torch.float64)[:-1].floor().long()
    return [float(t) for t in grid.flip(0)[index]]


# ---- the method --------------------------------------------------------------------------------


@dataclass
class CDOptions:
    guidance: list[float] = field(default_factory=lambda: [6.0, 16.0])  # teacher w ~ U[lo, hi] in u + w (c - u) (LCM's omega in [5, 15])
    guidance_embedding_dim: int = 256      # LCM's time_cond_proj_dim; 0: no w input (then guidance must be one value)
    guidance_embedding_init: str = "default"  # default: PyTorch's Linear init, as diffusers' LCM script leaves it | zero: start as the teacher
    ode_grid: int = 50                     # N teacher grid points; skip k = T/N (LCM: 50, k = 20)
    solver: str = "ddim"                   # teacher ODE step: ddim | euler | heun
    distance: str = "huber"                # huber (LCM, c = 0.001) | l2
    huber_c: float = 1e-3
    target_ema: float = 0.95               # EMA decay of the target network (LCM: 0.95); 0: target = student, no gradient
    sigma_data: float = 0.5                # boundary condition's sigma_d (LCM)
    timestep_scaling: float = 10.0         # boundary condition's scale on t (LCM)
    timesteps: list[float] | None = None   # sampling timesteps; None: LCMScheduler's spacing for the requested steps
    sample_steps: int = 4                  # default sampling steps (1 to 8 are typical)


class ConsistencyDistillation:
    phases = ("generator",)

    def __init__(self, options: CDOptions, teacher):
        w_range = list(options.guidance) * 2 if len(options.guidance) == 1 else list(options.guidance)
        if len(w_range) != 2 or w_range[0] > w_range[1]:
            raise ValueError(f"method.guidance={options.guidance}: give [w_min, w_max] (or one value)")
        lo, hi = w_range
        if options.guidance_embedding_dim <= 0 and lo != hi:
            raise ValueError(f"method.guidance={options.guidance} is a range, but the student has no guidance input "
                             "(guidance_embedding_dim=0): give one value")
        if options.target_ema < 0 or options.target_ema >= 1:
            raise ValueError(f"method.target_ema={options.target_ema} must be in [0, 1)")
        self.options, self.teacher, self.schedule = options, teacher, teacher.schedule
        self.w_range = (lo, hi)
        self.grid, self.skip = skip_grid(self.schedule, options.ode_grid)
        self.timesteps = check_timesteps(self.schedule, options.timesteps) if options.timesteps else None
        self.default_sample_steps = len(self.timesteps) if self.timesteps else options.sample_steps
        self.nets = {"generator": guidance_student(teacher, options.guidance_embedding_dim, options.guidance_embedding_init)}
        self.ema_targets = {}
        if options.target_ema > 0:
            self.nets["target"] = copy.deepcopy(self.nets["generator"]).requires_grad_(False)
            self.ema_targets["target"] = self.nets["target"]
        self.engine = ScoreEngine(teacher, self.nets)

    def phase(self, step: int) -> str:
        return "generator"

    def phase_nets(self, phase: str) -> list[str]:
        return ["generator"]

    def _f(self, net, x, t, cond, w):
        cond = with_guidance(cond, w, self.options.guidance_embedding_dim, x.shape[0], x.device)
        return consistency_output(net, x, t, cond, self.options.sigma_data, self.options.timestep_scaling)

    def generator_loss(self, batch):
        if "x0" not in batch:
            raise ValueError("consistency distillation noises data: set data.source to imagefolder or digits")
        rng, x0 = batch["rng"], batch["x0"]
        n, device = x0.shape[0], x0.device
        tau = self.grid[rng.randint(0, len(self.grid), (n,)).cpu()].to(device)
        t_n = (tau - self.skip).clamp(min=self.schedule.t_min)
        lo, hi = self.w_range
        w = lo if lo == hi else lo + (hi - lo) * rng.rand((n,))
        x = add_noise(self.schedule, x0, rng.randn_like(x0), tau)
        f = self._f(self.nets["generator"], x, tau, batch["cond"], w)
        with torch.no_grad():
            x_n = teacher_ode_step(self.engine, x, tau, t_n, batch["cond"], batch["uncond"], w, self.options.solver)
            target = self._f(self.nets.get("target", self.nets["generator"]), x_n, t_n, batch["cond"], w)
        loss = consistency_distance(f, target, self.options.distance, self.options.huber_c)
        return loss, {"loss_cd": loss.mean().item()}

    def critic_loss(self, batch):
        raise RuntimeError("consistency distillation has no critic phase")

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """The target follows the student: theta^- <- mu theta^- + (1 - mu) theta (LCM, mu = 0.95)."""
        if "target" not in self.nets:
            return
        lerp_parameters(self.nets["target"], getattr(self.nets["generator"], "module", self.nets["generator"]), self.options.target_ema)

    def sample(self, noise, cond, uncond, steps, guidance, generator=None):
        """LCM's multistep sampler; ``guidance`` is the w the student is conditioned on (pick one inside the
        training range: the trainer's sample grid passes ``sample_guidance``)."""
        timesteps = self.timesteps or lcm_timesteps(self.grid, steps or self.default_sample_steps)
        student = getattr(self.nets["generator"], "module", self.nets["generator"])
        w = guidance if self.options.guidance_embedding_dim > 0 else self.w_range[0]
        f = ConsistencyFunction(student, self.options.guidance_embedding_dim, w, self.options.sigma_data, self.options.timestep_scaling)
        return sample_student(f, self.schedule, timesteps, noise, cond, generator)


@register_method("cd", CDOptions)
def build_cd(options: CDOptions, teacher, train_cfg, prompts) -> ConsistencyDistillation:
    return ConsistencyDistillation(options, teacher)

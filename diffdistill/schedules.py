"""Noise schedules and timestep samplers.

A schedule maps a time ``t`` in its native units to ``(alpha_t, sigma_t)`` of
``x_t = alpha_t * x0 + sigma_t * eps``:

* :class:`VPSchedule` -- discrete variance-preserving (DDPM / Stable Diffusion). ``t`` is the
  timestep in ``[0, T-1]`` as the UNet sees it; ``alpha = sqrt(abar_t)``, ``sigma = sqrt(1 - abar_t)``,
  with ``abar`` read from a diffusers scheduler config. Fractional ``t`` interpolates ``abar`` linearly.
* :class:`FlowSchedule` -- rectified flow (SD3, Flux): ``t`` in ``[0, 1]``, ``alpha = 1 - t``,
  ``sigma = t``; the network sees ``t * num_train_timesteps``. SD3's resolution shift
  ``t' = s t / (1 + (s - 1) t)`` (Esser et al. 2024, eq. 23) is applied by :meth:`FlowSchedule.shift`.
  Flux's resolution-dependent ("dynamic") shift is that form too, with ``s = exp(mu)`` and ``mu``
  linear in the image's token count (``FluxPipeline.calculate_shift``); Sana's DPM-Solver
  ``flow_shift`` is the same form again.

Conversions run in float64 (small alpha near t = T-1 loses digits in float32) and return the
requested dtype. Samplers draw from an ``rng`` with ``rand(shape)`` / ``randn(shape)``
(see :mod:`diffdistill.randomness`) so data-parallel runs draw the same numbers as one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from diffdistill.param import append_dims


class VPSchedule:
    kind = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.num_train_timesteps = len(self.alphas_cumprod)
        self.t_min, self.t_max = 0.0, float(self.num_train_timesteps - 1)

    @classmethod
    def from_scheduler_config(cls, config) -> "VPSchedule":
        """Reads ``abar`` the way diffusers does, from any DDPM/DDIM/Euler/... scheduler config."""
        config = dict(config)
        if config.get("prediction_type") == "flow_prediction" or "shift" in config:
            raise ValueError("this scheduler config describes a flow-matching model; use FlowSchedule")
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        ddpm = DDPMScheduler(**{k: config[k] for k in keys if config.get(k) is not None})
        return cls(ddpm.alphas_cumprod)

    def _abar(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float64).clamp(self.t_min, self.t_max)
        table = self.alphas_cumprod.to(t.device)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        frac = t - lo
        return table[lo] * (1 - frac) + table[hi] * frac

    def alpha(self, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        return self._abar(t).sqrt().to(dtype)

    def sigma(self, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        return (1 - self._abar(t)).sqrt().to(dtype)

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def t_from_snr_ratio(self, ratio: torch.Tensor) -> torch.Tensor:
        """The fractional timestep whose sigma/alpha (EDM's sigma) is ``ratio``; exact inverse of
        :meth:`alpha` / :meth:`sigma` (both interpolate abar linearly), clamped to [0, T-1]."""
        abar_target = 1 / (1 + ratio.to(torch.float64) ** 2)
        table = self.alphas_cumprod.to(ratio.device)  # decreasing in t
        abar_target = abar_target.clamp(table[-1], table[0])
        hi = torch.searchsorted(-table, -abar_target).clamp(1, self.num_train_timesteps - 1)
        lo = hi - 1
        return lo + (abar_target - table[lo]) / (table[hi] - table[lo])

    def sampling_timesteps(self, num_steps: int) -> list[float]:
        """'trailing' spacing (Lin et al. 2024): 1000 steps, 4 -> [999, 749, 499, 249], as DMD2 uses."""
        step = self.num_train_timesteps / num_steps
        return [float(round(self.num_train_timesteps - i * step) - 1) for i in range(num_steps)]


class FlowSchedule:
    kind = "flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        self.num_train_timesteps = num_train_timesteps
        self.shift_factor = shift
        # sigma = t = 1 is pure noise, where x0 = x_t - u is still well defined; t = 0 is data.
        self.t_min, self.t_max = 0.0, 1.0

    @classmethod
    def from_scheduler_config(cls, config, image_tokens: int | None = None) -> "FlowSchedule":
        """``image_tokens``: the backbone's token count at the teacher's resolution, which a dynamic shift
        (``use_dynamic_shifting``, Flux) is read at."""
        shift = float(config.get("flow_shift", 1.0) if config.get("use_flow_sigmas") else config.get("shift", 1.0))
        if config.get("use_dynamic_shifting"):
            if image_tokens is None:
                raise ValueError("this scheduler shifts by resolution (use_dynamic_shifting): give the image's token count")
            shift = dynamic_shift(config, image_tokens)
        return cls(int(config.get("num_train_timesteps", 1000)), shift)

    def shift(self, t: torch.Tensor) -> torch.Tensor:
        s = self.shift_factor
        return s * t / (1 + (s - 1) * t)

    def alpha(self, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        return (1 - t.to(torch.float64)).to(dtype)

    def sigma(self, t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        return t.to(torch.float64).to(dtype)

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.num_train_timesteps

    def t_from_snr_ratio(self, ratio: torch.Tensor) -> torch.Tensor:
        ratio = ratio.to(torch.float64)
        return ratio / (1 + ratio)

    def sampling_timesteps(self, num_steps: int) -> list[float]:
        ts = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
        return [float(t) for t in self.shift(ts)]


def dynamic_shift(config, image_tokens: int) -> float:
    """The shift s of a resolution-dependent schedule: mu linear in the token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as FluxPipeline's
    ``calculate_shift``; the scheduler's exponential time shift is then ours with s = exp(mu)
    (its linear one, with s = mu)."""
    lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    mu = base + (top - base) * (image_tokens - lo) / (hi - lo)
    return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu


Schedule = VPSchedule | FlowSchedule


def schedule_from_scheduler_config(config, image_tokens: int | None = None) -> Schedule:
    """Picks VP or flow from a diffusers scheduler config: ``FlowMatch*`` class names, or a DPM-Solver
    with flow sigmas (Sana), mean flow."""
    flow_sigmas = config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction"
    if "FlowMatch" in str(config.get("_class_name", "")) or flow_sigmas or "shift" in config and "beta_start" not in config:
        return FlowSchedule.from_scheduler_config(config, image_tokens)
    return VPSchedule.from_scheduler_config(config)


def add_noise(schedule: Schedule, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = alpha_t x0 + sigma_t eps, computed in float32 from float64 coefficients."""
    alpha = append_dims(schedule.alpha(t), x0.ndim)
    sigma = append_dims(schedule.sigma(t), x0.ndim)
    return alpha * x0 + sigma * eps


# ---- timestep samplers -------------------------------------------------------------------------


@dataclass
class UniformTimesteps:
    """t ~ U[lo, hi] in the schedule's units; ``integer`` rounds down as DMD2's U{20..980} does."""

    lo: float | None = None
    hi: float | None = None
    integer: bool = False

    def __call__(self, schedule: Schedule, n: int, rng) -> torch.Tensor:
        lo = schedule.t_min if self.lo is None else self.lo
        hi = schedule.t_max if self.hi is None else self.hi
        if self.integer:
            return (lo + rng.rand((n,)) * (hi - lo + 1)).floor().clamp(max=hi)
        return lo + rng.rand((n,)) * (hi - lo)


@dataclass
class LogNormalTimesteps:
    """EDM's sigma/alpha ~ exp(N(p_mean, p_std^2)) (Karras et al. 2022, Table 1), mapped to t."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def __call__(self, schedule: Schedule, n: int, rng) -> torch.Tensor:
        ratio = (self.p_mean + self.p_std * rng.randn((n,))).exp()
        return schedule.t_from_snr_ratio(ratio).to(torch.float32)


@dataclass
class LogitNormalTimesteps:
    """SD3's t = sigmoid(N(m, s^2)) (Esser et al. 2024, eq. 19), then the schedule's shift if flow."""

    mean: float = 0.0
    std: float = 1.0

    def __call__(self, schedule: Schedule, n: int, rng) -> torch.Tensor:
        u = torch.sigmoid(self.mean + self.std * rng.randn((n,)))
        if isinstance(schedule, FlowSchedule):
            return schedule.shift(u)
        return u * schedule.t_max


@dataclass
class ShiftedUniformTimesteps:
    """rCM's ``UniformShift``: u ~ U[0, 1), r = shift u / (1 + (shift - 1) u), TrigFlow time
    atan(r / (1 - r)), i.e. sigma/alpha = shift u / (1 - u) (median ``shift``), mapped to t and
    clamped at the schedule's end (NVlabs/rcm ``timestep_utils.py``; shift 5 for its DMD term)."""

    shift: float = 5.0

    def __call__(self, schedule: Schedule, n: int, rng) -> torch.Tensor:
        u = rng.rand((n,)).double()
        return schedule.t_from_snr_ratio(self.shift * u / (1 - u)).clamp(max=schedule.t_max).to(torch.float32)


TIMESTEP_SAMPLERS = {"uniform": UniformTimesteps, "lognormal": LogNormalTimesteps, "logit_normal": LogitNormalTimesteps,
                     "shifted_uniform": ShiftedUniformTimesteps}


def make_timestep_sampler(name: str, **params):
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(f"unknown timestep sampler {name!r}; choose one of {', '.join(TIMESTEP_SAMPLERS)}")
    return TIMESTEP_SAMPLERS[name](**params)


def sigma_alpha_ratio(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """EDM's sigma = sigma_t / alpha_t, handy for comparing schedules."""
    return schedule.sigma(t, torch.float64) / schedule.alpha(t, torch.float64)


__all__ = [
    "VPSchedule", "FlowSchedule", "dynamic_shift", "schedule_from_scheduler_config", "add_noise", "UniformTimesteps",
    "LogNormalTimesteps", "LogitNormalTimesteps", "ShiftedUniformTimesteps", "make_timestep_sampler", "sigma_alpha_ratio",
]

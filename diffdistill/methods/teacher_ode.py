"""One step of the teacher's probability-flow ODE, the Phi of consistency distillation.

For x_t = alpha_t x0 + sigma_t eps the teacher's guided x0 estimate D_teacher^w gives eps_hat =
(x_t - alpha_t D) / sigma_t and the ODE dx/dt = alpha_dot D + sigma_dot eps_hat; the solvers below
step it from t to t_next in the schedule's own units (VP or flow).
"""

from __future__ import annotations

import torch

from diffdistill.param import append_dims
from diffdistill.scores import ScoreEngine

SOLVERS = ("ddim", "euler", "heun")


def _coefficients(schedule, t, ndim):
    return append_dims(schedule.alpha(t), ndim), append_dims(schedule.sigma(t), ndim)


def _rates(schedule, t, ndim):
    """(d alpha/dt, d sigma/dt) by a central difference, one-sided at the ends of the range."""
    h = 5e-4 * (schedule.t_max - schedule.t_min)
    lo, hi = (t - h).clamp(min=schedule.t_min), (t + h).clamp(max=schedule.t_max)
    span = append_dims((hi - lo).float(), ndim)
    (a_lo, s_lo), (a_hi, s_hi) = _coefficients(schedule, lo, ndim), _coefficients(schedule, hi, ndim)
    return (a_hi - a_lo) / span, (s_hi - s_lo) / span


def teacher_ode_step(engine: ScoreEngine, x, t, t_next, cond, uncond, w, solver: str = "ddim"):
    """One step of the teacher's probability-flow ODE from t to t_next, with guided D_teacher^w.

    * ``ddim``: x' = alpha' D + sigma' eps_hat (Song et al. 2021, Eq. 12 with eta = 0; Euler's method in
      Karras et al.'s variables x/alpha, sigma/alpha);
    * ``euler``: Euler's method in the schedule's own time, dx/dt = alpha_dot D + sigma_dot eps_hat;
    * ``heun``: Karras et al. (2022) Alg. 1's second-order correction in x/alpha, sigma/alpha
      (DDIM where sigma' = 0 or alpha = 0, as at a flow schedule's t = 1).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: choose one of {', '.join(SOLVERS)}")
    schedule = engine.teacher_denoiser.schedule
    alpha, sigma = _coefficients(schedule, t, x.ndim)
    alpha_next, sigma_next = _coefficients(schedule, t_next, x.ndim)
    x0 = engine.real(x, t, cond, uncond, w)
    eps = (x - alpha * x0) / sigma
    if solver == "euler":
        alpha_dot, sigma_dot = _rates(schedule, t, x.ndim)
        return x + append_dims((t_next - t).float(), x.ndim) * (alpha_dot * x0 + sigma_dot * eps)
    x_ddim = alpha_next * x0 + sigma_next * eps
    if solver == "ddim":
        return x_ddim
    eps_next = (x_ddim - alpha_next * engine.real(x_ddim, t_next, cond, uncond, w)) / sigma_next.clamp_min(1e-12)
    ds = sigma_next / alpha_next - sigma / alpha
    heun = alpha_next * (x / alpha + ds * (eps + eps_next) / 2)
    return torch.where((sigma_next > 0) & (alpha > 0), heun, x_ddim)  # x/alpha is undefined at flow's t = 1

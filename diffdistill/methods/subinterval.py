"""Score matching within a subinterval (s, 1] of the noise range: the math of Phased DMD (Fan et al. 2025).

Samples x_s at a boundary s (s = None: data) are noised to t > s by the conditional forward process

    x_t = alpha_{t|s} x_s + sigma_{t|s} eps,   alpha_{t|s} = alpha_t / alpha_s,   sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2,

whose marginal q_t has the score E[-eps / sigma_{t|s} | x_t], hence the unbiased x0 target D* below and
the generator's reverse-KL gradient in x_s, alpha_{t|s} alpha_t (D_fake - D_teacher^w)(x_t) / sigma_t^2.
The method (experts, stages, weightings): :mod:`diffdistill.methods.phased_dmd`.
"""

from __future__ import annotations

import torch

from diffdistill.methods.dmd import NORMALIZATIONS
from diffdistill.param import append_dims
from diffdistill.scores import ScoreEngine

WEIGHTINGS = ("eps", "x0")


def boundary_coefficients(schedule, s: torch.Tensor | float | None, like: torch.Tensor):
    """(alpha_s, sigma_s) at the boundary, with s = None meaning data (1, 0); float64, broadcastable."""
    if s is None:
        one = torch.ones(like.shape[0], dtype=torch.float64, device=like.device)
        return append_dims(one, like.ndim), append_dims(0 * one, like.ndim)
    if not torch.is_tensor(s):
        s = torch.full((like.shape[0],), float(s), dtype=torch.float64, device=like.device)
    return append_dims(schedule.alpha(s, torch.float64), like.ndim), append_dims(schedule.sigma(s, torch.float64), like.ndim)


def conditional_coefficients(schedule, s, t, like):
    """(alpha_t, sigma_t, alpha_{t|s}, sigma_{t|s}) of x_t given x_s, float64."""
    alpha_s, sigma_s = boundary_coefficients(schedule, s, like)
    alpha_t, sigma_t = append_dims(schedule.alpha(t, torch.float64), like.ndim), append_dims(schedule.sigma(t, torch.float64), like.ndim)
    alpha_ts = alpha_t / alpha_s
    # t -> s: sigma_{t|s} -> 0 (and rounds to 0 at t = s); a floor keeps D*'s 1 / sigma_{t|s} finite,
    # where the weights that carry sigma_{t|s}^2 bring each loss term back to O(eps^2).
    sigma_ts = (sigma_t**2 - alpha_ts**2 * sigma_s**2).clamp_min(1e-24).sqrt()
    return alpha_t, sigma_t, alpha_ts, sigma_ts


def subinterval_x0_target(x_t, eps, alpha_t, sigma_t, sigma_ts):
    """D* = (x_t - sigma_t^2 eps / sigma_{t|s}) / alpha_t: E[D* | x_t] is Tweedie's x0 of q_t."""
    return (x_t - sigma_t**2 * eps / sigma_ts) / alpha_t


def subinterval_score_loss(critic, schedule, x_s, s, t, eps, cond, weighting: str = "eps") -> torch.Tensor:
    """Per-sample score matching of the fake score within (s, 1] on detached expert samples x_s."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"critic_weighting={weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    x_s = x_s.detach().to(torch.float64)
    alpha_t, sigma_t, alpha_ts, sigma_ts = conditional_coefficients(schedule, s, t, x_s)
    x_t = alpha_ts * x_s + sigma_ts * eps
    target = subinterval_x0_target(x_t, eps, alpha_t, sigma_t, sigma_ts)
    weight = (sigma_ts * alpha_t / sigma_t**2) ** 2 if weighting == "eps" else (sigma_ts / sigma_t) ** 2
    return (weight * (critic(x_t.float(), t, cond).double() - target) ** 2).flatten(1).mean(1).float()


def subinterval_dm_grad(engine: ScoreEngine, x_s, s, t, eps, cond, uncond, guidance, normalize: str = "sample"):
    """alpha_{t|s} (D_fake - D_teacher^w)(x_t) / mean|x_s / alpha_s - D_teacher^w|, no gradient.

    ``normalize="none"`` leaves alpha_{t|s} (D_fake - D_teacher^w): times alpha_t / sigma_t^2 its expectation
    is the gradient in x_s of KL(q_t || p_t)."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}: choose one of {', '.join(NORMALIZATIONS)}")
    schedule = engine.teacher_denoiser.schedule
    with torch.no_grad():
        x_s = x_s.detach()
        alpha_s, _ = boundary_coefficients(schedule, s, x_s)
        _, _, alpha_ts, sigma_ts = conditional_coefficients(schedule, s, t, x_s)
        x_t = (alpha_ts * x_s + sigma_ts * eps).to(x_s.dtype)
        x0_real = engine.real(x_t, t, cond, uncond, guidance)
        x0_fake = engine.fake(x_t, t, cond, grad=False)
        grad = (alpha_ts * (x0_fake - x0_real)).to(x_s.dtype)
        if normalize != "none":
            weight = (x_s / alpha_s - x0_real).abs().flatten(1).mean(1)
            weight = (weight if normalize == "sample" else weight.mean().expand_as(weight)).clamp_min(1e-8)
            grad = grad / append_dims(weight, x_s.ndim).to(grad.dtype)
        grad = torch.nan_to_num(grad)
    return grad, {"dm_grad_norm": grad.flatten(1).norm(dim=1).mean().item()}

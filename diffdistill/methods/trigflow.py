"""TrigFlow and the jvp: what the continuous-time consistency methods (sCM, rCM) share.

**TrigFlow** (sCM, Lu & Song 2024): x^ = cos(s) x0 + sin(s) z, z ~ N(0, sigma_d^2 I), s in [0, pi/2]; the
probability-flow ODE is dx^/ds = sigma_d F(x^, s) and the consistency function
f(x^, s) = cos(s) x^ - sigma_d sin(s) F(x^, s). Any VP or flow network is a TrigFlow network: the
schedule time t with sigma_t / alpha_t = sigma_d tan s sees x_t = x^ sqrt(alpha_t^2 + (sigma_t/sigma_d)^2),
its x0 estimate D gives F = (cos(s) x^ - D) / (sigma_d sin s), and then f = D: the student samples
with the same few-step sampler as DMD2, in its own schedule. Conversions run in float64.

The jvp needs forward-mode AD through every op. PyTorch's fused SDPA kernels have none, so the
student's attention runs diffusers' math ``AttnProcessor`` on CPU (SD3's joint attention the project's
torch processor; Sana's linear attention as it is) and the project's fused-attention
processors (:func:`diffdistill.kernels.processors.use_fused_attention`) on GPU; Flux's attention (not an
``Attention``) runs diffusers' ``_native_math`` backend on both. Measured here: the jvp
fails under CPU bf16 autocast, and through gradient checkpointing when gradients are on; both are
refused with a clear error (our jvp runs under ``no_grad``, where diffusers skips checkpointing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from diffdistill import param
from diffdistill.kernels.processors import JOINT_PROCESSORS, PLAIN_PROCESSORS, FlashJointAttnProcessor, use_fused_attention
from diffdistill.param import append_dims
from diffdistill.scores import ScoreEngine

# ---- TrigFlow ----------------------------------------------------------------------------------


def trigflow_time(schedule, s: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """The schedule's t with sigma_t / alpha_t = sigma_d tan s (float64, differentiable for the jvp)."""
    return schedule.t_from_snr_ratio(sigma_data * torch.tan(s.to(torch.float64)))


def trigflow_x0(net, schedule, prediction_type: str, x_hat, s, cond, sigma_data: float) -> torch.Tensor:
    """D(x^, s) of a network of the schedule: x_t = x^ sqrt(alpha_t^2 + (sigma_t / sigma_d)^2) (= alpha_t x^ / cos s)."""
    t = trigflow_time(schedule, s, sigma_data)
    alpha, sigma = (append_dims(c, x_hat.ndim) for c in (schedule.alpha(t, torch.float64), schedule.sigma(t, torch.float64)))
    x_t = x_hat * (alpha**2 + (sigma / sigma_data) ** 2).sqrt()
    native = net(x_t, t, cond, output="native")
    return param.to_x0(prediction_type, x_t, native.to(torch.float64), alpha, sigma)


def trigflow_velocity(x0, x_hat, s, sigma_data: float) -> torch.Tensor:
    """F = (cos s x^ - D) / (sigma_d sin s), so that f = cos s x^ - sigma_d sin s F = D."""
    cos, sin = (append_dims(v, x_hat.ndim) for v in (torch.cos(s), torch.sin(s)))
    return (cos * x_hat - x0) / (sigma_data * sin)


def teacher_tangent(engine: ScoreEngine, x_hat, s, cond, uncond, guidance, sigma_data: float) -> torch.Tensor:
    """dx^/ds = sigma_d F_teacher^w = (cos s x^ - D_teacher^w) / sin s: the teacher's ODE in TrigFlow (sCD)."""
    schedule = engine.teacher_denoiser.schedule
    t = trigflow_time(schedule, s, sigma_data)
    alpha, sigma = (append_dims(c, x_hat.ndim) for c in (schedule.alpha(t, torch.float64), schedule.sigma(t, torch.float64)))
    x0 = engine.real(x_hat * (alpha**2 + (sigma / sigma_data) ** 2).sqrt(), t, cond, uncond, guidance).to(torch.float64)
    return sigma_data * trigflow_velocity(x0, x_hat, s, sigma_data)


@dataclass
class TrigFlowTimes:
    """s = arctan(sigma / sigma_d), sigma ~ lognormal(p_mean, p_std) truncated to [sigma_min, sigma_max]
    and to the schedule's own range of sigma_t / alpha_t (by inverse CDF, so no mass piles at the ends)."""

    p_mean: float
    p_std: float
    sigma_min: float
    sigma_max: float
    sigma_data: float

    def __call__(self, schedule, n: int, rng) -> torch.Tensor:
        ends = torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float64)
        ratio = schedule.sigma(ends, torch.float64) / schedule.alpha(ends, torch.float64)
        lo, hi = max(self.sigma_min, float(ratio[0])), min(self.sigma_max, float(ratio[1]))
        if not lo < hi:
            raise ValueError(f"sigma range [{self.sigma_min}, {self.sigma_max}] misses the schedule's [{float(ratio[0]):.4g}, {float(ratio[1]):.4g}]")
        normal = torch.distributions.Normal(torch.tensor(self.p_mean, dtype=torch.float64), torch.tensor(self.p_std, dtype=torch.float64))
        u_lo, u_hi = normal.cdf(torch.tensor(math.log(lo), dtype=torch.float64)), normal.cdf(torch.tensor(math.log(hi), dtype=torch.float64))
        u = u_lo + (u_hi - u_lo) * rng.rand((n,)).to(torch.float64).cpu()
        sigma = normal.icdf(u.clamp(1e-12, 1 - 1e-12)).exp().clamp(lo, hi)
        return torch.atan(sigma / self.sigma_data).to(rng.device)


class LogVarHead(nn.Module):
    """u(s), the adaptive weight's log-variance (sCM, after EDM2): random Fourier features of
    c_noise = log(sigma_d tan s) / 4, then one linear layer, zero at initialization (weight 1)."""

    def __init__(self, sigma_data: float, channels: int = 128, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.sigma_data = sigma_data
        self.register_buffer("freqs", torch.randn(channels, generator=g))
        self.register_buffer("phases", torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        c_noise = torch.log(self.sigma_data * torch.tan(s.to(torch.float64))).float() / 4
        features = torch.cos(2 * math.pi * (c_noise[:, None] * self.freqs + self.phases)) * math.sqrt(2)
        return self.linear(features).squeeze(-1).to(torch.float64)


# ---- the jvp -----------------------------------------------------------------------------------


def check_jvp_precision(train_cfg) -> None:
    """Refuses CPU mixed precision when the method is built, before the jvp would fail in training."""
    precision = getattr(train_cfg, "mixed_precision", "no")
    if precision != "no" and not torch.cuda.is_available():
        raise ValueError(f"mixed_precision={precision} on CPU: sCM's jvp (torch.func.jvp) fails under CPU autocast; set mixed_precision=no")


def check_jvp_supported(net: nn.Module, device: torch.device) -> None:
    """Refuses the two setups where forward-mode AD through a diffusers network fails deep inside torch."""
    if device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        raise RuntimeError(
            "sCM's tangent (torch.func.jvp) fails under CPU autocast: convolutions get float32 tangents and "
            f"{torch.get_autocast_dtype('cpu')} weights. Train with mixed_precision=no on CPU")
    checkpointed = [m for m in net.modules() if getattr(m, "gradient_checkpointing", False)]
    if torch.is_grad_enabled() and net.training and checkpointed:
        raise RuntimeError(
            f"sCM's tangent (torch.func.jvp) cannot run with gradients through gradient checkpointing "
            f"({type(checkpointed[0]).__name__}): the recomputation saves a different number of tensors. "
            "Run the jvp under torch.no_grad() (diffusers then skips checkpointing) or disable gradient checkpointing")


def velocity_and_tangent(net, schedule, prediction_type, x_hat, s, cond, sigma_data, dx_ds):
    """(F-, cos s sin s dF-/ds) along the teacher's ODE: one forward-mode pass, no gradient (sCM Sec. 5.1)."""
    net = getattr(net, "module", net)
    cos_sin = torch.cos(s) * torch.sin(s)

    def velocity(x_hat, s):
        return trigflow_velocity(trigflow_x0(net, schedule, prediction_type, x_hat, s, cond, sigma_data), x_hat, s, sigma_data)

    with torch.no_grad():
        check_jvp_supported(net, x_hat.device)
        return torch.func.jvp(velocity, (x_hat, s), (append_dims(cos_sin, x_hat.ndim) * dx_ds, cos_sin))


def use_jvp_attention(backbone: nn.Module) -> int:
    """Attention with forward-mode AD on every diffusers ``Attention``: the fused processors where a GPU
    is present, the math ``AttnProcessor`` on CPU. Returns how many modules were set."""
    try:  # diffusers' model modules are heavy: loaded when a student is built, not on import
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention, AttnProcessor
    except ImportError:
        return 0
    # Flux's attention is no ``Attention``: its processor dispatches to SDPA, whose math backend has forward AD
    dispatched = [m for m in backbone.modules() if isinstance(m, AttentionModuleMixin) and not isinstance(m, Attention)]
    if dispatched:
        backbone.set_attention_backend("_native_math")
    modules = [m for m in backbone.modules() if isinstance(m, Attention)]
    if modules and torch.cuda.is_available():
        installed = use_fused_attention(backbone)  # keeps Sana's cross-attention, whose SDPA call has no forward AD: math instead
        sana = [m for m in modules if type(m.processor).__name__ == "SanaAttnProcessor2_0"]
        for module in sana:
            module.set_processor(AttnProcessor())
        return installed + len(sana) + len(dispatched)
    for module in modules:  # each kind by math that computes what it computed (AttnProcessor is no joint or linear attention)
        name = type(module.processor).__name__
        if name in JOINT_PROCESSORS:  # SD3's joint text-image attention
            module.set_processor(FlashJointAttnProcessor("torch"))
        elif name in PLAIN_PROCESSORS or name == "SanaAttnProcessor2_0":  # Sana's cross-attention: plain, masked
            module.set_processor(AttnProcessor())
        # else kept: Sana's linear attention is matmuls, which have forward AD as they are
    return len(modules) + len(dispatched)

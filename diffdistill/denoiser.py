"""The one way every network is reached: ``x0 = D(x_t, t, cond)`` in float32.

Karras et al. (2022) and k-diffusion's ``Denoiser`` wrap any network as an x0 estimator; we do the
same over diffusers backbones. The backbone keeps its native prediction type (epsilon,
v_prediction, sample or flow) and :func:`diffdistill.param.to_x0` converts once, here.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from diffdistill import param
from diffdistill.backbones import backbone_kind, call_backbone
from diffdistill.param import append_dims


@contextlib.contextmanager
def lora_adapters(backbone: nn.Module, adapter: str | bool | None):
    """Runs ``backbone`` with only LoRA ``adapter`` on (False: none on; None: as it is), so one frozen
    base serves as the real score (adapters off) and carries the fake score's adapters (on).

    Sets peft's per-layer flags directly: its ``enable_adapters``/``set_adapter`` would also flip
    ``requires_grad``, which the trainer owns (it freezes nets a phase only reads)."""
    layers = [] if adapter is None else [m for m in backbone.modules() if hasattr(m, "_disable_adapters") and hasattr(m, "lora_A")]
    before = [(m._disable_adapters, m._active_adapter) for m in layers]
    for m in layers:
        m._disable_adapters = adapter is False
        if isinstance(adapter, str):
            m._active_adapter = adapter
    try:
        yield
    finally:
        for m, (disabled, active) in zip(layers, before):
            m._disable_adapters, m._active_adapter = disabled, active


class Denoiser(nn.Module):
    def __init__(self, backbone: nn.Module, schedule, prediction_type: str, adapter: str | bool | None = None):
        """``adapter``: the LoRA adapter this denoiser runs with when its backbone carries several
        uses (a teacher's own denoiser: False, its frozen weights alone); None leaves them as they are."""
        super().__init__()
        self.backbone = backbone
        self.kind = backbone_kind(backbone)
        self.schedule = schedule
        self.prediction_type = param.check_prediction_type(prediction_type)
        self.adapter = adapter

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The backbone's native output (float32), e.g. for an epsilon-MSE loss."""
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        first = next(self.backbone.parameters(), None)
        dtype = first.dtype if first is not None else x_t.dtype  # an exact (parameter-free) teacher keeps x's dtype
        cond = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in cond.items()}
        timestep = self.schedule.model_timestep(t).to(x_t.device)
        with lora_adapters(self.backbone, self.adapter):
            out = call_backbone(self.kind, self.backbone, x_t.to(dtype), timestep, cond)
        return out.to(torch.promote_types(out.dtype, torch.float32))  # at least float32; float64 stays

    def coefficients(self, t: torch.Tensor, ndim: int):
        return append_dims(self.schedule.alpha(t, torch.float64), ndim), append_dims(self.schedule.sigma(t, torch.float64), ndim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict, output: str = "x0") -> torch.Tensor:
        """x0 estimate; ``output="native"`` returns the raw prediction instead (one call, so that
        DDP, which only hooks ``forward``, synchronizes gradients of native-space losses too)."""
        t = torch.as_tensor(t, dtype=torch.float32)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        if output == "native":
            return self.raw(x_t, t, cond)
        x_t = x_t.to(torch.promote_types(x_t.dtype, torch.float32))
        alpha, sigma = (c.to(x_t) for c in self.coefficients(t, x_t.ndim))
        return param.to_x0(self.prediction_type, x_t, self.raw(x_t, t, cond), alpha, sigma)

    def native(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return native_from_x0(self.schedule, self.prediction_type, x_t, t, x0)


def native_from_x0(schedule, prediction_type: str, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Re-expresses an x0 estimate in a prediction type (the target of native-space losses)."""
    alpha = append_dims(schedule.alpha(t), x_t.ndim).to(x_t.device)
    sigma = append_dims(schedule.sigma(t), x_t.ndim).to(x_t.device)
    return param.from_x0(prediction_type, x_t.float(), x0, alpha, sigma)

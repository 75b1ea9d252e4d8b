"""The one way every network is reached: ``x0 = D(x_t, t, cond)`` in float32.

Karras et al. (2022) and k-diffusion's ``Denoiser`` wrap any network as an x0 estimator; we do the
same over diffusers backbones. The backbone keeps its native prediction type (epsilon,
v_prediction, sample or flow) and :func:`diffdistill.param.to_x0` converts once, here.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.utils.checkpoint
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from diffdistill import param
from diffdistill.backbones import backbone_kind, call_backbone, takes_guidance
from diffdistill.conditioning import with_embedded_guidance
from diffdistill.param import append_dims


def lora_layers(backbone: nn.Module) -> list[nn.Module]:
    return [m for m in backbone.modules() if hasattr(m, "_disable_adapters") and hasattr(m, "lora_A")]


@contextlib.contextmanager
def adapter_flags(layers: list[nn.Module], flags: list[tuple]):
    """Sets each LoRA layer's (disabled, active adapter) for the duration, then restores them.

    Sets peft's per-layer flags directly: its ``enable_adapters``/``set_adapter`` would also flip
    ``requires_grad``, which the trainer owns (it freezes nets a phase only reads)."""
    before = [(m._disable_adapters, m._active_adapter) for m in layers]
    for m, (disabled, active) in zip(layers, flags):
        m._disable_adapters, m._active_adapter = disabled, active
    try:
        yield
    finally:
        for m, (disabled, active) in zip(layers, before):
            m._disable_adapters, m._active_adapter = disabled, active


def lora_adapters(backbone: nn.Module, adapter: str | bool | None):
    """Runs ``backbone`` with only LoRA ``adapter`` on (False: none on; None: as it is), so one frozen
    base serves as the real score (adapters off) and carries the student's and fake score's adapters."""
    layers = [] if adapter is None else lora_layers(backbone)
    return adapter_flags(layers, [(adapter is False, adapter if isinstance(adapter, str) else m._active_adapter) for m in layers])


def adapter_checkpointing(backbone: nn.Module):
    """diffusers' ``gradient_checkpointing_func`` for a backbone that carries LoRA adapters: a block
    is recomputed in backward with the adapters set as they were in its forward. (The backward runs
    after :func:`lora_adapters` has restored them, and after other roles of the shared base ran.)"""
    layers = lora_layers(backbone)

    def checkpoint(block, *args):
        flags = [(m._disable_adapters, m._active_adapter) for m in layers]
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False,
                                                 context_fn=lambda: (contextlib.nullcontext(), adapter_flags(layers, flags)))

    return checkpoint if layers else None


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections, as diffusers' LoRA scripts


def add_lora(backbone: nn.Module, rank: int, adapter: str, alpha: float | None = None) -> None:
    """Injects LoRA ``adapter`` on the attention projections of a base whose own weights are then
    frozen (B = 0: the net starts unchanged). ``alpha`` defaults to the rank: scale 1, the
    convention the LoRA exporter merges with."""
    names = [name for name, m in backbone.named_modules() if isinstance(getattr(m, "base_layer", m), nn.Linear)]  # a LoRA layer counts
    targets = [t for t in LORA_TARGETS if any(name.endswith(t) for name in names)]
    if not targets:
        raise ValueError(f"no attention projections ({', '.join(LORA_TARGETS)}) in {type(backbone).__name__} to put LoRA on; "
                         "use a full network (lora rank 0)")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights="gaussian")
    inject_adapter_in_model(config, backbone, adapter_name=adapter)
    # The base stays frozen; this adapter trains, and so does any other already there (peft marks
    # only its active adapter trainable, but a LoRA critic and a LoRA student share one base).
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name)


def base_copy(backbone: nn.Module) -> nn.Module:
    """A deep copy of ``backbone`` without any LoRA layers (each replaced by the layer it wraps): a
    full critic copied from a teacher that already carries a LoRA student must not carry its adapters."""
    clone = copy.deepcopy(backbone)
    for name, module in list(clone.named_modules()):
        if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
            parent, _, child = name.rpartition(".")
            setattr(clone.get_submodule(parent), child, module.base_layer)
    return clone


class Denoiser(nn.Module):
    def __init__(self, backbone: nn.Module, schedule, prediction_type: str, adapter: str | bool | None = None,
                 embedded_guidance: float = 1.0):
        """``adapter``: the LoRA adapter this denoiser runs with when its backbone carries several
        uses (a teacher's own denoiser: False, its frozen weights alone); None leaves them as they are.
        ``embedded_guidance``: on a guidance-distilled backbone (Flux.1-dev), the scale its guidance input
        sees when a call's ``cond`` gives none; 1 is our "no guidance" (w = 1: the conditional model)."""
        super().__init__()
        self.backbone = backbone
        self.kind = backbone_kind(backbone)
        self.schedule = schedule
        self.prediction_type = param.check_prediction_type(prediction_type)
        self.adapter = adapter
        self.embeds_guidance = takes_guidance(backbone)
        self.embedded_guidance = embedded_guidance

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The backbone's native output (float32), e.g. for an epsilon-MSE loss."""
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        first = next(self.backbone.parameters(), None)
        dtype = first.dtype if first is not None else x_t.dtype  # an exact (parameter-free) teacher keeps x's dtype
        if self.embeds_guidance and "guidance" not in cond:
            cond = with_embedded_guidance(cond, self.embedded_guidance, x_t.shape[0], x_t.device)
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

    def owns(self, name: str) -> bool:
        """Whether parameter ``name`` is this net's own: with an adapter on a shared frozen base
        (a LoRA student or critic on the teacher's weights), only that adapter's tensors are."""
        return not isinstance(self.adapter, str) or f".{self.adapter}." in name


class OwnState:
    """A net seen through its own tensors (see :meth:`Denoiser.owns`): what a checkpoint or an EMA
    keeps of a LoRA net is its adapter, not a second copy of the teacher it shares."""

    def __init__(self, net: nn.Module):
        self.net = net

    def state_dict(self) -> dict:
        owns = getattr(self.net, "owns", lambda name: True)
        return {k: v for k, v in self.net.state_dict().items() if owns(k)}

    def load_state_dict(self, state: dict) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"checkpoint tensors do not match the net: {sorted(set(state) ^ expected)[:3]} ...")
        self.net.load_state_dict(state, strict=False)


def native_from_x0(schedule, prediction_type: str, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Re-expresses an x0 estimate in a prediction type (the target of native-space losses)."""
    alpha = append_dims(schedule.alpha(t), x_t.ndim).to(x_t.device)
    sigma = append_dims(schedule.sigma(t), x_t.ndim).to(x_t.device)
    return param.from_x0(prediction_type, x_t.float(), x0, alpha, sigma)

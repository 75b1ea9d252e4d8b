"""Adapters from diffusers models to one call, ``backbone(x_t, model_timestep, cond) -> raw output``.

``cond`` is a plain dict of tensors (see :mod:`diffdistill.conditioning`); each family reads the
keys it needs. Supported families, and the diffusers classes they wrap:

* ``unet``   -- ``UNet2DConditionModel``: SD 1.5 / 2.1, and SDXL's added text/time conditioning
  (``text_embeds``, ``time_ids``), LCM's ``timestep_cond``.
* ``dit``    -- ``DiTTransformer2DModel`` (class-conditional DiT; learned-sigma channels dropped).
* ``pixart`` -- ``PixArtTransformer2DModel`` (text-conditional DiT).
* ``sd3``    -- ``SD3Transformer2DModel`` (MMDiT, rectified flow).
"""

from __future__ import annotations

import torch

SUPPORTED_BACKBONES = {
    "UNet2DConditionModel": "unet",
    "DiTTransformer2DModel": "dit",
    "PixArtTransformer2DModel": "pixart",
    "SD3Transformer2DModel": "sd3",
}


def backbone_kind(model: torch.nn.Module) -> str:
    """The family of a backbone; a module of ours declares it with a ``backbone_kind`` attribute."""
    if isinstance(getattr(model, "backbone_kind", None), str):
        return model.backbone_kind
    name = type(model).__name__
    if name not in SUPPORTED_BACKBONES:
        raise ValueError(
            f"backbone class {name} is not supported; supported: {', '.join(SUPPORTED_BACKBONES)}"
        )
    return SUPPORTED_BACKBONES[name]


def _unet(model, x, timestep, cond):
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
    return model(
        x, timestep, encoder_hidden_states=cond["encoder_hidden_states"],
        added_cond_kwargs=added or None, timestep_cond=cond.get("timestep_cond"), return_dict=False,
    )[0]


def _dit(model, x, timestep, cond):
    out = model(x, timestep=timestep, class_labels=cond["class_labels"], return_dict=False)[0]
    # DiT predicts (eps, variance) stacked on channels; the variance half plays no part in distillation.
    return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


def _pixart(model, x, timestep, cond):
    out = model(
        x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=timestep,
        encoder_attention_mask=cond.get("encoder_attention_mask"),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
    )[0]
    return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


def _sd3(model, x, timestep, cond):
    return model(
        x, encoder_hidden_states=cond["encoder_hidden_states"],
        pooled_projections=cond["pooled_projections"], timestep=timestep, return_dict=False,
    )[0]


def _plain(model, x, timestep, cond):
    """Our own small networks (toy benchmarks): ``model(x, timestep, cond)``."""
    return model(x, timestep, cond)


_CALLS = {"unet": _unet, "dit": _dit, "pixart": _pixart, "sd3": _sd3, "plain": _plain}


def feature_module(model: torch.nn.Module) -> torch.nn.Module:
    """Where a GAN head reads features: the UNet bottleneck (DMD2), a transformer's last block,
    or a module our own networks name ``features``."""
    if getattr(model, "mid_block", None) is not None:
        return model.mid_block
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is not None and len(blocks) > 0:
        return blocks[-1]
    if isinstance(getattr(model, "features", None), torch.nn.Module):
        return model.features
    raise ValueError(
        f"a GAN head needs features, and {type(model).__name__} has no mid_block, transformer_blocks or "
        "features module to read them from; set method.gan_weight=0"
    )


def feature_modules(model: torch.nn.Module, indices: list[int] | None = None) -> list[torch.nn.Module]:
    """Several places to read features (LADD's discriminator heads on the teacher): a UNet's down
    blocks then its mid block, a transformer's blocks, or the modules our own networks list as
    ``feature_layers``. ``indices`` picks some of them (negative counts from the end); None: all."""
    if isinstance(getattr(model, "feature_layers", None), torch.nn.ModuleList):
        layers = list(model.feature_layers)
    elif getattr(model, "mid_block", None) is not None:
        layers = [*model.down_blocks, model.mid_block]
    elif getattr(model, "transformer_blocks", None) is not None and len(model.transformer_blocks) > 0:
        layers = list(model.transformer_blocks)
    else:
        raise ValueError(f"{type(model).__name__} has no down/mid blocks, transformer_blocks or feature_layers to read features from")
    if indices is None:
        return layers
    bad = [i for i in indices if not -len(layers) <= i < len(layers)]
    if bad or not indices:
        raise ValueError(f"feature layers {indices}: this backbone has {len(layers)} (indices 0..{len(layers) - 1}, or negative from the end)")
    return [layers[i] for i in indices]


def call_backbone(kind: str, model, x: torch.Tensor, timestep: torch.Tensor, cond: dict) -> torch.Tensor:
    return _CALLS[kind](model, x, timestep, cond)

"""Adapters from diffusers models to one call, ``backbone(x_t, model_timestep, cond) -> raw output``.

``cond`` is a plain dict of tensors (see :mod:`diffdistill.conditioning`); each family reads the
keys it needs. Supported families, and the diffusers classes they wrap:

* ``unet``   -- ``UNet2DConditionModel``: SD 1.5 / 2.1, and SDXL's added text/time conditioning
  (``text_embeds``, ``time_ids``), LCM's ``timestep_cond``.
* ``dit``    -- ``DiTTransformer2DModel`` (class-conditional DiT; learned-sigma channels dropped).
* ``pixart`` -- ``PixArtTransformer2DModel`` (text-conditional DiT).
* ``sd3``    -- ``SD3Transformer2DModel`` (MMDiT, rectified flow; SD3.5's qk norms and dual attention layers too).
* ``flux``   -- ``FluxTransformer2DModel`` (rectified flow): latents packed 2x2 into tokens with rotary
  position ids, as ``FluxPipeline`` packs them; the CLIP pooled and T5 text inputs; and, on a
  guidance-distilled model (``guidance_embeds: true``, Flux.1-dev), the guidance scale in ``cond["guidance"]``.
* ``sana``   -- ``SanaTransformer2DModel`` (rectified flow, linear attention; Gemma text with its mask).

Timesteps: the Denoiser hands every family ``schedule.model_timestep(t)``, i.e. ``1000 t`` on a flow
schedule. SD3 and Sana take that as it is (Sana times its ``timestep_scale``, 1 but for Sana-Sprint);
Flux multiplies its timestep and guidance inputs by 1000 itself, so its pipeline divides by 1000 and so do we.
"""

from __future__ import annotations

import torch

from diffdistill.backbones.interval_embed import interval_input

SUPPORTED_BACKBONES = {
    "UNet2DConditionModel": "unet",
    "DiTTransformer2DModel": "dit",
    "PixArtTransformer2DModel": "pixart",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "SanaTransformer2DModel": "sana",
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


def vae_scale_factor(pipe) -> int:
    """Pixels per latent side. DiTPipeline sets no ``vae_scale_factor``; its VAE downsamples once per block but the last."""
    factor = getattr(pipe, "vae_scale_factor", None)
    return factor if factor is not None else 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def takes_guidance(model: torch.nn.Module) -> bool:
    """Whether a backbone embeds the guidance scale as an input (guidance-distilled: Flux.1-dev), so that
    guidance at w is one pass with that input at w, never a classifier-free pair."""
    config = getattr(model, "config", None)
    return bool(config.get("guidance_embeds", False)) if isinstance(config, dict) else False


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch one token, channels outermost (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device) -> torch.Tensor:
    """Flux's rotary position of each packed token: (0, row, column), row-major."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(device, torch.float32)


def _flux(model, x, timestep, cond):
    h, w = x.shape[-2:]
    text = cond["encoder_hidden_states"]
    guidance = cond["guidance"] if takes_guidance(model) else None
    out = model(
        pack_latents(x), encoder_hidden_states=text, pooled_projections=cond["pooled_projections"],
        timestep=timestep / 1000, img_ids=image_ids(h, w, x.device),
        txt_ids=torch.zeros(text.shape[1], 3, device=x.device),  # FluxPipeline's text positions: all zero
        guidance=guidance, return_dict=False,
    )[0]
    return unpack_latents(out, h, w)


def _sana(model, x, timestep, cond):
    guidance = cond["guidance"] * model.config.guidance_embeds_scale if takes_guidance(model) else None  # as SanaSprintPipeline
    out = model(
        x, encoder_hidden_states=cond["encoder_hidden_states"], encoder_attention_mask=cond.get("encoder_attention_mask"),
        timestep=timestep * model.config.timestep_scale, guidance=guidance, return_dict=False,
    )[0]
    return out[:, : x.shape[1]] if out.shape[1] == 2 * x.shape[1] else out


def _plain(model, x, timestep, cond):
    """Our own small networks (toy benchmarks): ``model(x, timestep, cond)``."""
    return model(x, timestep, cond)


_CALLS = {"unet": _unet, "dit": _dit, "pixart": _pixart, "sd3": _sd3, "flux": _flux, "sana": _sana, "plain": _plain}


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
    """A UNet takes ``cond["timestep_cond"]`` itself; a transformer given a second time input
    (:mod:`.interval_embed`) reads it there for this call."""
    if kind == "unet":
        return _CALLS[kind](model, x, timestep, cond)
    with interval_input(model, cond.get("timestep_cond")):
        return _CALLS[kind](model, x, timestep, cond)

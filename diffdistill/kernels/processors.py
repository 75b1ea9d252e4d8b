"""diffusers attention processors that run :func:`flash_attention`.

Continuous-time consistency distillation (sCM, Lu & Song 2024) needs the JVP
of the whole denoiser, and PyTorch's fused SDPA kernels have no forward-mode
AD.  These processors keep diffusers' ``AttnProcessor2_0`` /
``JointAttnProcessor2_0`` semantics (spatial norm, group norm, 4D inputs,
``norm_cross``, ``norm_q``/``norm_k``, residual, output rescale) and swap only
the attention call for the FlashAttention-2-style Triton kernel, whose
``jvp`` computes the output tangent in the same pass as the output.

Where the kernel cannot run (no Triton, or CPU tensors without
``TRITON_INTERPRET=1``) they fall back to torch, logging one line once:
SDPA for plain calls, the math path under forward-mode AD (where SDPA's
fused kernels raise).  Masked attention always takes the torch path: the
kernel has no mask.

:func:`use_fused_attention` installs them on ``diffusers`` ``Attention``
modules.  It covers ``UNet2DConditionModel``, ``DiTTransformer2DModel``,
``PixArtTransformer2DModel`` (plain processors) and
``SD3Transformer2DModel`` (joint processor).  Modules built on diffusers'
newer ``AttentionModuleMixin`` (Flux, Wan, ...) dispatch attention through
their own functions and are left alone, as are ``Attention`` modules whose
processor does more than attention (IP-Adapter, added-KV, PAG, fused QKV,
custom diffusion): replacing those would change the model.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from .flash_attention import flash_attention
from .launch import triton_available
from .reference import _upcast_half, attention_reference

__all__ = ["JOINT_PROCESSORS", "PLAIN_PROCESSORS", "FlashAttnProcessor", "FlashJointAttnProcessor", "use_fused_attention", "xformers_available"]

logger = logging.getLogger("diffdistill.kernels")

try:  # optional; only used for the plain (non-AD) calls of XFormersJVPProcessor
    import xformers.ops as xops
except Exception:  # ImportError, or a broken build raising at import
    xops = None

BACKENDS = ("auto", "triton", "torch", "xformers")
# processors that do nothing but (masked) attention between the q/k/v projections
PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "AttnProcessorNPU",
                    "SlicedAttnProcessor")
JOINT_PROCESSORS = ("JointAttnProcessor2_0", "XFormersJointAttnProcessor")
_fallback_logged = False


def xformers_available():
    return xops is not None


# --------------------------------------------------------------------------
# the attention call
# --------------------------------------------------------------------------
def forward_ad_active():
    """True inside ``torch.func.jvp`` or a ``torch.autograd.forward_ad`` dual level.

    Both enter an autograd dual level; functorch transforms also set a level.
    """
    if getattr(forward_ad, "_current_level", -1) >= 0:
        return True
    return torch._C._functorch.maybe_current_level() is not None


def masked_attention(q, k, v, scale, mask):
    """Math attention with an additive (float) or keep (bool) mask; forward-AD safe."""
    logits = torch.matmul(q, k.transpose(-2, -1)) * scale
    if mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, float("-inf"))
    else:
        logits = logits + mask
    probs = torch.softmax(_upcast_half(logits), dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def _log_fallback(device):
    global _fallback_logged
    if not _fallback_logged:
        _fallback_logged = True
        logger.warning(
            "fused attention unavailable on %s (needs Triton and CUDA, or TRITON_INTERPRET=1 on CPU); "
            "using torch SDPA, and the math path under forward-mode AD", device)


def _torch_attention(q, k, v, scale, mask=None):
    # SDPA's fused kernels have no forward-mode AD; the math path does
    if forward_ad_active():
        return attention_reference(q, k, v, scale) if mask is None else masked_attention(q, k, v, scale, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def attend(q, k, v, scale, mask=None, backend="auto"):
    """Attention on ``(batch, heads, length, head_dim)`` through the chosen backend."""
    if mask is not None:  # the kernel has no mask
        return _torch_attention(q, k, v, scale, mask)
    if backend == "xformers" and xops is not None and not forward_ad_active():
        # xformers wants (batch, length, heads, head_dim)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    if backend != "torch" and triton_available(q.device):
        return flash_attention(q, k, v, scale)
    if backend == "triton":
        raise RuntimeError(f"backend='triton' but the Triton kernel cannot run on {q.device}")
    if backend != "torch":  # an explicit "torch" needs no notice
        _log_fallback(q.device)
    return _torch_attention(q, k, v, scale)


def _split_heads(x, batch, heads):
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _merge_heads(x):
    batch, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * head_dim)


# --------------------------------------------------------------------------
# processors
# --------------------------------------------------------------------------
class FlashAttnProcessor:
    """``AttnProcessor2_0`` with :func:`flash_attention` for self- and cross-attention.

    Uses ``attn.scale`` as diffusers' math ``AttnProcessor`` does (equal to
    SDPA's default unless the module was built with a custom scale).
    """

    def __init__(self, backend="auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (B, C, H, W) feature maps attend over H*W tokens
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, key_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query, key, value = (_split_heads(x, batch, attn.heads) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = attend(query, key, value, attn.scale, attention_mask, self.backend)
        hidden_states = _merge_heads(hidden_states).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class FlashJointAttnProcessor:
    """``JointAttnProcessor2_0`` (SD3's MM-DiT) with :func:`flash_attention`.

    Image and text tokens are projected separately, concatenated along the
    sequence and attended jointly, then split back.
    """

    def __init__(self, backend="auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch = hidden_states.shape[0]
        image_length = hidden_states.shape[1]
        query, key, value = (_split_heads(proj(hidden_states), batch, attn.heads)
                             for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            text_q, text_k, text_v = (_split_heads(proj(encoder_hidden_states), batch, attn.heads)
                                      for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query = torch.cat([query, text_q], dim=2)
            key = torch.cat([key, text_k], dim=2)
            value = torch.cat([value, text_v], dim=2)

        # JointAttnProcessor2_0 uses SDPA's default scale, head_dim ** -0.5
        hidden_states = attend(query, key, value, query.shape[-1] ** -0.5, None, self.backend)
        hidden_states = _merge_heads(hidden_states).to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image_length], hidden_states[:, image_length:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


if xops is not None:

    class XFormersJVPProcessor(FlashAttnProcessor):
        """xformers memory-efficient attention for plain calls, the JVP kernel under forward AD.

        xformers has no forward-mode AD, so calls inside ``torch.func.jvp``
        or a dual level route to :func:`flash_attention` (or torch math).
        """

        def __init__(self):
            super().__init__(backend="xformers")

    __all__.append("XFormersJVPProcessor")


# --------------------------------------------------------------------------
# installation
# --------------------------------------------------------------------------
def use_fused_attention(model, backend="auto"):
    """Install the fused processors on every eligible diffusers ``Attention`` in ``model``.

    Walks ``model.modules()`` rather than calling ``set_attn_processor``,
    which some transformer classes lack.  Plain attention processors become
    :class:`FlashAttnProcessor`, SD3's joint ones :class:`FlashJointAttnProcessor`;
    processors that add features (IP-Adapter, added KV, PAG, fused QKV, ...)
    are kept and reported in one log line.  ``backend``: ``"auto"`` (kernel
    where it runs, torch elsewhere), ``"triton"`` (error where it cannot run),
    ``"torch"``, or ``"xformers"`` (plain calls through xformers, where
    installed).  Returns the number of processors installed.
    """
    # diffusers takes seconds to import and only this function needs it: the kernels import without it
    from diffusers.models.attention_processor import Attention

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "xformers" and xops is None:
        raise RuntimeError("backend='xformers' but xformers does not import")
    installed, kept = 0, set()
    for module in model.modules():
        if not isinstance(module, Attention):
            continue
        current = type(module.processor)
        if current.__name__ in PLAIN_PROCESSORS or issubclass(current, FlashAttnProcessor):
            module.set_processor(FlashAttnProcessor(backend))
        elif current.__name__ in JOINT_PROCESSORS or issubclass(current, FlashJointAttnProcessor):
            module.set_processor(FlashJointAttnProcessor(backend))
        else:
            kept.add(current.__name__)
            continue
        installed += 1
    if kept:
        logger.warning("use_fused_attention: kept %s (they do more than attention)", ", ".join(sorted(kept)))
    return installed

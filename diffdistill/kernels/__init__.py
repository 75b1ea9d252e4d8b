"""Fused attention kernels with forward-mode JVP, and diffusers processors using them."""
from .flash_attention import (
    attention_reference,
    flash_attention,
    flash_attention_jvp,
    triton_available,
)
from .processors import FlashAttnProcessor, FlashJointAttnProcessor, use_fused_attention

__all__ = [
    "attention_reference",
    "flash_attention",
    "flash_attention_jvp",
    "triton_available",
    "FlashAttnProcessor",
    "FlashJointAttnProcessor",
    "use_fused_attention",
]

"""Fused attention kernels with forward-mode JVP, and diffusers processors using them.

- ``flash_attention``: the public functions and their ``torch.autograd.Function``
- ``triton_kernels``: the Triton kernels (fused forward+JVP, backward) and their maths
- ``launch``: when the kernels can run, their tiles, and the launchers
- ``reference``: plain torch attention, the reference and the fallback
- ``processors``: diffusers attention processors that call ``flash_attention``

Triton is optional: without it every submodule still imports and attention runs in torch.
"""
from .flash_attention import flash_attention, flash_attention_jvp
from .launch import triton_available
from .processors import FlashAttnProcessor, FlashJointAttnProcessor, use_fused_attention
from .reference import attention_reference

__all__ = [
    "attention_reference",
    "flash_attention",
    "flash_attention_jvp",
    "triton_available",
    "FlashAttnProcessor",
    "FlashJointAttnProcessor",
    "use_fused_attention",
]

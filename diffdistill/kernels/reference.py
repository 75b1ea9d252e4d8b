"""Plain torch attention: the reference the Triton kernels are tested against and fall back to.

:func:`attention_reference` is differentiable in reverse and forward mode (the
math path; PyTorch's fused SDPA kernels have no forward-mode AD).  It is what
:func:`~diffdistill.kernels.flash_attention.flash_attention` runs where the
kernels cannot (no Triton, CPU tensors outside the interpreter, unsupported
shapes or dtypes), and what the diffusers processors use under forward AD.
"""
import torch

__all__ = ["attention_reference"]


def attention_reference(q, k, v, scale=None):
    """Plain torch attention ``softmax(scale * q k^T) v``.

    Differentiable in both modes (the math path; PyTorch's fused SDPA kernels
    have no forward-mode AD).  The softmax runs in fp32 for half inputs, as
    the kernels do.
    """
    scale = _default_scale(q) if scale is None else scale
    logits = torch.matmul(q, k.transpose(-2, -1)) * scale
    probs = torch.softmax(_upcast_half(logits), dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


def _upcast_half(x):
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _default_scale(q):
    return q.shape[-1] ** -0.5

"""Flash attention with a backward pass and a forward-mode JVP: the public entry points.

:func:`flash_attention` computes ``softmax(scale * q k^T) v`` on
``(batch, heads, length, head_dim)`` tensors through ``FlashAttentionFunction``,
a ``torch.autograd.Function``, so ``.backward()``, ``torch.autograd.forward_ad``
and ``torch.func.jvp`` (with ``vmap`` over it) all work.  It runs the Triton
kernels on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` (the
Triton interpreter, used by the tests); otherwise it falls back to
:func:`attention_reference`, plain differentiable torch.
:func:`flash_attention_jvp` returns the primal and the tangent of one fused pass.

The rest lives beside this module:

- :mod:`~diffdistill.kernels.triton_kernels`: the kernels and the maths of the
  fused forward+JVP pass (FlashAttention-2, and the sCM appendix for the JVP);
- :mod:`~diffdistill.kernels.launch`: when the kernels can run, their tiles,
  and the launchers ``_forward`` / ``_backward``;
- :mod:`~diffdistill.kernels.reference`: the torch reference.
"""
import torch

from .launch import _backward, _forward, _kernel_supports, _zero_tangent, triton_available
from .reference import _default_scale, attention_reference

__all__ = ["flash_attention", "flash_attention_jvp", "attention_reference", "triton_available"]


class FlashAttentionFunction(torch.autograd.Function):
    """Flash attention with ``backward`` (reverse mode) and ``jvp`` (forward mode).

    ``forward`` returns ``(O, LSE)``; LSE is non-differentiable and is what
    ``backward`` needs to rebuild ``P`` (FlashAttention-2).  ``jvp`` reruns
    the fused forward kernel with tangents, which recomputes ``P`` and yields
    ``O'`` in the same pass (sCM appendix), since ``forward`` never sees the
    tangents.

    Under ``torch.func`` transforms ``jvp`` and ``backward`` receive
    functorch-wrapped tensors, which have no data pointer for Triton; they
    therefore launch through small Functions of their own (``_Tangent``,
    ``_Gradients``), whose ``apply`` unwraps down to plain tensors.
    """

    @staticmethod
    def forward(q, k, v, scale):
        return _forward(q, k, v, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        o, lse = output
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v)

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _Gradients.apply(do, q, k, v, o, lse, ctx.scale)
        return dq, dk, dv, None

    @staticmethod
    def jvp(ctx, qt, kt, vt, _scale_t):
        q, k, v = ctx.saved_tensors
        qt, kt, vt = (_zero_tangent(p) if t is None else t for t, p in zip((qt, kt, vt), (q, k, v)))
        return _Tangent.apply(q, k, v, qt, kt, vt, ctx.scale), None

    @staticmethod
    def vmap(info, in_dims, q, k, v, scale):
        return _vmap_by_folding(FlashAttentionFunction, info, in_dims, (q, k, v), (scale,))


class _Tangent(torch.autograd.Function):
    """O' from the fused forward+JVP kernel (the primal it recomputes is dropped)."""

    @staticmethod
    def forward(q, k, v, qt, kt, vt, scale):
        return _forward(q, k, v, scale, tangents=(qt, kt, vt))[2]

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, _grad):
        raise NotImplementedError("flash_attention: reverse mode through the JVP tangent is not supported")

    @staticmethod
    def vmap(info, in_dims, q, k, v, qt, kt, vt, scale):
        return _vmap_by_folding(_Tangent, info, in_dims, (q, k, v, qt, kt, vt), (scale,))


class _Gradients(torch.autograd.Function):
    """(dq, dk, dv) from the two backward kernels."""

    @staticmethod
    def forward(do, q, k, v, o, lse, scale):
        return _backward(do, q, k, v, o, lse, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *_grads):
        raise NotImplementedError("flash_attention: double backward is not supported")

    @staticmethod
    def vmap(info, in_dims, do, q, k, v, o, lse, scale):
        return _vmap_by_folding(_Gradients, info, in_dims, (do, q, k, v, o, lse), (scale,))


def _vmap_by_folding(function, info, in_dims, tensors, rest):
    """vmap rule: attention is independent per batch row, so fold the vmapped
    dimension into the batch dimension, run once, and unfold the outputs."""
    n = info.batch_size
    folded = [_fold(t, d, n) for t, d in zip(tensors, in_dims)]
    outputs = function.apply(*folded, *rest)
    if isinstance(outputs, torch.Tensor):
        return outputs.unflatten(0, (n, -1)), 0
    return tuple(o.unflatten(0, (n, -1)) for o in outputs), (0,) * len(outputs)


def _fold(t, dim, n):
    t = t.unsqueeze(0).expand(n, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.flatten(0, 1)


def flash_attention(q, k, v, scale=None):
    """Attention ``softmax(scale * q k^T) v`` on ``(batch, heads, length, head_dim)``.

    ``q`` may have a different length from ``k`` and ``v`` (cross-attention).
    ``scale`` defaults to ``head_dim ** -0.5``.  Differentiable in reverse mode
    and forward mode (``torch.func.jvp``, ``torch.autograd.forward_ad``).
    Runs the Triton kernels where :func:`triton_available` says so (and
    ``head_dim <= 256``); else the torch reference.
    """
    scale = float(_default_scale(q) if scale is None else scale)
    if not _kernel_supports(q, k, v):
        return attention_reference(q, k, v, scale)
    out, _ = FlashAttentionFunction.apply(q, k, v, scale)
    return out


def flash_attention_jvp(q, k, v, q_t, k_t, v_t, scale=None):
    """Primal and tangent ``(O, O')`` of attention in one fused pass.

    Tangents may be ``None`` (zero).  Outputs are not differentiable: this is
    the sCM use, where the JVP is taken under stop-gradient.  Prefer it to
    ``torch.func.jvp(flash_attention, ...)`` when calling attention directly:
    that path must run the plain forward first, then the fused pass.
    """
    scale = float(_default_scale(q) if scale is None else scale)
    if not _kernel_supports(q, k, v):
        zeros = [torch.zeros_like(p) if t is None else t for t, p in zip((q_t, k_t, v_t), (q, k, v))]
        with torch.no_grad():
            return torch.func.jvp(lambda a, b, c: attention_reference(a, b, c, scale), (q, k, v), tuple(zeros))
    with torch.no_grad():
        o, _, ot = _forward(q, k, v, scale, tangents=(q_t, k_t, v_t))
    return o, ot

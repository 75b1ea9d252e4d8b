"""Where and how the Triton kernels run: dispatch, tile choice, and the launchers.

- Dispatch: :func:`triton_available` and ``_kernel_supports`` decide whether a
  call can take the kernels (Triton installed; CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``, Triton's interpreter, which the tests use;
  supported dtype, head dim and grid) or must fall back to the torch reference.
- Tiles: compiled kernels are autotuned over a few ``(BLOCK_M, BLOCK_N, warps,
  stages)`` candidates per pass, pruned by register pressure; the interpreter
  runs ``INTERPRETER_TILE`` tiles.
- Launchers: ``_forward`` (O and the log-sum-exp, plus O' with tangents) and
  ``_backward`` (dq, dk, dv) allocate the outputs and launch the kernels of
  :mod:`diffdistill.kernels.triton_kernels` through ``_launch``, which applies
  ``triton.jit`` lazily so that the interpret/compile mode is read per call.
"""
import functools
import math
import os

import torch

from .triton_kernels import _bwd_kv_kernel, _bwd_q_kernel, _fwd_kernel, triton

__all__ = ["triton_available"]

LOG2E = math.log2(math.e)  # the kernels use exp2; logits are pre-multiplied by log2(e)
MAX_HEAD_DIM = 256  # one (BLOCK, head_dim) tile per operand must fit on chip
MAX_GRID_Y = 65535  # batch * heads rides on CUDA's second grid axis
# Tile edge in Triton's CPU interpreter: 16 (tl.dot's minimum) so that tiny
# test shapes still span several blocks, exercising the online rescaling and
# the ragged-edge masks.  Larger tiles make the interpreter faster.
INTERPRETER_TILE = 16


# --------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------
def _interpreting():
    """Whether Triton would run kernels in its CPU interpreter right now.

    Read at every call (not at import) because a test session may set
    ``TRITON_INTERPRET`` after this module was imported.
    """
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available(device):
    """True where the Triton kernels can run on tensors of ``device``."""
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _interpreting()


def _kernel_supports(q, k, v):
    same = q.device == k.device == v.device and q.dtype == k.dtype == v.dtype
    return (
        same
        and q.dim() == k.dim() == v.dim() == 4
        and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and q.shape[:2] == k.shape[:2] == v.shape[:2]
        and k.shape[2] == v.shape[2]
        and q.shape[-1] == k.shape[-1] == v.shape[-1] <= MAX_HEAD_DIM
        and q.shape[2] > 0
        and k.shape[2] > 0
        and q.shape[0] * q.shape[1] <= MAX_GRID_Y
        and triton_available(q.device)
    )


@functools.lru_cache(maxsize=None)
def _jit(kernel, interpret):
    """``triton.jit`` applied at first launch rather than at import.

    ``triton.jit`` picks compiled or interpreted mode when it decorates, so a
    decorator at import time would freeze whatever ``TRITON_INTERPRET`` was
    then (a test session may set it after some other module imported this
    one).  Caching per mode keeps both usable in one process.  Compiled
    kernels are autotuned over a few tile shapes on the user's GPU.
    """
    jitted = triton.jit(kernel)
    if interpret:
        return jitted
    return triton.autotune(
        configs=_gpu_configs(kernel),
        # dtypes join the key automatically; WITH_TANGENT only exists on the forward
        key=["HEAD_DIM", "LQ", "LK", "WITH_TANGENT"],
        prune_configs_by={"early_config_prune": functools.partial(_prune_configs, kernel)},
    )(jitted)


def _launch(kernel, grid_rows, batch_heads, *args, **meta):
    """Launch over (row blocks, batch*heads); grid_rows is the length tiled by the program."""
    meta["BLOCK_D"] = _block_d(meta["HEAD_DIM"])
    interpret = _interpreting()
    if interpret:
        meta.update(BLOCK_M=INTERPRETER_TILE, BLOCK_N=INTERPRETER_TILE)
    tile = "BLOCK_N" if kernel is _bwd_kv_kernel else "BLOCK_M"
    grid = lambda cfg: (triton.cdiv(grid_rows, cfg[tile]), batch_heads)  # noqa: E731
    _jit(kernel, interpret)[grid](*args, **meta)


# --------------------------------------------------------------------------
# tiles and launchers
# --------------------------------------------------------------------------
def _block_d(head_dim):
    # tl.arange needs a power of two and tl.dot a multiple of 16
    return max(16, triton.next_power_of_2(head_dim))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass, most preferred first.
# FlashAttention-2 style large query tiles for the forward; smaller ones where
# two or three fp32 accumulators are live (JVP, backward).  Chosen from ptxas
# register/spill reports for sm_90 (fp16, head_dim 64/128/256): each head
# width keeps at least one candidate that does not spill.
_TILES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 8, 2)],
    "jvp": [(128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2)],
    "bwd": [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2)],
}


def _gpu_configs(kernel):
    """Autotuner candidates; ``_prune_configs`` narrows them per call."""
    kinds = ("fwd", "jvp") if kernel is _fwd_kernel else ("bwd",)
    tiles = dict.fromkeys(t for kind in kinds for t in _TILES[kind])  # ordered, deduplicated
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in tiles]


def _tile(cfg):
    return cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages


def _prune_configs(kernel, configs, named_args, **kwargs):
    """This pass's tiles whose fp32 accumulators take at most 64 registers a thread.

    Tiles that overflow shared memory on the user's GPU are skipped by the
    autotuner itself (OutOfResources).
    """
    if kernel is _fwd_kernel:
        kind, accumulators = ("jvp", 2) if kwargs["WITH_TANGENT"] else ("fwd", 1)
    else:
        kind, accumulators = "bwd", (2 if kernel is _bwd_kv_kernel else 1)  # dk, dv | dq
    rows = "BLOCK_N" if kernel is _bwd_kv_kernel else "BLOCK_M"

    def registers(cfg):
        return accumulators * cfg.kwargs[rows] * kwargs["BLOCK_D"] / (32 * cfg.num_warps)

    candidates = [cfg for cfg in configs if _tile(cfg) in _TILES[kind]]
    return [cfg for cfg in candidates if registers(cfg) <= 64] or [min(candidates, key=registers)]


def _precision(dtype):
    # fp32 inputs follow torch's TF32 switch; half inputs ignore it.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _zero_tangent(t):
    # a stride-0 view: no memory, and the kernel reads it like any other tensor
    return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)


def _forward(q, k, v, scale, tangents=None):
    """Launch the forward kernel: (O, LSE) or, with tangents, (O, LSE, O')."""
    batch, heads, lq, head_dim = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, lq), dtype=torch.float32, device=q.device)  # log2 units
    with_tangent = tangents is not None
    if with_tangent:
        qt, kt, vt = (_zero_tangent(p) if t is None else t.to(p.dtype) for t, p in zip(tangents, (q, k, v)))
        ot = torch.empty_like(o)
    else:  # never read: WITH_TANGENT=False compiles the tangent code away
        qt, kt, vt, ot = q, k, v, o
    _launch(
        _fwd_kernel, lq, batch * heads,
        q, k, v, o, lse, qt, kt, vt, ot,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        *qt.stride(), *kt.stride(), *vt.stride(),
        **_shape_args(q, k, scale), WITH_TANGENT=with_tangent,
    )
    return (o, lse, ot) if with_tangent else (o, lse)


def _backward(do, q, k, v, o, lse, scale):
    """Launch the two backward kernels; returns (dq, dk, dv)."""
    batch, heads, lq, _ = q.shape
    lk = k.shape[2]
    do = do.to(q.dtype)
    # D = rowsum(dO * O), the softmax-backward correction; cheap enough in torch
    delta = (do.float() * o.float()).sum(-1).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _launch(
        _bwd_kv_kernel, lk, batch * heads,
        q, k, v, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        **_shape_args(q, k, scale),
    )
    _launch(
        _bwd_q_kernel, lq, batch * heads,
        q, k, v, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        **_shape_args(q, k, scale),
    )
    return dq, dk, dv


def _shape_args(q, k, scale):
    _, heads, lq, head_dim = q.shape
    return dict(H=heads, LQ=lq, LK=k.shape[2], HEAD_DIM=head_dim, scale=scale, qk_scale_log2=scale * LOG2E,
                PRECISION=_precision(q.dtype))

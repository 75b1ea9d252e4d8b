"""Flash attention with a backward pass and a forward-mode JVP, in Triton.

Attention on ``(batch, heads, length, head_dim)`` tensors::

    S = scale * q k^T,    P = softmax(S) (row-wise),    O = P v

The forward pass follows FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster
Attention with Better Parallelism and Work Partitioning"): each program owns a
block of query rows, streams key/value blocks through an online softmax, and
saves the row log-sum-exp so that the backward pass can rebuild ``P`` exactly.

Forward-mode JVP (tangents ``q', k', v'``) follows the appendix on the JVP of
flash attention in Lu & Song 2024 ("Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", sCM)::

    S' = scale * (q' k^T + q k'^T)
    P' = P * (S' - rowsum(P * S'))
    O' = P' v + P v' = (P * S') v + P v' - rowsum(P * S') * O

Every term is a row sum weighted by the unnormalised ``p = exp(S - m)``, so it
rides along the same online softmax as ``O``: with ``l = sum p``,

    acc_o = sum p v,    acc_t = sum p (S' v + v'),    g = sum p S'
    O = acc_o / l,      O' = acc_t / l - (g / l) * O

and all three accumulators are rescaled by the same ``exp(m_old - m_new)``
whenever the running max grows.  One pass gives both the primal and the
tangent (``flash_attention_jvp``).

The public entry point, :func:`flash_attention`, is a ``torch.autograd.Function``
so ``.backward()``, ``torch.autograd.forward_ad`` and ``torch.func.jvp`` all
work.  It runs the Triton kernels on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1`` (the Triton interpreter, used by the tests); otherwise
it falls back to :func:`attention_reference`, plain differentiable torch.
"""
from __future__ import annotations  # kernel annotations stay strings, so the
# module imports without Triton (Triton reads "tl.constexpr" as a string too).

import functools
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference still works.
    triton = None
    tl = None
else:
    # The kernels call only Triton builtins, never the @triton.jit helpers of
    # triton.language.standard (tl.max, tl.sum, tl.zeros): those are frozen in
    # the mode triton was *imported* in, so a kernel interpreted on CPU could
    # not call them after a compiled-mode import.  Row reductions therefore use
    # tl.reduce with Triton's own combine functions, which the interpreter also
    # recognises and runs as single numpy reductions.
    _max_combine = tl.standard._elementwise_max
    _sum_combine = tl.standard._sum_combine

__all__ = ["flash_attention", "flash_attention_jvp", "attention_reference", "triton_available"]

LOG2E = math.log2(math.e)  # the kernels use exp2; logits are pre-multiplied by log2(e)
MAX_HEAD_DIM = 256  # one (BLOCK, head_dim) tile per operand must fit on chip
MAX_GRID_Y = 65535  # batch * heads rides on CUDA's second grid axis
# Tile edge in Triton's CPU interpreter: 16 (tl.dot's minimum) so that tiny
# test shapes still span several blocks, exercising the online rescaling and
# the ragged-edge masks.  Larger tiles make the interpreter faster.
INTERPRETER_TILE = 16


# --------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------
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
# Triton kernels
# --------------------------------------------------------------------------
def _fwd_kernel(
    Q, K, V, O, LSE, QT, KT, VT, OT,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_m, so_d,
    sqt_b, sqt_h, sqt_m, sqt_d,
    skt_b, skt_h, skt_n, skt_d,
    svt_b, svt_h, svt_n, svt_d,
    H, LQ, LK, HEAD_DIM, scale, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WITH_TANGENT: tl.constexpr, PRECISION: tl.constexpr,
):
    """One block of query rows: O (and O' if WITH_TANGENT) and LSE (base 2)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64: offsets of large tensors overflow int32
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < LQ
    dim_ok = dims < HEAD_DIM  # head_dim padded to a power of two by masking
    q_tile = row_ok[:, None] & dim_ok[None, :]

    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_m + dims[None, :] * sq_d,
                mask=q_tile, other=0.0)
    k_base = K + b * sk_b + h * sk_h + dims[None, :] * sk_d
    v_base = V + b * sv_b + h * sv_h + dims[None, :] * sv_d

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base 2)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)  # running sum of p
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)  # sum p v
    if WITH_TANGENT:
        qt = tl.load(QT + b * sqt_b + h * sqt_h + rows[:, None] * sqt_m + dims[None, :] * sqt_d,
                     mask=q_tile, other=0.0)
        kt_base = KT + b * skt_b + h * skt_h + dims[None, :] * skt_d
        vt_base = VT + b * svt_b + h * svt_h + dims[None, :] * svt_d
        acc_t = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)  # sum p (S' v + v')
        g_i = tl.full([BLOCK_M], 0.0, tl.float32)  # sum p S'

    for start in range(0, LK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < LK
        kv_tile = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_base + cols[:, None] * sk_n, mask=kv_tile, other=0.0)
        v = tl.load(v_base + cols[:, None] * sv_n, mask=kv_tile, other=0.0)

        # base-2 logits; keys past LK get -inf so they carry no weight
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
        alpha = tl.exp2(m_i - m_new)  # rescales everything summed so far
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)

        if WITH_TANGENT:
            kt = tl.load(kt_base + cols[:, None] * skt_n, mask=kv_tile, other=0.0)
            vt = tl.load(vt_base + cols[:, None] * svt_n, mask=kv_tile, other=0.0)
            # S' = scale (q' k^T + q k'^T), in natural units: it multiplies p, not exp's argument
            ds = (tl.dot(qt, tl.trans(k), input_precision=PRECISION)
                  + tl.dot(q, tl.trans(kt), input_precision=PRECISION)) * scale
            pds = p * ds
            g_i = g_i * alpha + tl.reduce(pds, 1, _sum_combine)
            acc_t = (acc_t * alpha[:, None]
                     + tl.dot(pds.to(v.dtype), v, input_precision=PRECISION)
                     + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION))
        m_i = m_new

    o = acc / l_i[:, None]
    o_offsets = b * so_b + h * so_h + rows[:, None] * so_m + dims[None, :] * so_d
    tl.store(O + o_offsets, o.to(O.dtype.element_ty), mask=q_tile)
    tl.store(LSE + pid_bh * LQ + rows, m_i + tl.log2(l_i), mask=row_ok)
    if WITH_TANGENT:
        ot = acc_t / l_i[:, None] - (g_i / l_i)[:, None] * o
        tl.store(OT + o_offsets, ot.to(OT.dtype.element_ty), mask=q_tile)


def _bwd_kv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    sdk_b, sdk_h, sdk_n, sdk_d,
    sdv_b, sdv_h, sdv_n, sdv_d,
    H, LQ, LK, HEAD_DIM, scale, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One block of keys: dK = scale dS^T q, dV = P^T dO, looping over queries.

    FlashAttention-2's split: this kernel owns dK/dV, ``_bwd_q_kernel`` owns
    dQ, so neither needs atomics and the result is deterministic.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < LK
    dim_ok = dims < HEAD_DIM
    kv_tile = col_ok[:, None] & dim_ok[None, :]

    k = tl.load(K + b * sk_b + h * sk_h + cols[:, None] * sk_n + dims[None, :] * sk_d,
                mask=kv_tile, other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + cols[:, None] * sv_n + dims[None, :] * sv_d,
                mask=kv_tile, other=0.0)
    q_base = Q + b * sq_b + h * sq_h + dims[None, :] * sq_d
    do_base = DO + b * sdo_b + h * sdo_h + dims[None, :] * sdo_d
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)

    for start in range(0, LQ, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < LQ
        q_tile = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(q_base + rows[:, None] * sq_m, mask=q_tile, other=0.0)
        do = tl.load(do_base + rows[:, None] * sdo_m, mask=q_tile, other=0.0)
        lse = tl.load(LSE + pid_bh * LQ + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + pid_bh * LQ + rows, mask=row_ok, other=0.0)

        # P rebuilt exactly from the saved log-sum-exp; padding rows/cols -> 0
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2
        p = tl.exp2(s - lse[:, None])
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])  # softmax backward: P * (dP - rowsum(dO * O))
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    dk_offsets = b * sdk_b + h * sdk_h + cols[:, None] * sdk_n + dims[None, :] * sdk_d
    dv_offsets = b * sdv_b + h * sdv_h + cols[:, None] * sdv_n + dims[None, :] * sdv_d
    tl.store(DK + dk_offsets, (dk * scale).to(DK.dtype.element_ty), mask=kv_tile)
    tl.store(DV + dv_offsets, dv.to(DV.dtype.element_ty), mask=kv_tile)


def _bwd_q_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    sdq_b, sdq_h, sdq_m, sdq_d,
    H, LQ, LK, HEAD_DIM, scale, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One block of queries: dQ = scale dS k, looping over keys."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < LQ
    dim_ok = dims < HEAD_DIM
    q_tile = row_ok[:, None] & dim_ok[None, :]

    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_m + dims[None, :] * sq_d,
                mask=q_tile, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows[:, None] * sdo_m + dims[None, :] * sdo_d,
                 mask=q_tile, other=0.0)
    lse = tl.load(LSE + pid_bh * LQ + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh * LQ + rows, mask=row_ok, other=0.0)
    k_base = K + b * sk_b + h * sk_h + dims[None, :] * sk_d
    v_base = V + b * sv_b + h * sv_h + dims[None, :] * sv_d
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)

    for start in range(0, LK, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < LK
        kv_tile = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_base + cols[:, None] * sk_n, mask=kv_tile, other=0.0)
        v = tl.load(v_base + cols[:, None] * sv_n, mask=kv_tile, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2
        p = tl.exp2(s - lse[:, None])
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    dq_offsets = b * sdq_b + h * sdq_h + rows[:, None] * sdq_m + dims[None, :] * sdq_d
    tl.store(DQ + dq_offsets, (dq * scale).to(DQ.dtype.element_ty), mask=q_tile)


# --------------------------------------------------------------------------
# launchers
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


# --------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------
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

"""The Triton kernels of flash attention: the fused forward+JVP pass and the two backward passes.

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
whenever the running max grows.  The JVP is therefore not a kernel of its own:
``_fwd_kernel`` with ``WITH_TANGENT`` gives the primal and the tangent in one
pass.  ``_bwd_kv_kernel`` and ``_bwd_q_kernel`` are FlashAttention-2's split
backward.

The functions here are plain Python: :mod:`diffdistill.kernels.launch` applies
``triton.jit`` at first launch, in the mode (compiled or interpreted) of that
moment, and chooses their tiles.  Triton is optional (the ``gpu`` extra): without
it ``triton`` and ``tl`` are ``None``, this module still imports, and nothing here
is ever launched.
"""
from __future__ import annotations  # kernel annotations stay strings, so the
# module imports without Triton (Triton reads "tl.constexpr" as a string too).

try:  # optional dependency (the ``gpu`` extra); the kernel bodies read ``tl`` as a module global
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

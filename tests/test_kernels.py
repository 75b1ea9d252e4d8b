"""Fused attention kernels: values, gradients and JVP tangents against float64 torch.

On CPU the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
set per test by the ``interpreter`` fixture; the kernel module reads it at
launch, so import order across the suite does not matter).  The interpreter
is ~1000x slower than torch, so shapes are tiny; 16x16 tiles make them span
several blocks anyway (online rescaling, ragged edges).  Its bf16 is broken,
so bf16 is tested only on a GPU, as are the real head dims at full size.
"""
import logging
import math
import sys

import pytest
import torch

import diffdistill.kernels  # noqa: F401  (package import registers the submodules)
from diffdistill.kernels import attention_reference, flash_attention, flash_attention_jvp

launch = sys.modules["diffdistill.kernels.launch"]  # dispatch, tiles, launchers
triton_kernels = sys.modules["diffdistill.kernels.triton_kernels"]
processors = sys.modules["diffdistill.kernels.processors"]

# (batch, heads, q length, k/v length, head dim): ragged lengths, q != k, padded head dims
SHAPES = [(1, 2, 5, 7, 8), (2, 2, 20, 37, 40), (1, 1, 33, 17, 24)]
# max |error| against float64, per input dtype (fp16 holds ~3 decimal digits)
TOL = {torch.float32: 2e-5, torch.float16: 5e-3}
DTYPES = [torch.float32, torch.float16]
needs_triton = pytest.mark.skipif(triton_kernels.triton is None, reason="needs triton")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or triton_kernels.triton is None,
                                reason="needs a CUDA GPU and triton")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy CPU their
    spin-waits cost 10x (a tiny UNet's JVP: 12 s on 2 threads, 0.4 s on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def interpreter(monkeypatch):
    """Run Triton kernels on CPU tensors through the interpreter; count launches."""
    if triton_kernels.triton is None:
        pytest.skip("needs triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    launched = []
    real_launch = launch._launch

    def counting_launch(kernel, *args, **meta):
        launched.append(kernel.__name__)
        real_launch(kernel, *args, **meta)

    monkeypatch.setattr(launch, "_launch", counting_launch)
    return launched


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def make(shape, dtype, device="cpu", seed=0):
    b, h, lq, lk, d = shape
    g = torch.Generator().manual_seed(seed)
    sizes = [(b, h, lq, d), (b, h, lk, d), (b, h, lk, d)]
    return [torch.randn(s, generator=g).to(device, dtype) for s in sizes]


def f64(*tensors):
    return tuple(t.double() for t in tensors)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def reference_jvp(primals, tangents, scale=None):
    return torch.func.jvp(lambda q, k, v: attention_reference(q, k, v, scale), f64(*primals), f64(*tangents))


# --------------------------------------------------------------------------
# the kernel on its own
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward(interpreter, shape, dtype):
    q, k, v = make(shape, dtype)
    out = flash_attention(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    assert max_err(out, attention_reference(*f64(q, k, v))) < TOL[dtype]
    assert interpreter == ["_fwd_kernel"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_gradients(interpreter, shape, dtype):
    q, k, v = (t.requires_grad_() for t in make(shape, dtype))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    flash_attention(q, k, v).backward(grad_out)
    attention_reference(q64, k64, v64).backward(grad_out.double())
    for ours, ref in ((q, q64), (k, k64), (v, v64)):
        assert ours.grad.dtype == dtype
        assert max_err(ours.grad, ref.grad) < 2 * TOL[dtype] * max(1.0, ref.grad.abs().max().item())
    assert sorted(interpreter) == ["_bwd_kv_kernel", "_bwd_q_kernel", "_fwd_kernel"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_func_jvp(interpreter, shape, dtype):
    primals = make(shape, dtype)
    tangents = make(shape, dtype, seed=1)
    out, tangent = torch.func.jvp(flash_attention, tuple(primals), tuple(tangents))
    ref, ref_tangent = reference_jvp(primals, tangents)
    assert tangent.dtype == dtype
    assert max_err(out, ref) < TOL[dtype]
    # the tangent is a difference of O(1) terms: compare relative to its size
    assert max_err(tangent, ref_tangent) < 2 * TOL[dtype] * max(1.0, ref_tangent.abs().max().item())
    assert sorted(interpreter) == ["_fwd_kernel", "_fwd_kernel"]  # forward, then the fused forward+JVP


def test_forward_ad_partial_tangents(interpreter):
    """torch.autograd.forward_ad, with k carrying no tangent, and a custom scale."""
    import torch.autograd.forward_ad as fwad

    q, k, v = make((1, 2, 9, 30, 16), torch.float32)
    qt, _, vt = make((1, 2, 9, 30, 16), torch.float32, seed=1)
    with fwad.dual_level():
        dual = flash_attention(fwad.make_dual(q, qt), k, fwad.make_dual(v, vt), scale=0.3)
        out, tangent = fwad.unpack_dual(dual)
    ref, ref_tangent = reference_jvp((q, k, v), (qt, torch.zeros_like(k), vt), scale=0.3)
    assert max_err(out, ref) < 2e-5
    assert max_err(tangent, ref_tangent) < 2e-5


def test_tangent_matches_finite_difference(interpreter):
    """Independent of autograd: (f(x + h t) - f(x - h t)) / 2h in float64 torch."""
    q, k, v = make((1, 1, 6, 19, 8), torch.float32)
    tangents = make((1, 1, 6, 19, 8), torch.float32, seed=3)
    _, tangent = torch.func.jvp(flash_attention, (q, k, v), tuple(tangents))
    h = 1e-6
    plus = attention_reference(*(p.double() + h * t.double() for p, t in zip((q, k, v), tangents)))
    minus = attention_reference(*(p.double() - h * t.double() for p, t in zip((q, k, v), tangents)))
    assert max_err(tangent, (plus - minus) / (2 * h)) < 5e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_primal_and_tangent(interpreter, dtype):
    """flash_attention_jvp: O and O' from one kernel launch."""
    shape = (1, 2, 20, 37, 40)
    primals, tangents = make(shape, dtype), make(shape, dtype, seed=1)
    out, tangent = flash_attention_jvp(*primals, *tangents)
    ref, ref_tangent = reference_jvp(primals, tangents)
    assert max_err(out, ref) < TOL[dtype]
    assert max_err(tangent, ref_tangent) < 2 * TOL[dtype] * max(1.0, ref_tangent.abs().max().item())
    assert interpreter == ["_fwd_kernel"]


def test_strided_layout_and_scale(interpreter):
    """diffusers hands over (B, L, H, D) buffers viewed as (B, H, L, D): no copies needed."""
    q = torch.randn(2, 13, 3, 16).transpose(1, 2)
    kv = torch.randn(2, 21, 3, 2, 16)
    k, v = kv[..., 0, :].transpose(1, 2), kv[..., 1, :].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    out = flash_attention(q, k, v, scale=0.17)
    assert max_err(out, attention_reference(*f64(q, k, v), scale=0.17)) < 2e-5


def test_vmap_over_jvp(interpreter):
    """vmap rules fold the mapped dim into the batch (e.g. for torch.func.jacfwd)."""
    q, k, v = make((1, 2, 7, 11, 8), torch.float32)
    tangents = torch.randn(3, *q.shape)
    batched = torch.vmap(lambda t: torch.func.jvp(lambda x: flash_attention(x, k, v), (q,), (t,))[1])(tangents)
    for i in range(3):
        _, ref = reference_jvp((q, k, v), (tangents[i], torch.zeros_like(k), torch.zeros_like(v)))
        assert max_err(batched[i], ref) < 2e-5


def test_torch_fallback_without_triton_device(compiled):
    """CPU tensors without the interpreter: the torch reference, still forward-differentiable."""
    assert not launch.triton_available("cpu")
    primals, tangents = make((1, 2, 5, 7, 8), torch.float32), make((1, 2, 5, 7, 8), torch.float32, seed=1)
    out, tangent = torch.func.jvp(flash_attention, tuple(primals), tuple(tangents))
    ref, ref_tangent = reference_jvp(primals, tangents)
    assert max_err(out, ref) < 2e-5 and max_err(tangent, ref_tangent) < 2e-5


# --------------------------------------------------------------------------
# diffusers processors
# --------------------------------------------------------------------------
def _attention_module(cross_dim=None, **kwargs):
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=cross_dim, heads=4, dim_head=8, **kwargs)
    attn.set_processor(AttnProcessor())
    return attn


def _jvp_of(module, *inputs):
    tangents = tuple(torch.randn_like(x, generator=torch.Generator().manual_seed(7)) for x in inputs)
    return torch.func.jvp(lambda *xs: module(*xs), inputs, tangents)


@pytest.mark.parametrize("case", ["self", "cross", "spatial"])
def test_processor_matches_diffusers(interpreter, case):
    from diffdistill.kernels import FlashAttnProcessor, use_fused_attention

    x = torch.randn(2, 12, 32)
    if case == "self":
        attn, inputs = _attention_module(), (x,)
    elif case == "cross":
        attn, inputs = _attention_module(cross_dim=16), (x, torch.randn(2, 77, 16))
    else:  # 4D feature map, group norm, residual, rescale: the VAE/UNet-mid style block
        attn = _attention_module(norm_num_groups=8, residual_connection=True, rescale_output_factor=2.0)
        inputs = (torch.randn(2, 32, 3, 5),)
    ref, ref_tangent = _jvp_of(attn, *inputs)
    assert use_fused_attention(attn) == 1 and isinstance(attn.processor, FlashAttnProcessor)
    out, tangent = _jvp_of(attn, *inputs)
    assert max_err(out, ref) < 1e-5 and max_err(tangent, ref_tangent) < 1e-5
    assert interpreter.count("_fwd_kernel") == 2


def test_processor_mask_uses_torch_math(interpreter):
    from diffdistill.kernels import use_fused_attention

    attn = _attention_module(cross_dim=16)
    x, context = torch.randn(2, 6, 32), torch.randn(2, 9, 16)
    mask = torch.ones(2, 9)
    mask[:, 6:] = 0
    bias = (1 - mask)[:, None, :] * -10000.0  # diffusers' additive (batch, 1, key) form
    ref, ref_tangent = _jvp_of(lambda a, b: attn(a, b, attention_mask=bias), x, context)
    use_fused_attention(attn)
    out, tangent = _jvp_of(lambda a, b: attn(a, b, attention_mask=bias), x, context)
    assert max_err(out, ref) < 1e-5 and max_err(tangent, ref_tangent) < 1e-5
    assert interpreter == []  # the kernel has no mask


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )).eval()


def unet_jvp(unet, sample, text, t=10.0):
    """JVP along (d sample, d t), as sCM takes it; the text is a constant."""
    def f(x, time):
        return unet(x, time, encoder_hidden_states=text).sample

    g = torch.Generator().manual_seed(5)
    return torch.func.jvp(f, (sample, torch.tensor([t])), (torch.randn(sample.shape, generator=g), torch.ones(1)))


@pytest.fixture(scope="module")
def unet_case():
    """The tiny UNet and its JVP with diffusers' math AttnProcessor, the reference.

    A 4x4 latent keeps the interpreter's work small (16 image tokens, 8 heads
    of dim 4 and 8); the 77 text tokens keep cross-attention ragged.
    """
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny_unet()
    sample, text = torch.randn(1, 4, 4, 4), torch.randn(1, 77, 32)
    unet.set_attn_processor(AttnProcessor())
    return unet, sample, text, unet_jvp(unet, sample, text)


def test_unet_jvp_matches_math_attention(interpreter, unet_case, monkeypatch):
    from diffdistill.kernels import use_fused_attention

    monkeypatch.setattr(launch, "INTERPRETER_TILE", 32)  # 1.5x faster; 77 text tokens still span 3 ragged blocks
    unet, sample, text, (ref, ref_tangent) = unet_case
    assert use_fused_attention(unet) == 8  # 2 down, 2 mid, 4 up (self + cross each)
    out, tangent = unet_jvp(unet, sample, text)
    assert interpreter.count("_fwd_kernel") == 16  # every attention: forward, then forward+JVP
    assert max_err(out, ref) < 1e-4
    assert max_err(tangent, ref_tangent) < 1e-4 * max(1.0, ref_tangent.abs().max().item())


def test_unet_fallback_logs_once(compiled, monkeypatch, caplog, unet_case):
    """No Triton device: SDPA for plain calls, math under forward AD, one log line."""
    from diffdistill.kernels import use_fused_attention

    unet, sample, text, (ref, ref_tangent) = unet_case
    monkeypatch.setattr(processors, "_fallback_logged", False)
    use_fused_attention(unet)
    with caplog.at_level(logging.WARNING, logger="diffdistill.kernels"):
        plain = unet(sample, 10.0, encoder_hidden_states=text).sample  # SDPA
        out, tangent = unet_jvp(unet, sample, text)  # SDPA would raise here
    assert max_err(plain, ref) < 1e-4 and max_err(out, ref) < 1e-4
    assert max_err(tangent, ref_tangent) < 1e-4 * max(1.0, ref_tangent.abs().max().item())
    lines = [r for r in caplog.records if r.name == "diffdistill.kernels"]
    assert len(lines) == 1 and "torch" in lines[0].getMessage()


def test_sd3_joint_attention(interpreter):
    from diffusers import SD3Transformer2DModel
    from diffdistill.kernels import FlashJointAttnProcessor, use_fused_attention

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=8,
    ).eval()
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 5, 16),
                  pooled_projections=torch.randn(1, 8), timestep=torch.tensor([3.0]))
    with torch.no_grad():
        ref = model(**inputs).sample
        assert use_fused_attention(model) == 2
        out = model(**inputs).sample
    assert all(isinstance(m.processor, FlashJointAttnProcessor) for m in model.modules() if hasattr(m, "add_q_proj"))
    assert max_err(out, ref) < 1e-5
    assert interpreter.count("_fwd_kernel") == 2


def test_dit_transformer(interpreter):
    """DiT's BasicTransformerBlocks: self-attention only, through AttentionMixin models."""
    from diffusers import DiTTransformer2DModel
    from diffusers.models.attention_processor import Attention, AttnProcessor
    from diffdistill.kernels import use_fused_attention

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                  sample_size=8, patch_size=2, norm_num_groups=8).eval()
    for module in model.modules():  # the math reference: SDPA has no forward AD
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.tensor([1]))
    ref, ref_tangent = _jvp_of(lambda x: model(x, timestep=inputs[1], class_labels=inputs[2]).sample, inputs[0])
    assert use_fused_attention(model) == 2
    out, tangent = _jvp_of(lambda x: model(x, timestep=inputs[1], class_labels=inputs[2]).sample, inputs[0])
    assert max_err(out, ref) < 1e-5 and max_err(tangent, ref_tangent) < 1e-4
    assert interpreter.count("_fwd_kernel") == 4


def test_keeps_processors_that_do_more(caplog):
    from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor
    from diffdistill.kernels import use_fused_attention

    attn = Attention(query_dim=32, heads=4, dim_head=8, added_kv_proj_dim=16, processor=AttnAddedKVProcessor())
    with caplog.at_level(logging.WARNING, logger="diffdistill.kernels"):
        assert use_fused_attention(torch.nn.Sequential(attn, _attention_module())) == 1
    assert isinstance(attn.processor, AttnAddedKVProcessor)
    assert "AttnAddedKVProcessor" in caplog.text


# --------------------------------------------------------------------------
# GPU only: compiled kernels, bf16, diffusers' real head dims
# --------------------------------------------------------------------------
GPU_TOL = {torch.float32: 5e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # fp32 may use TF32


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [40, 64, 80, 128, 160])
def test_gpu_values_gradients_tangents(compiled, dtype, head_dim):
    shape = (2, 3, 300, 77, head_dim)  # cross-attention against 77 text tokens
    primals = [t.requires_grad_() for t in make(shape, dtype, "cuda")]
    tangents = make(shape, dtype, "cuda", seed=1)
    out, tangent = torch.func.jvp(flash_attention, tuple(primals), tuple(tangents))
    ref, ref_tangent = reference_jvp([p.detach() for p in primals], tangents)
    tol = GPU_TOL[dtype]
    assert max_err(out, ref) < tol
    assert max_err(tangent, ref_tangent) < tol * max(1.0, ref_tangent.abs().max().item())

    fused_out, fused_tangent = flash_attention_jvp(*[p.detach() for p in primals], *tangents)
    assert max_err(fused_out, ref) < tol
    assert max_err(fused_tangent, ref_tangent) < tol * max(1.0, ref_tangent.abs().max().item())

    grad_out = torch.randn_like(out)
    flash_attention(*primals).backward(grad_out)
    ref64 = [p.detach().double().requires_grad_() for p in primals]
    attention_reference(*ref64).backward(grad_out.double())
    for ours, theirs in zip(primals, ref64):
        assert max_err(ours.grad, theirs.grad) < 2 * tol * max(1.0, theirs.grad.abs().max().item())


@needs_cuda
def test_gpu_long_self_attention(compiled):
    """SD1.5's largest self-attention (4096 tokens, head_dim 40) against fp32 math."""
    shape = (1, 8, 4096, 4096, 40)
    primals, tangents = make(shape, torch.float16, "cuda"), make(shape, torch.float16, "cuda", seed=1)
    out, tangent = torch.func.jvp(flash_attention, tuple(primals), tuple(tangents))
    fp32 = [t.float() for t in primals]
    ref, ref_tangent = torch.func.jvp(attention_reference, tuple(fp32), tuple(t.float() for t in tangents))
    assert max_err(out, ref) < 5e-3
    assert max_err(tangent, ref_tangent) < 1e-2 * max(1.0, ref_tangent.abs().max().item())
    assert math.isfinite(tangent.float().abs().max().item())


# --------------------------------------------------------------------------
# GPU code path without a GPU: tile choice, and lowering to sm_90 machine code
# --------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("head_dim", [40, 64, 80, 128, 160, 256])
def test_autotune_keeps_a_tile_for_every_pass(head_dim):
    fwd, bwd_kv, bwd_q = triton_kernels._fwd_kernel, triton_kernels._bwd_kv_kernel, triton_kernels._bwd_q_kernel
    for kernel, extra in ((fwd, {"WITH_TANGENT": False}), (fwd, {"WITH_TANGENT": True}), (bwd_kv, {}), (bwd_q, {})):
        kept = launch._prune_configs(kernel, launch._gpu_configs(kernel), {}, BLOCK_D=launch._block_d(head_dim), **extra)
        assert 1 <= len(kept) <= 5
        assert all(c.kwargs["BLOCK_M"] >= 16 and c.kwargs["BLOCK_N"] >= 16 for c in kept)  # tl.dot's minimum


def _signature(kernel, pointer_type):
    import inspect

    signature = {}
    for name in inspect.signature(kernel).parameters:
        if name in ("LSE", "DELTA"):
            signature[name] = "*fp32"
        elif name.isupper() and len(name) <= 3 and name not in ("H", "LQ", "LK"):
            signature[name] = pointer_type  # Q, K, V, O, QT, ..., DQ
        elif name in ("scale", "qk_scale_log2"):
            signature[name] = "fp32"
        elif name.startswith("s") or name in ("H", "LQ", "LK", "HEAD_DIM"):
            signature[name] = "i32"  # strides and sizes
        else:
            signature[name] = "constexpr"
    return signature


@needs_triton
@pytest.mark.parametrize("dtype,tangent", [("fp16", True), ("bf16", False)])
def test_kernels_lower_to_sm90(dtype, tangent):
    """Compile (not run) each kernel for an H100 with Triton's bundled ptxas.

    The interpreter accepts some programs the compiler rejects; this catches
    those on machines without a GPU.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(triton_kernels._max_combine, JITFunction):
        pytest.skip("triton was imported with TRITON_INTERPRET=1: its library is interpreter-only")
    fwd, bwd_kv, bwd_q = triton_kernels._fwd_kernel, triton_kernels._bwd_kv_kernel, triton_kernels._bwd_q_kernel
    for kernel, extra in ((fwd, {"WITH_TANGENT": tangent}), (bwd_kv, {}), (bwd_q, {})):
        meta = dict(BLOCK_D=64, PRECISION="tf32", **extra)
        tile = launch._prune_configs(kernel, launch._gpu_configs(kernel), {}, **meta)[-1]
        source = ASTSource(JITFunction(kernel), _signature(kernel, "*" + dtype), dict(meta, **tile.kwargs))
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=tile.num_warps, num_stages=tile.num_stages))
        except (FileNotFoundError, RuntimeError) as error:
            if "ptxas" in str(error).lower():
                pytest.skip(f"no ptxas: {error}")
            raise
        assert compiled.asm["cubin"] and compiled.metadata.shared <= 228 * 1024

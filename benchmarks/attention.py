"""Benchmark diffdistill's flash attention (forward, backward, forward+JVP) against torch SDPA.

Shapes are the attention calls of Stable Diffusion 1.5 (512 px: 8 heads of
dim 40/80/160 over 4096/1024/256/64 tokens) and SDXL (1024 px: 10 and 20 heads
of dim 64 over 4096 and 1024 tokens), self-attention and cross-attention
against 77 text tokens, at batch 2 (classifier-free guidance).

TFLOP/s count matmul work only (2 flops a multiply-add): forward 4*B*H*Lq*Lk*D,
backward 2.5x that (FlashAttention-2's convention: five matmuls), forward+JVP
3x (the primal's two matmuls plus q'k^T, qk'^T, (P*S')v and Pv', the sCM
tangent).  SDPA has no forward-mode AD, so its JVP column is torch.func.jvp
of plain math attention, which is what one would use without this kernel.

    python benchmarks/attention.py                # fp16, all shapes
    python benchmarks/attention.py --dtype bf16 --models sdxl

Prints a markdown table.  Without a CUDA GPU it says so and exits 0.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import diffdistill  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEVICE = "cuda"

SHAPES = {
    # name: (batch, heads, q length, k/v length, head_dim)
    "sd15": [
        (2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40),
        (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
        (2, 8, 256, 256, 160), (2, 8, 256, 77, 160),
        (2, 8, 64, 64, 160),
    ],
    "sdxl": [
        (2, 10, 4096, 4096, 64), (2, 10, 4096, 77, 64),
        (2, 20, 1024, 1024, 64), (2, 20, 1024, 77, 64),
    ],
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Goals on a GPU: forward within 1.3x of flash SDPA; "
                                            "forward+JVP within 2.5x of our forward.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES),
                        help="which model's attention shapes to run (default: all)")
    parser.add_argument("--batch", type=int, default=None, help="override the batch size of every shape")
    parser.add_argument("--rep", type=int, default=100, help="milliseconds of timed repetitions per measurement")
    return parser.parse_args(argv)


def bench_ms(fn, rep):
    """Median milliseconds of fn(), after warm-up (and autotuning) runs."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep)


def inputs(shape, dtype, requires_grad=False):
    b, h, lq, lk, d = shape
    make = lambda *s: torch.randn(*s, device=DEVICE, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    return make(b, h, lq, d), make(b, h, lk, d), make(b, h, lk, d)


def forward_flops(shape):
    b, h, lq, lk, d = shape
    return 4 * b * h * lq * lk * d


def time_backward(attention, shape, dtype, rep):
    q, k, v = inputs(shape, dtype, requires_grad=True)
    out = attention(q, k, v)
    grad = torch.randn_like(out)
    return bench_ms(lambda: out.backward(grad, retain_graph=True), rep)


def measure(shape, dtype, rep):
    """{implementation: {pass: milliseconds}} for one shape."""
    from diffdistill.kernels import attention_reference, flash_attention, flash_attention_jvp

    q, k, v = inputs(shape, dtype)
    tangents = inputs(shape, dtype)
    sdpa = F.scaled_dot_product_attention
    with torch.no_grad():
        results = {
            "torch SDPA": {
                "fwd": bench_ms(lambda: sdpa(q, k, v), rep),
                "jvp": bench_ms(lambda: torch.func.jvp(attention_reference, (q, k, v), tangents), rep),
            },
            "diffdistill": {
                "fwd": bench_ms(lambda: flash_attention(q, k, v), rep),
                "jvp": bench_ms(lambda: torch.func.jvp(flash_attention, (q, k, v), tangents), rep),
                "fused": bench_ms(lambda: flash_attention_jvp(q, k, v, *tangents), rep),
            },
        }
        error = (flash_attention(q, k, v).float() - sdpa(q, k, v).float()).abs().max().item()
    results["torch SDPA"]["bwd"] = time_backward(sdpa, shape, dtype, rep)
    results["diffdistill"]["bwd"] = time_backward(flash_attention, shape, dtype, rep)
    xformers = _xformers_attention()
    if xformers is not None:
        with torch.no_grad():
            results["xformers"] = {"fwd": bench_ms(lambda: xformers(q, k, v), rep)}
        results["xformers"]["bwd"] = time_backward(xformers, shape, dtype, rep)
    return results, error


def _xformers_attention():
    try:
        import xformers.ops as xops
    except Exception:
        return None
    # xformers takes (batch, length, heads, head_dim)
    return lambda q, k, v: xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def tflops(flops, ms):
    return flops / (ms * 1e-3) / 1e12


def cell(ms, flops):
    return f"{ms:.3f} ms, {tflops(flops, ms):.0f}" if ms is not None else "n/a"


def table(rows, dtype_name):
    print(f"\n{torch.cuda.get_device_name()}, {dtype_name}, torch {torch.__version__}; "
          "cells: median time, TFLOP/s\n")
    print("| B, H, Lq, Lk, D | implementation | forward | backward | forward+JVP | fused fwd+JVP "
          "| fwd / SDPA fwd | (fwd+JVP) / fwd | max abs diff vs SDPA |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, results, error in rows:
        fwd = forward_flops(shape)
        sdpa_fwd = results["torch SDPA"]["fwd"]
        for name, passes in results.items():
            ours = name == "diffdistill"
            jvp_ratio = f"{passes['jvp'] / passes['fwd']:.2f}x" if "jvp" in passes else ""
            if ours:
                jvp_ratio += f" (fused {passes['fused'] / passes['fwd']:.2f}x)"
            print(f"| {', '.join(map(str, shape))} | {name} | {cell(passes['fwd'], fwd)} "
                  f"| {cell(passes.get('bwd'), 2.5 * fwd)} | {cell(passes.get('jvp'), 3 * fwd)} "
                  f"| {cell(passes.get('fused'), 3 * fwd) if ours else ''} "
                  f"| {passes['fwd'] / sdpa_fwd:.2f}x | {jvp_ratio} | {f'{error:.1e}' if ours else ''} |")
    print("\nforward+JVP for torch SDPA is torch.func.jvp of math attention (SDPA has no forward AD); "
          "for diffdistill it is torch.func.jvp(flash_attention): the forward, then the fused pass. "
          "'fused' is flash_attention_jvp: primal and tangent from one launch.")


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/attention.py: no CUDA GPU here, nothing to measure "
              "(the kernels' CPU tests run in Triton's interpreter: pytest tests/test_kernels.py).")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/attention.py: Triton is not installed (pip install triton); nothing to measure.")
        return 0
    dtype = DTYPES[args.dtype]
    rows = []
    for model in args.models:
        for shape in SHAPES[model]:
            if args.batch is not None:
                shape = (args.batch, *shape[1:])
            print(f"measuring {model} {shape} ...", file=sys.stderr, flush=True)
            results, error = measure(shape, dtype, args.rep)
            rows.append((shape, results, error))
            torch.cuda.empty_cache()
    table(rows, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())

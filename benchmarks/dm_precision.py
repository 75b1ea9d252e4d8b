"""How precise DMD's distribution-matching gradient is under bf16 mixed precision, against float64.

g = (D_fake - D_real^w) / mean|x - D_real^w| at x_t, with the bundled digits teacher as the real
score and a copy of it with its weights perturbed (relative std --perturb) as the fake score, the
way a trained critic differs from its teacher. For t in --times, the relative error
||g - g_ref|| / ||g_ref|| of:

* ``autocast``: both passes in bf16 autocast, x0 in float32 (``method.dm_precision=autocast``);
* ``fp32``: the default, both passes outside autocast in float32, x0 in float64;

against ``g_ref``: both networks in float64. One table, for the README and the note.

    python benchmarks/dm_precision.py
"""

from __future__ import annotations

import argparse
import copy

import torch

from diffdistill.conditioning import encode_prompts
from diffdistill.methods.dmd import distribution_matching_grad
from diffdistill.scores import ScoreEngine
from diffdistill.teachers import resolve_teacher

PROMPTS = ["a handwritten digit 3", "the number seven", "0", "a handwritten digit 8"]


def perturbed(backbone, scale: float, seed: int):
    """A copy whose every weight moves by ``scale`` times its tensor's mean magnitude, in noise."""
    copy_ = copy.deepcopy(backbone)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy_.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return copy_


def engine_for(teacher, real_backbone, fake_backbone) -> ScoreEngine:
    twin = copy.copy(teacher)
    twin.backbone = real_backbone
    return ScoreEngine(twin, {"critic": teacher.denoiser(fake_backbone)})


def relative_error(g, reference) -> float:
    return float((g.double() - reference).norm() / reference.norm())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--times", type=float, nargs="+", default=[100.0, 500.0, 980.0])
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--perturb", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=4, help="batches of len(PROMPTS) averaged per t")
    args = parser.parse_args(argv)
    teacher = resolve_teacher("zoo:digits")
    fake = perturbed(teacher.backbone, args.perturb, seed=1)
    float32 = engine_for(teacher, teacher.backbone, fake)
    float64 = engine_for(teacher, copy.deepcopy(teacher.backbone).double(), copy.deepcopy(fake).double())
    cond, uncond = encode_prompts(teacher.pipe, PROMPTS), encode_prompts(teacher.pipe, [""] * len(PROMPTS))
    rows = ["| t | autocast (bf16 passes, float32 x0) | fp32 (default: float32 passes, float64 x0) |", "|---:|---:|---:|"]
    for t_value in args.times:
        errors = {"autocast": [], "fp32": []}
        for r in range(args.repeats):
            g = torch.Generator().manual_seed(r)
            x = torch.randn(len(PROMPTS), *teacher.latent_shape, generator=g)
            eps = torch.randn(x.shape, generator=g)
            t = torch.full((len(PROMPTS),), t_value)
            reference, _ = distribution_matching_grad(float64, x.double(), t, eps.double(), cond, uncond, args.guidance, precision="fp32")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                for mode, found in errors.items():
                    grad, _ = distribution_matching_grad(float32, x, t, eps, cond, uncond, args.guidance, precision=mode)
                    found.append(relative_error(grad, reference))
        rows.append(f"| {t_value:g} | " + " | ".join(f"{sum(e) / len(e):.2e}" for e in errors.values()) + " |")
    print("\n".join(rows))
    print(f"\nzoo:digits teacher as the real score; its copy with weights perturbed by {args.perturb:g} x their mean magnitude as the "
          f"fake score; guidance {args.guidance:g}; {args.repeats} x {len(PROMPTS)} samples per t; relative error ||g - g64|| / ||g64||.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

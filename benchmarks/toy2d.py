"""2-D benchmark with exact teachers: every method against ring8 / grid25.

    python benchmarks/toy2d.py --targets ring8 grid25 --methods dmd dmd2 kd --json out.json --save-samples out/

For each (target, method) it trains a one-step student with the project's own trainer against the
exact mixture denoiser, then reports on 10,000 samples: energy distance to the target (averaged
over 5 draws of 2,000 against fresh target samples), modes covered, each mode's mass relative to
its true mass, the share of samples between modes, NLL under the true density, generator steps
and wall time. The teacher's own 50-step DDIM ODE samples give the reference row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffdistill.toy import (METHOD_DEFAULTS, TARGETS, energy_distance, mode_report, nll, sample_method,  # noqa: E402
                             sample_teacher_ode, toy_teacher, train_on_toy)


def averaged_energy_distance(samples: torch.Tensor, mixture, draws: int = 5, n: int = 2000) -> tuple[float, float]:
    values = []
    for i in range(draws):
        reference = mixture.sample(n, torch.Generator().manual_seed(1000 + i))
        values.append(energy_distance(samples[i * n : (i + 1) * n], reference))
    return float(np.mean(values)), float(np.std(values))


def evaluate(samples: torch.Tensor, mixture) -> dict:
    ed, ed_std = averaged_energy_distance(samples, mixture)
    return {"energy_distance": ed, "energy_distance_std": ed_std, **mode_report(samples, mixture), "nll": nll(samples, mixture)}


def save_scatter(samples: torch.Tensor, mixture, path: Path, title: str) -> None:
    """A scatter PNG with PIL only (no plotting dependency): samples grey, modes red."""
    from PIL import Image, ImageDraw

    size, extent = 512, 3.0
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    to_px = lambda p: ((p[0] + extent) / (2 * extent) * size, (extent - p[1]) / (2 * extent) * size)
    for x, y in samples[:5000].tolist():
        px, py = to_px((x, y))
        draw.point((px, py), fill=(60, 60, 60))
    for x, y in mixture.means.tolist():
        px, py = to_px((x, y))
        draw.ellipse((px - 3, py - 3, px + 3, py + 3), outline=(220, 0, 0))
    draw.text((8, 8), title, fill=(0, 0, 0))
    image.save(path)


def markdown_table(rows: list[dict]) -> str:
    head = "| target | method | energy dist. | modes | mass min/max | between modes | NLL | gen. steps | wall s |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['method']} | {r['energy_distance']:.4f} ± {r['energy_distance_std']:.4f} | "
            f"{r['modes_covered']}/{r['num_modes']} | {r['mass_ratio_min']:.2f} / {r['mass_ratio_max']:.2f} | "
            f"{100 * r['between_modes']:.1f}% | {r['nll']:.3f} | {r['steps']} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["ring8"], choices=sorted(TARGETS))
    parser.add_argument("--methods", nargs="+", default=["dmd", "dmd2", "kd"], help=f"any of {', '.join(METHOD_DEFAULTS)}")
    parser.add_argument("--steps", type=int, default=1000, help="generator updates per method")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.0, help="sample each student from an EMA of its generator with this decay (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    parser.add_argument("--save-samples", type=Path, help="write DIR/<target>_<method>.npy (10000x2 float32) and a scatter PNG")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHOD_DEFAULTS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHOD_DEFAULTS)}")

    rows = []
    for target in args.targets:
        mixture = TARGETS[target]()
        tic = time.perf_counter()
        teacher_samples = sample_teacher_ode(toy_teacher(mixture), 10000)
        runs = [("teacher-ode50", teacher_samples, 50, time.perf_counter() - tic)]
        for name in args.methods:
            tic = time.perf_counter()
            with tempfile.TemporaryDirectory() as out:
                method = train_on_toy(mixture, METHOD_DEFAULTS[name], args.steps, out, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                      ema_decay=0.0 if name == "phased_dmd" else args.ema)  # phased_dmd: its own expert_ema
            runs.append((name, sample_method(method, 10000), args.steps, time.perf_counter() - tic))
        for name, samples, steps, wall in runs:
            row = {"target": target, "method": name, "steps": steps, "wall_s": wall, **evaluate(samples, mixture)}
            rows.append(row)
            print(f"{target:7s} {name:14s} ED {row['energy_distance']:.4f}  modes {row['modes_covered']}/{row['num_modes']}  "
                  f"between {100 * row['between_modes']:.1f}%  {wall:.0f}s", flush=True)
            if args.save_samples:
                args.save_samples.mkdir(parents=True, exist_ok=True)
                np.save(args.save_samples / f"{target}_{name}.npy", samples.numpy().astype(np.float32))
                save_scatter(samples, mixture, args.save_samples / f"{target}_{name}.png", f"{target} {name}")
    print()
    print(markdown_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

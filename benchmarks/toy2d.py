"""2-D benchmark with exact teachers: every method against ring8 / grid25, at equal steps or equal wall time.

    python benchmarks/toy2d.py --targets ring8 grid25 --methods dmd dmd2 kd --json out.json --save-samples out/
    python benchmarks/toy2d.py --targets ring8 grid25 --methods dmd2 sid sim --minutes 10 --jobs 2 --curve curves.png

For each (target, method) it trains a one-step student with the project's own trainer against the
exact mixture denoiser, then reports on 10,000 samples: energy distance to the target (averaged
over 5 draws of 2,000 against fresh target samples), modes covered, each mode's mass relative to
its true mass, the share of samples between modes, NLL under the true density, generator steps
and wall time. The teacher's own 50-step DDIM ODE samples give the reference row.

``--minutes M`` trains each method for M minutes of wall time instead of ``--steps`` generator
steps (the trainer's ``time_limit_minutes``), so methods are compared at equal cost. ``--jobs N``
runs N (target, method) runs at once, each a process with one torch thread: all of them run under
the same load, so the comparison stays at equal wall time; the load average is printed with the
table. ``--curve PATH`` evaluates each student every ``--curve-every`` generator steps (4,000
samples, from the EMA when ``--ema`` keeps one) and writes energy distance and between-mode share
against generator step as a PNG at PATH and JSON beside it; those evaluations count against the
minutes (their seconds are in the JSON).

Each method trains at its toy settings, ``diffdistill.toy.TRAIN_DEFAULTS`` (``--lr`` and ``--ema``
override them): for the distribution-matching students a 2,000-step kd warm start, width-128 nets,
generator lr 1e-4 (critic 1e-3) and a generator EMA of 0.99. Why, with the runs behind it: the comments
above METHOD_DEFAULTS and TRAIN_DEFAULTS in diffdistill/toy.py. In short, from scratch the one-step
students map the Gaussian onto a thin ring with its mass spread evenly along it (a uniform-ring-like
sample, ~47% between modes after 1,900 dmd2 generator steps): the DM gradient carves the steep
"staircase" in angle that eight modes need only slowly (kd's exact per-sample targets get there in
~2,000 steps), and no change of lr, schedule, EMA, ratio, normalization, t range, depth or width fixed
that within minutes; a kd warm start does, and the DM phase must then run at a lower generator lr.

The ladd row: heads on the exact teacher's input, posterior over modes and x0 (its ``feature_layers``),
"real" samples from a pool of 2,048 teacher ODE samples (25 DDIM steps; a pool of 1,024 left the shrunk-ring
repair at ED 0.0114 against 0.0083), the same kd warm start, generator lr 3e-5, heads lr 1e-3, 4 head updates
per generator update, t ~ sigmoid(N(-1, 1)). Measured from the shrunk-ring start (one thread, load 5-8): from
scratch the generator ran off (ED > 1 after 400 steps at lr 1e-3 or 1e-4); at 1:1 and lr 1e-4 the ring
blurred (spread ratio 1.9 after 300 generator steps, hinge or non-saturating); 4:1 at lr 3e-5 repaired it
(ED 0.0044 after 200 steps at m = -1, 0.0067 at the paper's m = 1, non-saturating 0.0048). From a kd student
of seven of the eight modes, 300 steps moved the dropped mode's mass from 0.06 to 0.46 of its share while
the ring blurred (ED 0.026): LADD brings a mode back only slowly here. On ring8 (--jobs 2, load 4-5): at 3
minutes ladd ED 0.0080 / 9.5% between (896 generator steps), kd 0.0038 / 3.8%; at 10 minutes ladd 0.0063 / 9.4%
(2,912 generator steps), kd 0.0040 / 2.4%: LADD holds the warm start's modes and sharpens the energy distance
slowly, but does not lower the between-mode share the warm start leaves (~10%).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffdistill.toy import (
    METHOD_DEFAULTS,
    TARGETS,
    TRAIN_DEFAULTS,
    averaged_energy_distance,
    mode_report,
    nll,
    sample_method,
    sample_teacher_ode,
    toy_teacher,
    train_on_toy,
)


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


def _one_thread() -> None:
    torch.set_num_threads(1)


def run_job(target: str, name: str, options: dict, quiet: bool = False) -> dict:
    """Trains one method on one target (in a worker process under ``--jobs``); returns its row and samples.
    ``quiet``: the trainer's progress bar and notes (stderr) go nowhere, so N bars do not share a terminal;
    an exception still reaches the caller."""
    _one_thread()
    mixture = TARGETS[target]()
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as out, open(os.devnull, "w") as sink, \
            contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext():
        method = train_on_toy(mixture, METHOD_DEFAULTS[name], out=out, **options)
    wall = time.perf_counter() - tic
    samples = sample_method(method, 10000)
    record = method.toy_record
    row = {"target": target, "method": name, "steps": record["generator_steps"], "trainer_steps": record["steps"], "wall_s": wall,
           "curve_s": record["curve_s"], "settings": {k: v for k, v in options.items() if k != "generator_steps"}, **evaluate(samples, mixture)}
    return {"row": row, "samples": samples.numpy(), "curve": record["curve"]}


def job_options(name: str, args) -> dict:
    """The method's toy training settings (:data:`TRAIN_DEFAULTS`), with what the command line sets on top."""
    options = {"batch_size": args.batch_size, "seed": args.seed, **TRAIN_DEFAULTS.get(name, {})}
    if args.lr is not None:
        options["lr"] = args.lr
    if args.ema is not None:
        options["ema_decay"] = args.ema
    if args.warm_start is not None:
        options["warm_start"] = args.warm_start
    if name == "phased_dmd":
        options["ema_decay"] = 0.0  # its own expert_ema
    options["generator_steps"] = None if args.minutes and not args.steps else (args.steps or 1000)
    if args.minutes:
        options["minutes"] = args.minutes
    if args.curve:
        options["curve_every"] = args.curve_every
    return options


def load_line() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def save_curves(curves: dict, teacher: dict, path: Path) -> None:
    """Energy distance (log scale) and between-mode share against generator step, a panel pair per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({t for t, _ in curves})
    figure, axes = plt.subplots(2, len(targets), figsize=(6 * len(targets), 7), squeeze=False)
    for column, target in enumerate(targets):
        ed_ax, between_ax = axes[0, column], axes[1, column]
        for (t, name), rows in sorted(curves.items()):
            if t != target or not rows:
                continue
            steps = [r["generator_steps"] for r in rows]
            ed_ax.plot(steps, [r["energy_distance"] for r in rows], label=name)
            between_ax.plot(steps, [100 * r["between_modes"] for r in rows], label=name)
        ed_ax.axhline(teacher[target]["energy_distance"], color="black", linestyle="--", linewidth=1, label="teacher ODE (50 steps)")
        between_ax.axhline(100 * teacher[target]["between_modes"], color="black", linestyle="--", linewidth=1, label="teacher ODE (50 steps)")
        ed_ax.set_yscale("log")
        ed_ax.set_title(f"{target}: energy distance to the target")
        between_ax.set_title(f"{target}: samples between modes")
        ed_ax.set_ylabel("energy distance (2 x 2,000 samples)")
        between_ax.set_ylabel("% farther than 4 std from every mode")
        between_ax.set_xlabel("generator step")
        for ax in (ed_ax, between_ax):
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["ring8"], choices=sorted(TARGETS))
    parser.add_argument("--methods", nargs="+", default=["dmd", "dmd2", "kd"], help=f"any of {', '.join(METHOD_DEFAULTS)}")
    parser.add_argument("--steps", type=int, help="generator updates per method (default 1000; with --minutes: a cap, default none)")
    parser.add_argument("--minutes", type=float, help="train each method for this wall time instead of a step count")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each a process with one torch thread")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, help="both nets' learning rate (default: TRAIN_DEFAULTS, else 1e-3)")
    parser.add_argument("--ema", type=float, help="sample each student from an EMA of its generator with this decay (0: none; "
                        "default: TRAIN_DEFAULTS, else none)")
    parser.add_argument("--warm-start", type=int, help="generator steps of the warm start before the method's own (0: none; "
                        "default: TRAIN_DEFAULTS, e.g. 2,000 kd steps for the distribution-matching students)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    parser.add_argument("--save-samples", type=Path, help="write DIR/<target>_<method>.npy (10000x2 float32) and a scatter PNG")
    parser.add_argument("--curve", type=Path, help="write energy distance and between-mode share against step: PATH (PNG) and PATH.json")
    parser.add_argument("--curve-every", type=int, default=50, help="generator steps between curve points")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHOD_DEFAULTS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHOD_DEFAULTS)}")
    _one_thread()

    jobs = [(target, name, job_options(name, args)) for target in args.targets for name in args.methods]
    load_before, tic = load_line(), time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
            results = list(pool.map(run_job, *zip(*jobs), [True] * len(jobs)))
    else:
        results = [run_job(*job) for job in jobs]
    load_after, total = load_line(), time.perf_counter() - tic

    rows, curves, teacher_rows = [], {}, {}
    for target in args.targets:
        mixture = TARGETS[target]()
        start = time.perf_counter()
        teacher_samples = sample_teacher_ode(toy_teacher(mixture), 10000)
        teacher_row = {"target": target, "method": "teacher-ode50", "steps": 50, "wall_s": time.perf_counter() - start, **evaluate(teacher_samples, mixture)}
        teacher_rows[target] = teacher_row
        rows.append(teacher_row)
        outputs = [(teacher_row, teacher_samples.numpy())] + [(r["row"], r["samples"]) for r in results if r["row"]["target"] == target]
        for row, samples in outputs:
            if row is not teacher_row:
                rows.append(row)
                curves[(target, row["method"])] = next(r["curve"] for r in results if r["row"] is row)
            print(f"{target:7s} {row['method']:14s} ED {row['energy_distance']:.4f}  modes {row['modes_covered']}/{row['num_modes']}  "
                  f"between {100 * row['between_modes']:.1f}%  {row['steps']} gen. steps  {row['wall_s']:.0f}s", flush=True)
            if args.save_samples:
                args.save_samples.mkdir(parents=True, exist_ok=True)
                np.save(args.save_samples / f"{target}_{row['method']}.npy", samples.astype(np.float32))
                save_scatter(torch.from_numpy(samples), mixture, args.save_samples / f"{target}_{row['method']}.png", f"{target} {row['method']}")
    print()
    budget = f"{args.minutes:g} min a run" if args.minutes else f"{args.steps or 1000} generator steps a run"
    print(f"{budget}, {len(jobs)} runs, {args.jobs} at a time, one torch thread each; {total:.0f} s in all")
    print(f"load before: {load_before}")
    print(f"load after:  {load_after}")
    print(markdown_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "load_before": load_before, "load_after": load_after, "jobs": args.jobs}, indent=2))
    if args.curve:
        save_curves(curves, teacher_rows, args.curve)
        curve_json = args.curve.with_suffix(".json")
        curve_json.write_text(json.dumps({f"{t}/{m}": rows for (t, m), rows in curves.items()} | {"teacher": teacher_rows}, indent=2))
        print(f"curves: {args.curve} and {curve_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

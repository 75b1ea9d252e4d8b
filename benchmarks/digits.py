"""The digits benchmark: every method's one-step student of ``zoo:digits``, judged on the same prompts.

    python benchmarks/digits.py --minutes 20 --json digits.json          # every recipes/zoo/digits_*.yaml
    python benchmarks/digits.py --methods dmd2 dmd2_gan --minutes 10 --out runs/digits-bench

Each method trains from its recipe (``recipes/zoo/digits_METHOD.yaml``) for a wall-clock budget
(``--minutes``; or ``--steps``), is exported as a diffusers folder and judged like the quickstart:
digit-FID, prompt accuracy, digits covered, latency per image at batch 1 and its speedup against
the teacher at 25 guided steps, and the backbone speedup per image at a throughput batch (64).
The teacher and the undistilled one-step start are judged once, on the same prompts and noise.
``--eval-only`` judges the runs already under ``--out`` again without training. ``--jobs N`` trains N
methods at once, each a process with one torch thread (judging stays in this process, after training).
``--eval-every N`` scores each run during training (the recipe's ``eval_every``) and draws every
method's digit-FID against wall minutes into ``--out/curves.png``, the teacher's value as a line.
Prints one markdown table (with the load before and after); ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

try:
    import diffdistill  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffdistill.zoo import digits_methods  # noqa: E402
from diffdistill.zoo.quickstart import TEACHER_STEPS  # noqa: E402


def backbone_seconds_per_image(pipe, steps: int, guidance: float, batch: int = 64, repeats: int = 5) -> float:
    """Median time spent inside the backbone's forward per image (all steps of a call), at ``batch`` prompts a call.

    At batch 1 on a CPU a small UNet's call is mostly fixed overhead, and a batched CFG pass costs
    far less than two single passes; a throughput batch measures what the passes themselves cost.
    """
    import statistics

    import torch

    total = {"t": 0.0}
    def start(module, args, kwargs):
        total["tic"] = time.perf_counter()
    def stop(module, args, output):
        total["t"] += time.perf_counter() - total["tic"]
    handles = [pipe.unet.register_forward_pre_hook(start, with_kwargs=True), pipe.unet.register_forward_hook(stop)]
    times = []
    try:
        for i in range(repeats + 1):
            total["t"] = 0.0
            with torch.inference_mode():
                pipe(["the number seven"] * batch, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                     generator=torch.Generator().manual_seed(i))
            times.append(total["t"])
    finally:
        for h in handles:
            h.remove()
    return statistics.median(times[1:]) / batch


def load_line() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def train_method(method: str, run_dir: Path, overrides: list[str], one_thread: bool) -> float:
    """Trains one method's digits recipe into ``run_dir`` (in a worker process under ``--jobs``); returns seconds."""
    if one_thread:  # N runs at once on N cores: torch's own threads would oversubscribe them
        import torch

        torch.set_num_threads(1)
    from diffdistill.zoo.quickstart import distill

    _, seconds, _ = distill(method, run_dir, overrides)
    return seconds


def save_curves(out: Path, methods: list[str], path: Path) -> Path | None:
    """Each run's in-training digit-FID (its ``eval_every`` rows) against wall minutes, one line a method; the
    teacher's line is its value on the same in-training samples (the runs' ``quality-reference.json``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6.5, 4))
    drawn, teacher_fid = 0, None
    for method in methods:
        reference = out / method / "run" / "quality-reference.json"
        if teacher_fid is None and reference.is_file():
            teacher_fid = json.loads(reference.read_text())["values"].get("digit_fid")
        metrics = out / method / "run" / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
        rows = [r for r in rows if r.get("phase") == "eval"]
        if rows:
            ax.plot([r["train_seconds"] / 60 for r in rows], [r["digit_fid"] for r in rows], marker="o", markersize=3, label=method)
            drawn += 1
    if not drawn:
        plt.close(figure)
        return None
    if teacher_fid is not None:
        ax.axhline(teacher_fid, color="black", linestyle="--", linewidth=1, label=f"teacher (25 steps) {teacher_fid:.1f}")
    ax.set(xlabel="training wall time (minutes)", ylabel="digit-FID (in-training samples)", yscale="log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def table(rows: list[dict]) -> str:
    lines = ["| generator | steps | train | digit-FID | prompt acc. | digits | latency / image | speedup | backbone speedup |",
             "|---|---|---|---|---|---|---|---|---|"]  # latency: batch 1; backbone speedup: batch 64
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | | | {r['error']} | | | | | |")
            continue
        train = f"{r['train_steps']} st / {r['train_seconds'] / 60:.1f} min" if "train_steps" in r else ""
        lines.append(f"| {r['name']} | {r['steps']}{' + CFG' if r['guidance'] > 1 else ''} | {train} | {r['digit_fid']:.2f} | "
                     f"{100 * r['prompt_accuracy']:.1f}% | {r['digits_covered']}/10 | {1000 * r['latency_s']:.1f} ms | "
                     f"{r['speedup']:.1f}x | {r['backbone_speedup']:.1f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=None, help=f"default: all of {', '.join(digits_methods())}")
    parser.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget per method")
    parser.add_argument("--steps", type=int, default=None, help="a step budget instead of --minutes")
    parser.add_argument("--samples", type=int, default=1000, help="images per generator for the judge")
    parser.add_argument("--out", type=Path, default=Path("runs/digits-bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-only", action="store_true", help="judge the finished runs under --out again; train nothing")
    parser.add_argument("--jobs", type=int, default=1, help="methods trained at once, each a process with one torch thread")
    parser.add_argument("--eval-every", type=int, default=0, help="score each run every N steps (eval_every) and draw curves.png")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides for every method")
    args = parser.parse_args(argv)
    methods = args.methods or digits_methods()
    unknown = [m for m in methods if m not in digits_methods()]
    if unknown:
        parser.error(f"no digits recipe for {unknown}; choose from {', '.join(digits_methods())}")

    from diffdistill.config import load_recipe
    from diffdistill.export import export_run
    from diffdistill.zoo import zoo_path
    from diffdistill.zoo.judge import load_judge
    from diffdistill.zoo.quickstart import (evaluation_prompts, initial_noise, judge_generator, latent_shape, load_pipeline,
                                            recipe_path)

    judge = load_judge()
    teacher = load_pipeline(zoo_path("digits"))
    prompts, labels = evaluation_prompts(args.samples)
    latents = initial_noise(args.samples, latent_shape(teacher), args.seed)
    guidance = float(load_recipe(recipe_path("dmd2")).method["guidance"])
    rows = []
    for name, steps in (("teacher", TEACHER_STEPS), ("start", 1)):
        metrics, _ = judge_generator(teacher, steps, guidance, prompts, labels, latents, judge)
        rows.append({"name": name, **metrics, "backbone_s": backbone_seconds_per_image(teacher, steps, guidance)})
        print(f"{name}: digit-FID {metrics['digit_fid']:.2f}, prompt accuracy {100 * metrics['prompt_accuracy']:.1f}%", flush=True)
    budget = [f"max_steps={args.steps}"] if args.steps else ["max_steps=1000000", f"time_limit_minutes={args.minutes}"]
    overrides = [*budget, f"seed={args.seed}", "checkpoint_every=1000000", *args.set]
    if args.eval_every:
        overrides.append(f"eval_every={args.eval_every}")
    load_before = load_line()
    trained = {} if args.eval_only else train_all(methods, args.out, overrides, args.jobs)
    load_after = load_line()
    for method in methods:
        run_dir = args.out / method / "run"
        try:
            if isinstance(trained.get(method), Exception):
                raise trained[method]
            seconds = trained[method] if method in trained else last_logged_row(run_dir)["train_seconds"]
            export_run(run_dir, args.out / method / "student", "diffusers", overwrite=True)
        except Exception as e:  # one method's failure (e.g. a student the exporter cannot write) is a row, not the end
            rows.append({"name": method, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            print(f"{method}: {rows[-1]['error']}", flush=True)
            continue
        student = load_pipeline(args.out / method / "student")
        metrics, _ = judge_generator(student, 1, 1.0, prompts, labels, latents, judge)
        rows.append({"name": method, **metrics, "train_seconds": seconds, "train_steps": last_logged_row(run_dir)["step"],
                     "backbone_s": backbone_seconds_per_image(student, 1, 1.0)})
        print(f"{method}: digit-FID {metrics['digit_fid']:.2f}, prompt accuracy {100 * metrics['prompt_accuracy']:.1f}%", flush=True)
    for r in rows:
        if "error" not in r:
            r["speedup"] = rows[0]["latency_s"] / r["latency_s"]
            r["backbone_speedup"] = rows[0]["backbone_s"] / r["backbone_s"]
    curves = save_curves(args.out, methods, args.out / "curves.png") if args.eval_every else None
    print()
    print(table(rows))
    print(f"\ntraining: {args.jobs} at a time{', one torch thread each' if args.jobs > 1 else ''}; load before: {load_before}; after: {load_after}")
    if curves:
        print(f"curves: {curves}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "jobs": args.jobs, "overrides": overrides, "load_before": load_before,
                                         "load_after": load_after}, indent=2))
    return 0


def train_all(methods: list[str], out: Path, overrides: list[str], jobs: int) -> dict:
    """Trains every method (``jobs`` at once); returns its seconds, or the exception that stopped it."""
    runs = {m: (m, out / m / "run", overrides, jobs > 1) for m in methods}
    if jobs <= 1:
        return {m: result_or_error(lambda run=run: train_method(*run)) for m, run in runs.items()}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {m: pool.submit(train_method, *run) for m, run in runs.items()}
        return {m: result_or_error(future.result) for m, future in futures.items()}


def result_or_error(call):
    """``call()``, or the exception it raised: one method's failure becomes its row, not the benchmark's end."""
    try:
        return call()
    except Exception as e:
        return e


def last_logged_row(run_dir: Path) -> dict:
    """The run's last metrics row, with its step and training time (steps / it_per_s of an uninterrupted run)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("phase") != "eval"]  # eval_every's rows carry no training speed
    row = rows[-1] if rows else {}
    step = int(row.get("step", 0))
    return {**row, "step": step, "train_seconds": step / row["it_per_s"] if row.get("it_per_s") else float("nan")}


if __name__ == "__main__":
    raise SystemExit(main())
